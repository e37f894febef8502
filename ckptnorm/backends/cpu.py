"""Numba CPU backend: dispatches the primitives of ``Backend`` to the kernels in ``cpu_kernels_linear``
(identity, relu, leaky_relu: branch-free, one pass without scratch) or ``cpu_kernels`` (statistics, and every other
activation -- elu, celu, selu, relu6, hardswish, hardsigmoid, silu, mish, gelu, gelu_tanh, tanh, sigmoid --
evaluated per tile).

Activations may be stored as float64, float32, or fp16/bf16 bits in uint16/int16 arrays (``base``, ``storage``).
Kernels are compiled lazily on first use (one compilation per dtype/layout signature) and cached on disk by
Numba (``cache=True``), so a second process pays no JIT cost.  Numba checks only the kernel module's own source
for staleness: after editing ``storage.py`` or ``activation_math.py`` (inlined into every kernel), clear
``__pycache__`` here.
"""
from __future__ import annotations

import numpy as np

from .base import LAYOUTS, Backend


# (table, layout) -> kernels, filled on first use: the kernel modules are imported then, so that ``import ckptnorm``
# stays cheap and does not load Numba's compiler; afterwards a call costs one dict lookup, not an import statement.
_LOADED = {}


def _table(name, layout=None):
    """``name``: "linear" (branch-free kernels of the piecewise-linear activations), "tiled" (every other
    activation), "stats" (per-channel statistics), or "running_update" (no layout: the buffers are 1-D)."""
    found = _LOADED.get((name, layout))
    if found is None:
        if name == "linear":
            from .cpu_kernels_linear import KERNELS as tables
        else:
            from . import cpu_kernels
            if name == "running_update":
                found = _LOADED[name, layout] = cpu_kernels.running_update
                return found
            tables = cpu_kernels.STATS if name == "stats" else cpu_kernels.KERNELS
        found = _LOADED[name, layout] = tables[_checked(layout)]
    return found


def _kernels(act, layout):
    """The kernels for ``act`` and ``layout``: branch-free ones for piecewise-linear activations, tiled ones
    otherwise."""
    return _table("tiled" if act.linear_slope is None else "linear", layout)


def _checked(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"ckptnorm: unknown layout {layout!r}; tip: use 'ncs' (N, C, S) or 'nsc' (N, S, C)")
    return layout


def _per_channel(values):
    return np.ascontiguousarray(values, dtype=np.float64)


def _act_args(act, from_output=False):
    """The activation arguments of a kernel: (slope, phi'(0)) for the linear kernels (slope only from z), (code,
    param) for the tiled ones."""
    if act.linear_slope is None:
        return act.kernel_code, act.param
    return (act.linear_slope,) if from_output else (act.linear_slope, act.derivative_at_zero)


class CPUBackend(Backend):
    name = "cpu"

    def channel_stats(self, x, layout, with_range=False):
        channels = x.shape[1] if layout == "ncs" else x.shape[2]
        mean, var, xmin, xmax = np.empty((4, channels))  # one allocation; each row is a contiguous array
        _table("stats", layout)(x, mean, var, xmin, xmax, with_range)
        return (mean, var, xmin, xmax) if with_range else (mean, var, None, None)

    def normalize_act(self, x, out, layout, mean, scale, beta, act, residual=None):
        _kernels(act, layout).normalize_act(
            x, out, _per_channel(mean), _per_channel(scale), _per_channel(beta), *_act_args(act, True), residual)

    def reduce_from_input(self, x, dz, layout, mean, invstd, scale, beta, act, residual=None):
        sum_dy, sum_dy_xhat = np.empty(len(mean)), np.empty(len(mean))
        _kernels(act, layout).reduce_from_input(
            x, dz, _per_channel(mean), _per_channel(invstd), _per_channel(scale), _per_channel(beta),
            *_act_args(act), sum_dy, sum_dy_xhat, residual)
        return sum_dy, sum_dy_xhat

    def reduce_from_output(self, z, dz, layout, beta, act, residual=None):
        sum_dy, sum_dy_ybeta = np.empty(len(beta)), np.empty(len(beta))
        _kernels(act, layout).reduce_from_output(
            z, dz, _per_channel(beta), *_act_args(act, True), sum_dy, sum_dy_ybeta, residual)
        return sum_dy, sum_dy_ybeta

    def dx_from_input(self, x, dz, dx, layout, mean, scale, beta, act, coef_dy, coef_u, coef_const, residual=None,
                      dres=None):
        _kernels(act, layout).dx_from_input(
            x, dz, dx, _per_channel(mean), _per_channel(scale), _per_channel(beta), *_act_args(act),
            _per_channel(coef_dy), _per_channel(coef_u), _per_channel(coef_const), residual, dres)

    def dx_from_output(self, z, dz, dx, layout, beta, act, coef_dy, coef_u, coef_const, residual=None, dres=None):
        _kernels(act, layout).dx_from_output(
            z, dz, dx, _per_channel(beta), *_act_args(act, True),
            _per_channel(coef_dy), _per_channel(coef_u), _per_channel(coef_const), residual, dres)

    def update_running_stats(self, running_mean, running_var, mean, var, count, factor):
        _table("running_update")(running_mean, running_var, _per_channel(mean), _per_channel(var), count, float(factor))
