"""Backends: implementations of the fused primitives in ``base.Backend``, looked up by name."""
from __future__ import annotations

from .base import LAYOUTS, Backend

_BACKENDS: dict = {}


def get_backend(name: str = "cpu") -> Backend:
    """Return the backend called ``name`` ("cpu"; "cuda" arrives with the CUDA kernels in src_cuda/)."""
    if name not in _BACKENDS:
        if name == "cpu":
            from .cpu import CPUBackend
            _BACKENDS[name] = CPUBackend()
        else:
            raise ValueError(f"ckptnorm: no backend called {name!r} is available; tip: use 'cpu' "
                             "(the CUDA backend is not implemented yet)")
    return _BACKENDS[name]


__all__ = ["Backend", "LAYOUTS", "get_backend"]
