"""Backends: implementations of the fused primitives in ``base.Backend``, in one name-keyed registry.

A backend is registered with a factory (``register_backend``); ``get_backend(name)`` returns the shared default
instance, ``get_backend(name, **options)`` a new one built with options (the CUDA backend takes ``allocate`` and
``stream``, which a framework adapter sets per call).  Factories import their kernels on first use, so that
``import ckptnorm`` stays cheap and needs neither Numba's compiler nor a GPU.
"""
from __future__ import annotations

from .base import LAYOUTS, Backend

_FACTORIES: dict = {}   # name -> callable(**options) -> Backend
_DEFAULTS: dict = {}    # name -> the shared instance built without options


def register_backend(name: str, factory) -> None:
    """Register ``factory`` (a ``Backend`` subclass, or any callable returning one) under ``name``."""
    _FACTORIES[name] = factory
    _DEFAULTS.pop(name, None)


def backend_names() -> tuple:
    return tuple(_FACTORIES)


def get_backend(name: str = "cpu", **options) -> Backend:
    """The backend called ``name``: "cpu" (Numba CPU kernels) or "cuda" (numba-cuda kernels in src_cuda/; without
    options: default stream and Numba's own device allocations)."""
    if name not in _FACTORIES:
        raise ValueError(f"ckptnorm: no backend called {name!r}; tip: use one of {', '.join(backend_names())}")
    if options:
        return _FACTORIES[name](**options)
    if name not in _DEFAULTS:
        _DEFAULTS[name] = _FACTORIES[name]()
    return _DEFAULTS[name]


def _cpu(**options):
    from .cpu import CPUBackend
    return CPUBackend(**options)


def _cuda(**options):
    from ckptnorm._cuda.backend import CUDABackend
    return CUDABackend(**options)


register_backend("cpu", _cpu)
register_backend("cuda", _cuda)

__all__ = ["Backend", "LAYOUTS", "backend_names", "get_backend", "register_backend"]
