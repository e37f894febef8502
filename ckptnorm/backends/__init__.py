"""Backends: implementations of the fused primitives in ``base.Backend``, looked up by name."""
from __future__ import annotations

from .base import LAYOUTS, Backend

_BACKENDS: dict = {}


def get_backend(name: str = "cpu") -> Backend:
    """Return the backend called ``name``: "cpu" (Numba CPU kernels) or "cuda" (numba-cuda kernels in src_cuda/,
    default stream and Numba's own device allocations; framework adapters build theirs with an allocator)."""
    if name not in _BACKENDS:
        if name == "cpu":
            from .cpu import CPUBackend
            _BACKENDS[name] = CPUBackend()
        elif name == "cuda":
            from ckptnorm._cuda.backend import CUDABackend
            _BACKENDS[name] = CUDABackend()
        else:
            raise ValueError(f"ckptnorm: no backend called {name!r}; tip: use 'cpu' or 'cuda'")
    return _BACKENDS[name]


__all__ = ["Backend", "LAYOUTS", "get_backend"]
