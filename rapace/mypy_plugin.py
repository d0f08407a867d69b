"""A mypy plugin that types the per-call ``timeout=`` keyword of typed clients.

``rapace.client(Calculator, session)`` is typed as ``Calculator`` itself, so that its
methods check against the declaration; but every client method also takes a per-call
``timeout=`` (seconds) that the declaration does not list. Enable the plugin and mypy
accepts ``await calc.add(2, 3, timeout=0.5)`` (and rejects ``timeout="soon"``)::

    [tool.mypy]
    plugins = ["rapace.mypy_plugin"]

Only a receiver typed as the ``@rapace.service`` declaration itself gains the keyword:
an implementation class (a subclass) keeps its own signatures, since calling it directly
is a local call with no deadline. Without the plugin, ``rapace.with_timeout(calc, 0.5)``
is the typed way to give one call its own deadline.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.nodes import ARG_NAMED_OPT
from mypy.plugin import ClassDefContext, MethodSigContext, Plugin
from mypy.types import CallableType, Instance, NoneType, UnionType
from mypy.types import Type as MypyType

__all__ = ["plugin"]

_SERVICE_DECORATOR = "rapace.service.service"
_MARK = "rapace"
"""The key of a declaration's TypeInfo metadata that says it is a service."""


class RapacePlugin(Plugin):
    """Marks ``@rapace.service`` classes, then adds ``timeout`` to calls on them."""

    def get_class_decorator_hook(self, fullname: str) -> Callable[[ClassDefContext], None] | None:
        return _mark_service if fullname == _SERVICE_DECORATOR else None

    def get_method_signature_hook(
        self, fullname: str
    ) -> Callable[[MethodSigContext], CallableType] | None:
        class_name, _, method = fullname.rpartition(".")
        if method.startswith("_"):
            return None
        symbol = self.lookup_fully_qualified(class_name)
        node = symbol.node if symbol is not None else None
        metadata = getattr(node, "metadata", None)
        if not isinstance(metadata, dict) or _MARK not in metadata:
            return None
        return _with_timeout_keyword


def _mark_service(ctx: ClassDefContext) -> None:
    ctx.cls.info.metadata[_MARK] = {"service": True}


def _with_timeout_keyword(ctx: MethodSigContext) -> CallableType:
    signature = ctx.default_signature
    receiver = ctx.type
    if not (isinstance(receiver, Instance) and _MARK in receiver.type.metadata):
        return signature  # a subclass (an implementation): its own signature stands
    if "timeout" in signature.arg_names:
        return signature  # the runtime refuses such a declaration already
    seconds: MypyType = UnionType.make_union(
        [ctx.api.named_generic_type("builtins.float", []), NoneType()]
    )
    # Service methods take plain positional parameters only (no ``*args``/``**kwargs``:
    # the runtime refuses them), so the keyword goes last.
    return signature.copy_modified(
        arg_types=[*signature.arg_types, seconds],
        arg_kinds=[*signature.arg_kinds, ARG_NAMED_OPT],
        arg_names=[*signature.arg_names, "timeout"],
    )


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point: the plugin class, for every mypy version that has this API."""
    del version
    return RapacePlugin
