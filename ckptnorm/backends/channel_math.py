"""Per-channel formulas as scalar float64 functions, compiled into the CPU and the CUDA kernels alike.

The formulas themselves live in the framework-agnostic core, written with arithmetic operators only, so that they
also run on whole arrays (NumPy, a framework's device arrays); here Numba compiles those very functions for scalars
(numba-cuda takes them as device functions), so a kernel and the array path cannot drift apart.

Numba checks only the calling kernel module's source for staleness of its disk cache: after editing a formula in
``ckptnorm/channel_stats.py``, clear ``ckptnorm/backends/__pycache__`` and ``src_cuda/__pycache__``.
"""
from __future__ import annotations

from numba import njit

from ..channel_stats import updated_running_stats

running_stats_step = njit(cache=True, nogil=True)(updated_running_stats)
