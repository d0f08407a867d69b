"""``python -m rapace call`` and ``ping``: a service's methods from the shell.

``call`` imports the service declaration (``--service pkg.mod:Calculator``, or
``path/to/file.py:Calculator``), converts the ``--json`` arguments to the values its type
hints describe (``rapace.jsonvalues``), calls the method and prints the result as one
JSON line, or one line per item for a streaming method. Errors go to stderr; the exit
status is 1 for an error answered by the peer, 2 for a usage or connection problem.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from rapace.connection import connect
from rapace.errors import ConnectionFailed, RpcError
from rapace.jsonvalues import from_json, to_json
from rapace.methods import MethodInfo, ServiceInfo, service_info
from rapace.service import client

__all__ = ["UsageError", "call", "load_service", "ping", "resolve_method"]


class UsageError(Exception):
    """A bad command line (exit status 2), with the message to print."""


def load_service(spec: str) -> type:
    """The ``@rapace.service`` class named by ``module:Class`` or ``file.py:Class``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--service {spec!r}: expected 'package.module:Class' or 'file.py:Class'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"--service {spec!r}: no such file {module_name}")
        sys.path.insert(0, str(path.resolve().parent))  # its own imports, as `python file.py`
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        assert loaded is not None and loaded.loader is not None
        module = importlib.util.module_from_spec(loaded)
        sys.modules[path.stem] = module
        loaded.loader.exec_module(module)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # a module in the current directory, as `python -m`
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"--service {spec!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not isinstance(
        vars(cls).get("__rapace_service__"), ServiceInfo
    ):
        raise UsageError(f"--service {spec!r}: {attr} is not a @rapace.service class")
    return cls


def resolve_method(services: Sequence[type], name: str) -> tuple[type, MethodInfo]:
    """The service class and method ``Service.method`` (or just ``method``) names."""
    service_name, _, method_name = name.rpartition(".")
    found: list[tuple[type, MethodInfo]] = []
    for cls in services:
        for info in service_info(cls):
            if service_name and info.name != service_name:
                continue
            method = info.methods.get(method_name)
            if method is not None:
                found.append((cls, method))
    if not found:
        known = ", ".join(
            m.full_name for c in services for i in service_info(c) for m in i.methods.values()
        )
        raise UsageError(f"no method {name!r} in the given services (they have: {known})")
    if len(found) > 1:
        raise UsageError(f"{name!r} is ambiguous: name it Service.method")
    return found[0]


def convert_args(method: MethodInfo, text: str) -> dict[str, Any]:
    """``--json``: an object of parameters by name, an array of them in order, or (for a
    one-parameter method) that parameter's value itself."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json is not valid JSON: {exc}") from exc
    names = method.param_names
    if len(names) == 1 and not (isinstance(value, dict) and set(value) == {names[0]}):
        value = {names[0]: value}  # the one parameter's own value
    elif isinstance(value, list):
        if len(value) > len(names):
            raise UsageError(f"{method.full_name} takes {len(names)} arguments, got {len(value)}")
        value = dict(zip(names, value, strict=False))
    elif not isinstance(value, dict):
        expected = ", ".join(names) or "nothing"
        raise UsageError(f"--json for {method.full_name}: an object or array of {expected}")
    unknown = set(value) - set(names)
    if unknown:
        raise UsageError(
            f"{method.full_name} has no parameter {sorted(unknown)[0]!r} ({', '.join(names)})"
        )
    params = method.signature.parameters
    args: dict[str, Any] = {}
    for name, tp in zip(names, method.arg_types, strict=True):
        if name not in value:
            if params[name].default is params[name].empty:
                raise UsageError(f"{method.full_name}: missing argument {name!r}")
            continue
        try:
            args[name] = from_json(value[name], tp, name)
        except ValueError as exc:
            raise UsageError(f"{method.full_name}: {exc}") from exc
    return args


async def call(
    address: str,
    services: Sequence[type],
    name: str,
    json_args: str = "{}",
    *,
    timeout: float = 10.0,
    out: TextIO = sys.stdout,
) -> None:
    """Call ``name`` at ``address`` with ``json_args``; print the result as JSON lines."""
    cls, method = resolve_method(services, name)
    if method.tunnel:
        raise UsageError(f"{method.full_name} is a tunnel: it carries bytes, not JSON values")
    args = convert_args(method, json_args)
    async with connect(address, call_timeout=timeout) as session:
        stub: Any = client(cls, session, timeout=timeout)
        bound = getattr(stub, method.name)
        if method.streaming:
            async for item in bound(**args):
                print(json.dumps(to_json(item)), file=out, flush=True)
        else:
            print(json.dumps(to_json(await bound(**args))), file=out, flush=True)


async def ping(
    address: str, *, count: int = 1, timeout: float = 5.0, out: TextIO = sys.stdout
) -> None:
    """Ping ``address`` ``count`` times; print each round trip in milliseconds."""
    async with connect(address, keepalive=None) as session:
        for _ in range(count):
            rtt = await session.ping(timeout)
            print(f"pong from {address}: {rtt * 1e3:.3f} ms", file=out, flush=True)


def report(exc: BaseException) -> int:
    """Print ``exc`` for a shell user; the exit status it deserves."""
    if isinstance(exc, UsageError):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, ConnectionFailed):
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, RpcError):
        print(f"error: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
    raise exc
