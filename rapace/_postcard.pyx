# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The postcard codec nodes, compiled: the twin of ``rapace/_postcard_py.py``.

Same classes, constructors, bytes, values and exceptions as the pure twin (the reference,
and what type checkers read). Here every node is a ``cdef class`` whose ``enc``/``dec``
are C-level virtual calls: encoding writes into a growable C buffer (a 512-byte stack
buffer first), decoding reads a ``const unsigned char*`` at an offset, so a whole tree is
walked without a Python-level call until a value has to be boxed or built.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport (
    PyLong_AsDouble,
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLong,
    PyLong_FromLongLong,
    PyLong_FromUnsignedLongLong,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject_GenericSetAttr
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from rapace._checks import (
    bad_varint_width,
    field_count_mismatch,
    nested_too_deep,
    not_bytes_like,
    too_many_zero_size_items,
)
from rapace.types import PostcardError, _fmt_int

cdef extern from "Python.h":
    bint PyLong_Check(object o)
    bint PyBool_Check(object o)
    bint PyFloat_Check(object o)
    bint PyFloat_CheckExact(object o)
    bint PyBytes_CheckExact(object o)
    bint PyByteArray_CheckExact(object o)
    bint PyByteArray_Check(object o)
    bint PyBytes_Check(object o)
    bint PyList_CheckExact(object o)
    bint PyTuple_CheckExact(object o)
    int PyFloat_Pack4(double x, char *p, int le) except -1
    int PyFloat_Pack8(double x, char *p, int le) except -1
    double PyFloat_Unpack4(const char *p, int le) except? -1.0
    double PyFloat_Unpack8(const char *p, int le) except? -1.0

cdef extern from *:
    """
    /* cls.__new__(cls) without the attribute lookup: tp_new is object_new for plain
       classes and slot_tp_new (which calls the Python __new__) otherwise. */
    static PyObject *rapace_pc_new_instance(PyObject *cls, PyObject *empty) {
        PyTypeObject *tp = (PyTypeObject *)cls;
        if (tp->tp_new == NULL) {
            PyErr_Format(PyExc_TypeError, "cannot create '%s' instances", tp->tp_name);
            return NULL;
        }
        return tp->tp_new(tp, empty, NULL);
    }
    """
    object rapace_pc_new_instance(object cls, object empty)

__all__ = [
    "MAX_DEPTH",
    "MAX_ZERO_SIZE_ITEMS_PER_MESSAGE",
    "F32",
    "F64",
    "I8",
    "U8",
    "Bool",
    "Bytes",
    "Codec",
    "DataEnum",
    "Map",
    "Node",
    "Option",
    "Seq",
    "Str",
    "Struct",
    "Tuple",
    "Unit",
    "UnitEnum",
    "Varint",
]

MAX_DEPTH = 128
MAX_ZERO_SIZE_ITEMS_PER_MESSAGE = 1 << 20

cdef int C_MAX_DEPTH = 128
cdef uint64_t C_MAX_ZERO_SIZE_ITEMS_PER_MESSAGE = 1 << 20
cdef enum:
    STACK_BUF = 512

cdef tuple EMPTY_TUPLE = ()


# --------------------------------------------------------------------------- buffers

cdef struct WBuf:
    unsigned char *p
    Py_ssize_t n
    Py_ssize_t cap
    int depth
    bint heap


cdef struct RBuf:
    const unsigned char *p
    Py_ssize_t pos
    Py_ssize_t end
    int depth
    uint64_t zero_size_left  # zero-size items this message may still claim


cdef int wb_grow(WBuf *w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = w.n + extra
    cdef Py_ssize_t cap = w.cap * 2
    cdef unsigned char *p
    if cap < need:
        cap = need
    if w.heap:
        p = <unsigned char *>PyMem_Realloc(w.p, <size_t>cap)
        if p == NULL:
            raise MemoryError()
    else:
        p = <unsigned char *>PyMem_Malloc(<size_t>cap)
        if p == NULL:
            raise MemoryError()
        memcpy(p, w.p, <size_t>w.n)
        w.heap = True
    w.p = p
    w.cap = cap
    return 0


cdef inline int wb_byte(WBuf *w, unsigned char b) except -1:
    if w.n >= w.cap:
        wb_grow(w, 1)
    w.p[w.n] = b
    w.n += 1
    return 0


cdef inline int wb_raw(WBuf *w, const char *data, Py_ssize_t n) except -1:
    if w.n + n > w.cap:
        wb_grow(w, n)
    memcpy(w.p + w.n, data, <size_t>n)
    w.n += n
    return 0


cdef inline int wb_varint(WBuf *w, uint64_t v) except -1:
    cdef unsigned char *p
    if w.n + 10 > w.cap:
        wb_grow(w, 10)
    p = w.p + w.n
    while v >= 0x80:
        p[0] = <unsigned char>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <unsigned char>v
    w.n = (p - w.p) + 1
    return 0


# --------------------------------------------------------------------------- errors

cdef int enc_fail(str reason, Node node, WBuf *w) except -1:
    raise PostcardError(reason, node.name, w.n, False)


cdef int dec_fail(str reason, Node node, Py_ssize_t offset) except -1:
    raise PostcardError(reason, node.name, offset, True)


cdef int wrong_type(Node node, WBuf *w, str expected, object value) except -1:
    return enc_fail(f"expected {expected}, got {type(value).__name__}", node, w)


cdef int truncated(Node node, RBuf *r, Py_ssize_t need) except -1:
    return dec_fail(f"truncated: needs {need} bytes, {r.end - r.pos} left", node, r.pos)


cdef inline bint is_int(object value):
    return PyLong_Check(value) and not PyBool_Check(value)


# --------------------------------------------------------------------------- varints

cdef int rb_varint_slow(RBuf *r, Node node, int maxbytes, unsigned char lastmax,
                        str width, uint64_t *out) except -1:
    cdef Py_ssize_t pos = r.pos
    cdef Py_ssize_t start = r.pos
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef int i
    cdef unsigned char b
    for i in range(maxbytes):
        if pos >= r.end:
            return dec_fail("truncated varint", node, start)
        b = r.p[pos]
        pos += 1
        if i == maxbytes - 1 and b > lastmax:
            if b & 0x80:
                return dec_fail(f"varint longer than {maxbytes} bytes", node, start)
            return dec_fail(f"varint overflows {width}", node, start)
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            r.pos = pos
            out[0] = result
            return 0
        shift += 7
    raise AssertionError("unreachable")


cdef inline int rb_varint(RBuf *r, Node node, int maxbytes, unsigned char lastmax,
                          str width, uint64_t *out) except -1:
    cdef Py_ssize_t pos = r.pos
    cdef unsigned char b
    if pos < r.end:
        b = r.p[pos]
        if b < 0x80:
            r.pos = pos + 1
            out[0] = b
            return 0
    return rb_varint_slow(r, node, maxbytes, lastmax, width, out)


cdef inline int rb_usize(RBuf *r, Node node, uint64_t *out) except -1:
    return rb_varint(r, node, 10, 0x01, "u64", out)


cdef int rb_count(RBuf *r, Node node, Py_ssize_t min_size, Py_ssize_t *out) except -1:
    cdef Py_ssize_t start = r.pos
    cdef Py_ssize_t left
    cdef uint64_t count = 0
    rb_usize(r, node, &count)
    if min_size > 0:
        left = r.end - r.pos
        if count > <uint64_t>(left // min_size):
            return dec_fail(
                f"truncated: {count} items of at least {min_size} bytes, {left} left",
                node,
                start,
            )
    elif count > r.zero_size_left:
        raise too_many_zero_size_items(
            node.name,
            start,
            count,
            C_MAX_ZERO_SIZE_ITEMS_PER_MESSAGE - r.zero_size_left,
            C_MAX_ZERO_SIZE_ITEMS_PER_MESSAGE,
        )
    else:
        r.zero_size_left -= count
    out[0] = <Py_ssize_t>count
    return 0


# --------------------------------------------------------------------------- nodes

cdef class Node:
    """One type of the compiled tree."""

    cdef readonly str name
    cdef readonly Py_ssize_t min_size

    def __init__(self, str name, Py_ssize_t min_size):
        self.name = name
        self.min_size = min_size

    cdef int enc(self, WBuf *w, object value) except -1:
        raise NotImplementedError

    cdef object dec(self, RBuf *r):
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


cdef class Unit(Node):
    """``None``, the unit type: no bytes."""

    def __init__(self, str name):
        Node.__init__(self, name, 0)

    cdef int enc(self, WBuf *w, object value) except -1:
        if value is not None:
            return wrong_type(self, w, "None", value)
        return 0

    cdef object dec(self, RBuf *r):
        return None


cdef class Bool(Node):
    """``bool``: one byte, 0 or 1."""

    def __init__(self, str name):
        Node.__init__(self, name, 1)

    cdef int enc(self, WBuf *w, object value) except -1:
        if value is True:
            return wb_byte(w, 1)
        if value is False:
            return wb_byte(w, 0)
        return wrong_type(self, w, "bool", value)

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t pos = r.pos
        cdef unsigned char b
        if pos >= r.end:
            truncated(self, r, 1)
        b = r.p[pos]
        if b > 1:
            dec_fail(f"invalid bool byte 0x{b:02x}", self, pos)
        r.pos = pos + 1
        return b == 1


cdef class U8(Node):
    """``u8``: one byte."""

    def __init__(self, str name):
        Node.__init__(self, name, 1)

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef int overflow = 0
        cdef long long x
        if not is_int(value):
            return wrong_type(self, w, "int", value)
        x = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow != 0 or x < 0 or x > 0xFF:
            return enc_fail(f"{_fmt_int(value)} is out of range [0, 255]", self, w)
        return wb_byte(w, <unsigned char>x)

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t pos = r.pos
        if pos >= r.end:
            truncated(self, r, 1)
        r.pos = pos + 1
        return <long>r.p[pos]


cdef class I8(Node):
    """``i8``: one byte, two's complement."""

    def __init__(self, str name):
        Node.__init__(self, name, 1)

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef int overflow = 0
        cdef long long x
        if not is_int(value):
            return wrong_type(self, w, "int", value)
        x = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow != 0 or x < -0x80 or x > 0x7F:
            return enc_fail(f"{_fmt_int(value)} is out of range [-128, 127]", self, w)
        return wb_byte(w, <unsigned char>(x & 0xFF))

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t pos = r.pos
        if pos >= r.end:
            truncated(self, r, 1)
        r.pos = pos + 1
        return <long>(<signed char>r.p[pos])


cdef class Varint(Node):
    """``u16``..``u64`` as LEB128; ``i16``..``i64`` zigzagged first."""

    cdef readonly int bits
    cdef readonly bint signed
    cdef readonly object lo
    cdef readonly object hi
    cdef readonly int maxbytes
    cdef readonly str width
    cdef readonly unsigned char lastmax
    cdef long long clo
    cdef long long chi
    cdef uint64_t umax

    def __init__(self, str name, int bits, bint signed):
        if bits not in (16, 32, 64):
            raise bad_varint_width(bits)
        Node.__init__(self, name, 1)
        self.bits = bits
        self.signed = signed
        cdef object one = 1  # Python ints: 1 << 64 does not fit a C int
        self.lo = -(one << (bits - 1)) if signed else 0
        self.hi = (one << (bits - 1)) - 1 if signed else (one << bits) - 1
        self.maxbytes = (bits + 6) // 7
        self.lastmax = <unsigned char>((1 << (bits - 7 * (self.maxbytes - 1))) - 1)
        self.width = f"{'i' if signed else 'u'}{bits}"
        if signed:
            self.clo = self.lo
            self.chi = self.hi
        else:
            self.umax = self.hi

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef int overflow = 0
        cdef long long x
        cdef uint64_t u
        if not is_int(value):
            return wrong_type(self, w, "int", value)
        x = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0:
            if self.signed:
                if x < self.clo or x > self.chi:
                    return self._range(w, value)
                u = ((<uint64_t>x) << 1) ^ (<uint64_t>(x >> 63))
            else:
                if x < 0 or <uint64_t>x > self.umax:
                    return self._range(w, value)
                u = <uint64_t>x
        elif overflow > 0 and not self.signed and self.bits == 64:
            if value > self.hi:
                return self._range(w, value)
            u = PyLong_AsUnsignedLongLong(value)
        else:
            return self._range(w, value)
        return wb_varint(w, u)

    cdef int _range(self, WBuf *w, object value) except -1:
        return enc_fail(
            f"{_fmt_int(value)} is out of range [{self.lo}, {self.hi}]", self, w
        )

    cdef object dec(self, RBuf *r):
        cdef uint64_t u = 0
        rb_varint(r, self, self.maxbytes, self.lastmax, self.width, &u)
        if self.signed:
            return PyLong_FromLongLong(<long long>((u >> 1) ^ (0 - (u & 1))))
        return PyLong_FromUnsignedLongLong(u)


cdef int as_double(Node node, WBuf *w, object value, double *out) except -1:
    if PyFloat_Check(value):
        out[0] = PyFloat_AS_DOUBLE(value)
        return 0
    if not is_int(value):
        return wrong_type(node, w, "float", value)
    try:
        out[0] = PyLong_AsDouble(value)
    except OverflowError:
        return enc_fail(f"{_fmt_int(value)} is out of range for f64", node, w)
    return 0


cdef class F32(Node):
    """``f32``: IEEE 754 single precision, little-endian."""

    def __init__(self, str name):
        Node.__init__(self, name, 4)

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef double x
        as_double(self, w, value, &x)
        if w.n + 4 > w.cap:
            wb_grow(w, 4)
        try:
            PyFloat_Pack4(x, <char *>(w.p + w.n), 1)
        except OverflowError:
            return enc_fail(f"{x!r} is out of range for f32", self, w)
        w.n += 4
        return 0

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t pos = r.pos
        if r.end - pos < 4:
            truncated(self, r, 4)
        r.pos = pos + 4
        return PyFloat_Unpack4(<const char *>(r.p + pos), 1)


cdef class F64(Node):
    """``f64`` (``float``): IEEE 754 double precision, little-endian."""

    def __init__(self, str name):
        Node.__init__(self, name, 8)

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef double x
        if PyFloat_CheckExact(value):
            x = PyFloat_AS_DOUBLE(value)
        else:
            as_double(self, w, value, &x)
        if w.n + 8 > w.cap:
            wb_grow(w, 8)
        PyFloat_Pack8(x, <char *>(w.p + w.n), 1)
        w.n += 8
        return 0

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t pos = r.pos
        if r.end - pos < 8:
            truncated(self, r, 8)
        r.pos = pos + 8
        return PyFloat_Unpack8(<const char *>(r.p + pos), 1)


cdef class Str(Node):
    """``str``: varint length, then UTF-8."""

    def __init__(self, str name):
        Node.__init__(self, name, 1)

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef const char *data
        cdef Py_ssize_t n
        if not isinstance(value, str):
            return wrong_type(self, w, "str", value)
        try:
            data = PyUnicode_AsUTF8AndSize(value, &n)
        except UnicodeEncodeError as exc:
            return enc_fail(f"not encodable as UTF-8: {exc.reason}", self, w)
        wb_varint(w, <uint64_t>n)
        return wb_raw(w, data, n)

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t start = r.pos
        cdef Py_ssize_t pos
        cdef uint64_t n = 0
        rb_usize(r, self, &n)
        pos = r.pos
        if n > <uint64_t>(r.end - pos):
            dec_fail(f"truncated: needs {n} bytes of UTF-8, {r.end - pos} left", self, start)
        r.pos = pos + <Py_ssize_t>n
        try:
            return PyUnicode_DecodeUTF8(<char *>(r.p + pos), <Py_ssize_t>n, NULL)
        except UnicodeDecodeError as exc:
            dec_fail(
                f"invalid UTF-8 ({exc.reason}) at byte {exc.start} of the string", self, start
            )


cdef class Bytes(Node):
    """``bytes``: varint length, then the bytes (``bytearray``/``memoryview`` encode too)."""

    def __init__(self, str name):
        Node.__init__(self, name, 1)

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef Py_ssize_t n
        if PyBytes_Check(value):
            n = PyBytes_GET_SIZE(value)
            wb_varint(w, <uint64_t>n)
            return wb_raw(w, PyBytes_AS_STRING(value), n)
        if PyByteArray_Check(value):
            n = PyByteArray_GET_SIZE(value)
            wb_varint(w, <uint64_t>n)
            return wb_raw(w, PyByteArray_AS_STRING(value), n)
        if not isinstance(value, memoryview):
            return wrong_type(self, w, "bytes", value)
        value = bytes(value)
        n = PyBytes_GET_SIZE(value)
        wb_varint(w, <uint64_t>n)
        return wb_raw(w, PyBytes_AS_STRING(value), n)

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t start = r.pos
        cdef Py_ssize_t pos
        cdef uint64_t n = 0
        rb_usize(r, self, &n)
        pos = r.pos
        if n > <uint64_t>(r.end - pos):
            dec_fail(f"truncated: needs {n} bytes, {r.end - pos} left", self, start)
        r.pos = pos + <Py_ssize_t>n
        return PyBytes_FromStringAndSize(<char *>(r.p + pos), <Py_ssize_t>n)


cdef class Option(Node):
    """``T | None``: ``00``, or ``01`` then the value."""

    cdef readonly Node inner

    def __init__(self, str name, Node inner):
        Node.__init__(self, name, 1)
        self.inner = inner

    cdef int enc(self, WBuf *w, object value) except -1:
        if value is None:
            return wb_byte(w, 0)
        wb_byte(w, 1)
        return self.inner.enc(w, value)

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t pos = r.pos
        cdef unsigned char tag
        if pos >= r.end:
            truncated(self, r, 1)
        tag = r.p[pos]
        if tag == 0:
            r.pos = pos + 1
            return None
        if tag == 1:
            r.pos = pos + 1
            return self.inner.dec(r)
        dec_fail(f"invalid Option tag 0x{tag:02x}", self, pos)


cdef class Seq(Node):
    """``list[T]`` (or ``tuple[T, ...]`` with ``as_tuple``): varint count, then the items."""

    cdef readonly Node item
    cdef readonly bint as_tuple

    def __init__(self, str name, Node item, bint as_tuple=False):
        Node.__init__(self, name, 1)
        self.item = item
        self.as_tuple = as_tuple

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef Node item = self.item
        cdef Py_ssize_t i = 0
        if not isinstance(value, (list, tuple)):
            return wrong_type(self, w, "list or tuple", value)
        wb_varint(w, <uint64_t>len(value))
        try:
            if isinstance(value, list):
                for x in <list>value:
                    item.enc(w, x)
                    i += 1
            else:
                for x in <tuple>value:
                    item.enc(w, x)
                    i += 1
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return 0

    cdef object dec(self, RBuf *r):
        cdef Node item = self.item
        cdef Py_ssize_t count = 0
        cdef Py_ssize_t i = 0
        cdef list items
        cdef tuple titems
        rb_count(r, self, item.min_size, &count)
        try:
            if self.as_tuple:
                titems = PyTuple_New(count)
                for i in range(count):
                    x = item.dec(r)
                    Py_INCREF(x)
                    PyTuple_SET_ITEM(titems, i, x)
                return titems
            items = PyList_New(count)
            for i in range(count):
                x = item.dec(r)
                Py_INCREF(x)
                PyList_SET_ITEM(items, i, x)
            return items
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise


cdef class Tuple(Node):
    """``tuple[A, B, ...]``: the items in order, no count."""

    cdef readonly tuple items

    def __init__(self, str name, items):
        items = tuple(items)
        Node.__init__(self, name, sum([(<Node>n).min_size for n in items]))
        self.items = items

    @cython.boundscheck(True)  # value[i]: a list could shrink while its items encode
    cdef int enc(self, WBuf *w, object value) except -1:
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t n = len(self.items)
        cdef Node node
        if not isinstance(value, (tuple, list)):
            return wrong_type(self, w, "tuple", value)
        if len(value) != n:
            return enc_fail(f"expected {n} items, got {len(value)}", self, w)
        try:
            for i in range(n):
                node = <Node>self.items[i]
                node.enc(w, value[i])
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return 0

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t n = len(self.items)
        cdef Node node
        cdef tuple result = PyTuple_New(n)
        try:
            for i in range(n):
                node = <Node>self.items[i]
                x = node.dec(r)
                Py_INCREF(x)
                PyTuple_SET_ITEM(result, i, x)
        except PostcardError as exc:
            exc._prepend(f"[{i}]")
            raise
        return result


cdef class Map(Node):
    """``dict[K, V]``: varint count, then key, value, key, value ..."""

    cdef readonly Node key
    cdef readonly Node value

    def __init__(self, str name, Node key, Node value):
        Node.__init__(self, name, 1)
        self.key = key
        self.value = value

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef Node knode = self.key
        cdef Node vnode = self.value
        if not isinstance(value, dict):
            return wrong_type(self, w, "dict", value)
        wb_varint(w, <uint64_t>len(<dict>value))
        for k, v in (<dict>value).items():
            knode.enc(w, k)
            vnode.enc(w, v)
        return 0

    cdef object dec(self, RBuf *r):
        cdef Node knode = self.key
        cdef Node vnode = self.value
        cdef Py_ssize_t count = 0
        cdef Py_ssize_t i
        cdef dict result = {}
        rb_count(r, self, knode.min_size + vnode.min_size, &count)
        for i in range(count):
            k = knode.dec(r)
            result[k] = vnode.dec(r)
        return result


cdef class Struct(Node):
    """A dataclass: its fields in order. Decoding bypasses ``__init__`` (fields are set
    with ``object.__setattr__``, so frozen and slotted dataclasses work), then calls
    ``__post_init__`` if the class has one; a ``ValueError``/``TypeError`` it raises
    becomes a ``PostcardError``."""

    cdef readonly object cls
    cdef readonly tuple names
    cdef readonly tuple nodes
    cdef readonly object post_init
    cdef Py_ssize_t nfields

    def __init__(self, str name, object cls, names, post_init):
        Node.__init__(self, name, 0)
        self.cls = cls
        self.names = tuple([str(n) for n in names])
        self.post_init = post_init
        self.nodes = ()
        self.nfields = 0

    def set_fields(self, nodes):
        nodes = tuple(nodes)
        if len(nodes) != len(self.names):
            raise field_count_mismatch(self.name, len(self.names), len(nodes))
        for n in nodes:
            if not isinstance(n, Node):
                raise TypeError(f"expected a Node, got {type(n).__name__}")
        self.nodes = nodes
        self.nfields = len(nodes)
        self.min_size = sum([(<Node>n).min_size for n in nodes])

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef Py_ssize_t i = 0
        cdef Node node
        cdef tuple names = self.names
        cdef tuple nodes = self.nodes
        if type(value) is not self.cls and not isinstance(value, self.cls):
            return wrong_type(self, w, self.name, value)
        if w.depth >= C_MAX_DEPTH:
            raise nested_too_deep(self.name, w.n, False, MAX_DEPTH)
        w.depth += 1
        try:
            for i in range(self.nfields):
                node = <Node>nodes[i]
                node.enc(w, getattr(value, <str>names[i]))
        except PostcardError as exc:
            exc._prepend(f".{names[i]}")
            raise
        w.depth -= 1
        return 0

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t start = r.pos
        cdef Py_ssize_t i = 0
        cdef Node node
        cdef tuple names = self.names
        cdef tuple nodes = self.nodes
        if r.depth >= C_MAX_DEPTH:
            raise nested_too_deep(self.name, start, True, MAX_DEPTH)
        r.depth += 1
        obj = rapace_pc_new_instance(self.cls, EMPTY_TUPLE)
        try:
            for i in range(self.nfields):
                node = <Node>nodes[i]
                PyObject_GenericSetAttr(obj, names[i], node.dec(r))
        except PostcardError as exc:
            exc._prepend(f".{names[i]}")
            raise
        r.depth -= 1
        if self.post_init is not None:
            try:
                self.post_init(obj)
            except (ValueError, TypeError) as exc:
                raise PostcardError(
                    f"__post_init__ refused the value: {exc}", self.name, start, True
                ) from exc
        return obj


cdef class UnitEnum(Node):
    """An ``enum.Enum``: the varint index of the member in declaration order."""

    cdef readonly object cls
    cdef readonly tuple members
    cdef readonly dict index

    def __init__(self, str name, object cls, members):
        Node.__init__(self, name, 1)
        self.cls = cls
        self.members = tuple(members)
        self.index = {m: i for i, m in enumerate(self.members)}

    cdef int enc(self, WBuf *w, object value) except -1:
        if not isinstance(value, self.cls):
            return wrong_type(self, w, f"a {self.name} member", value)
        return wb_varint(w, <uint64_t>(<Py_ssize_t>self.index[value]))

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t start = r.pos
        cdef uint64_t i = 0
        rb_varint(r, self, 5, 0x0F, "u32", &i)
        if i >= <uint64_t>len(self.members):
            dec_fail(f"unknown variant index {i} ({len(self.members)} variants)", self, start)
        return self.members[<Py_ssize_t>i]


cdef class DataEnum(Node):
    """A ``rapace.DataEnum``: varint variant index, then that variant's fields."""

    cdef readonly object cls
    cdef readonly tuple variants
    cdef readonly tuple labels
    cdef readonly dict index

    def __init__(self, str name, object cls):
        Node.__init__(self, name, 1)
        self.cls = cls
        self.variants = ()
        self.labels = ()
        self.index = {}

    def set_variants(self, variants):
        variants = tuple(variants)
        for v in variants:
            if not isinstance(v, Struct):
                raise TypeError(f"expected a Struct, got {type(v).__name__}")
        self.variants = variants
        self.labels = tuple([f"::{(<Struct>v).cls.__name__}" for v in variants])
        self.index = {(<Struct>v).cls: i for i, v in enumerate(variants)}

    cdef int enc(self, WBuf *w, object value) except -1:
        cdef object found = self.index.get(type(value))
        cdef Py_ssize_t i
        if found is None:
            return wrong_type(self, w, f"a {self.name} variant", value)
        i = found
        wb_varint(w, <uint64_t>i)
        try:
            (<Node>self.variants[i]).enc(w, value)
        except PostcardError as exc:
            exc._prepend(self.labels[i])
            raise
        return 0

    cdef object dec(self, RBuf *r):
        cdef Py_ssize_t start = r.pos
        cdef uint64_t i = 0
        rb_varint(r, self, 5, 0x0F, "u32", &i)
        if i >= <uint64_t>len(self.variants):
            dec_fail(
                f"unknown variant index {i} ({len(self.variants)} variants)", self, start
            )
        try:
            return (<Node>self.variants[<Py_ssize_t>i]).dec(r)
        except PostcardError as exc:
            exc._prepend(self.labels[<Py_ssize_t>i])
            raise


cdef class Codec:
    """A compiled type: ``dumps(value) -> bytes`` and ``loads(data) -> value``."""

    cdef readonly Node node

    def __init__(self, Node node):
        self.node = node

    @property
    def name(self):
        return self.node.name

    def dumps(self, value):
        cdef unsigned char stack[STACK_BUF]
        cdef WBuf w
        w.p = stack
        w.n = 0
        w.cap = STACK_BUF
        w.depth = 0
        w.heap = False
        try:
            self.node.enc(&w, value)
            return PyBytes_FromStringAndSize(<char *>w.p, w.n)
        except PostcardError as exc:
            exc._root(self.node.name)
            raise
        finally:
            if w.heap:
                PyMem_Free(w.p)

    def loads(self, data):
        cdef RBuf r
        if not PyBytes_CheckExact(data):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise not_bytes_like(data)
            data = bytes(data)
        r.p = <const unsigned char *>PyBytes_AS_STRING(data)
        r.pos = 0
        r.end = PyBytes_GET_SIZE(data)
        r.depth = 0
        r.zero_size_left = C_MAX_ZERO_SIZE_ITEMS_PER_MESSAGE
        try:
            value = self.node.dec(&r)
        except PostcardError as exc:
            exc._root(self.node.name)
            raise
        if r.pos != r.end:
            dec_fail(f"{r.end - r.pos} trailing bytes after the value", self.node, r.pos)
        return value

    def __repr__(self):
        return f"<postcard.Codec {self.node.name}>"
