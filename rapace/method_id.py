"""Method ids: FNV-1a 64 over ``"Service.method"``, folded to 32 bits (``docs/protocol.md`` §8)."""

from __future__ import annotations

__all__ = ["compute_method_id"]

_FNV_OFFSET_BASIS = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF


def compute_method_id(service: str, method: str) -> int:
    """Return the 32-bit method id the Rust implementation computes for ``service.method``.

    Computed once per method when a service is defined, so plain Python is fast enough.
    """
    if not isinstance(service, str) or not isinstance(method, str):
        raise TypeError("service and method names must be str")
    h = _FNV_OFFSET_BASIS
    for byte in f"{service}.{method}".encode():
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return (h >> 32) ^ (h & 0xFFFFFFFF)
