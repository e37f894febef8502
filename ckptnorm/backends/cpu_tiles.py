"""Shared pieces of the Numba CPU kernels (``cpu_kernels``, ``cpu_kernels_linear``): compile options, launch
geometry, the per-tile activation loops, what every backward kernel of ``cpu_kernels`` computes first for a tile or
a row, the deterministic combination of chunk partials, and the table type of the kernels per layout.

The per-tile loops take the activation's branch on ``kind`` once per tile, then run a simple loop that vectorizes;
the per-element formulas are ``activation_math``'s (shared with the CUDA kernels).
"""
from __future__ import annotations

from typing import NamedTuple

from numba import njit

from ..activations import (CELU, ELU, GELU, GELU_TANH, HARDSIGMOID, HARDSWISH, LEAKY_RELU, MISH, RELU, RELU6, SELU,
                           SIGMOID, SILU, TANH)  # anything else: identity
from . import activation_math as am
from .storage import widen

# Channels-last reductions split the N*S rows into fixed chunks, each summed by one thread into a row of partials.
# At least NSC_MIN_ROWS_PER_CHUNK rows per chunk (amortizes the partials), at most NSC_MAX_CHUNKS chunks (bounds
# the partials to NSC_MAX_CHUNKS x C floats, whatever the batch size).  Depends on the shape only: deterministic.
NSC_MIN_ROWS_PER_CHUNK = 256
NSC_MAX_CHUNKS = 512
# Elements of one channel handled per tile in the "ncs" kernels (float64 scratch: 2 KiB, stays in L1).  Tiles are
# taken as 1-D slices so that indices are provably non-negative (no wraparound checks): the loops vectorize.
TILE = 256


class LayoutKernels(NamedTuple):
    """One kernel module's kernels for one layout, as ``CPUBackend`` calls them (its ``KERNELS[layout]``)."""

    normalize_act: object
    reduce_from_input: object
    reduce_from_output: object
    dx_from_input: object
    dx_from_output: object


_jit = dict(cache=True, nogil=True)
# The kernels' ``parallel=``: only their explicit ``prange`` loops run in parallel.  Numba's other conversions to
# parallel loops (array expressions, reductions, ``np.zeros`` and friends) have nothing to gain in these kernels,
# and their analysis costs compile time on every specialization (all kernels, one float32 signature per layout,
# empty cache: 50 s with ``parallel=True``, 44 s with this; run time the same within noise).
PRANGE_ONLY = dict(prange=True, fusion=False, comprehension=False, setitem=False, reduction=False, numpy=False,
                   stencil=False, inplace_binop=False)
# Reductions may reorder their float64 sums (vectorized partial sums); the order is fixed at compile time, so
# results stay bitwise deterministic run to run.
_reduce_jit = dict(_jit, fastmath={"reassoc", "contract"})


# -- activations over a tile: one branch on `kind` per tile, then a simple loop ------------------------------------
# The per-element math is ``activation_math``'s (shared with the CUDA kernels); only the dispatch is here, a loop per
# activation so that each vectorizes (a branch on `kind` per element halved the speed of gelu's reduction).
# Compiled once, then called per tile, not inlined into every kernel: fifteen loops in each kernel specialization
# (layouts x storage formats x residual variants) doubled the cold compile time; a call per tile costs nothing at
# TILE = 256 and about 10% in "nsc" rows of only 4 channels.
@njit(**_jit)
def act_forward_tile(y, k, kind, p):
    """y[:k] = phi(y[:k]) in place."""
    if kind == LEAKY_RELU:
        for j in range(k):
            y[j] = am.leaky_relu(y[j], p)
    elif kind == ELU:
        for j in range(k):
            y[j] = am.elu(y[j], p)
    elif kind == RELU:
        for j in range(k):
            y[j] = am.relu(y[j])
    elif kind == SILU:
        for j in range(k):
            y[j] = am.silu(y[j])
    elif kind == GELU:
        for j in range(k):
            y[j] = am.gelu(y[j])
    elif kind == RELU6:
        for j in range(k):
            y[j] = am.relu6(y[j])
    elif kind == HARDSWISH:
        for j in range(k):
            y[j] = am.hardswish(y[j])
    elif kind == HARDSIGMOID:
        for j in range(k):
            y[j] = am.hardsigmoid(y[j])
    elif kind == MISH:
        for j in range(k):
            y[j] = am.mish(y[j])
    elif kind == GELU_TANH:
        for j in range(k):
            y[j] = am.gelu_tanh(y[j])
    elif kind == SELU:
        for j in range(k):
            y[j] = am.selu(y[j])
    elif kind == CELU:
        for j in range(k):
            y[j] = am.celu(y[j], p)
    elif kind == TANH:
        for j in range(k):
            y[j] = am.tanh(y[j])
    elif kind == SIGMOID:
        for j in range(k):
            y[j] = am.sigmoid(y[j])


@njit(**_jit)
def act_grad_tile(y, g, k, kind, p):
    """g[:k] = phi'(y[:k])."""
    if kind == LEAKY_RELU:
        for j in range(k):
            g[j] = am.leaky_relu_grad(y[j], p)
    elif kind == ELU:
        for j in range(k):
            g[j] = am.elu_grad(y[j], p)
    elif kind == RELU:
        for j in range(k):
            g[j] = am.relu_grad(y[j])
    elif kind == SILU:
        for j in range(k):
            g[j] = am.silu_grad(y[j])
    elif kind == GELU:
        for j in range(k):
            g[j] = am.gelu_grad(y[j])
    elif kind == RELU6:
        for j in range(k):
            g[j] = am.relu6_grad(y[j])
    elif kind == HARDSWISH:
        for j in range(k):
            g[j] = am.hardswish_grad(y[j])
    elif kind == HARDSIGMOID:
        for j in range(k):
            g[j] = am.hardsigmoid_grad(y[j])
    elif kind == MISH:
        for j in range(k):
            g[j] = am.mish_grad(y[j])
    elif kind == GELU_TANH:
        for j in range(k):
            g[j] = am.gelu_tanh_grad(y[j])
    elif kind == SELU:
        for j in range(k):
            g[j] = am.selu_grad(y[j])
    elif kind == CELU:
        for j in range(k):
            g[j] = am.celu_grad(y[j], p)
    elif kind == TANH:
        for j in range(k):
            g[j] = am.tanh_grad(y[j])
    elif kind == SIGMOID:
        for j in range(k):
            g[j] = am.sigmoid_grad(y[j])
    else:
        for j in range(k):
            g[j] = 1.0


@njit(**_jit)
def act_inverse_tile(z, g, k, kind, p):
    """From z[:k] = phi(y): g[:k] = phi'(y), then z[:k] = y in place (invertible activations only)."""
    if kind == LEAKY_RELU:
        for j in range(k):
            v = z[j]
            g[j] = am.leaky_relu_grad_from_output(v, p)
            z[j] = am.leaky_relu_inverse(v, p)
    elif kind == ELU:
        for j in range(k):
            v = z[j]
            g[j] = am.elu_grad_from_output(v, p)
            z[j] = am.elu_inverse(v, p)
    elif kind == CELU:
        for j in range(k):
            v = z[j]
            g[j] = am.celu_grad_from_output(v, p)
            z[j] = am.celu_inverse(v, p)
    elif kind == SELU:
        for j in range(k):
            v = z[j]
            g[j] = am.selu_grad_from_output(v)
            z[j] = am.selu_inverse(v)
    else:
        for j in range(k):
            g[j] = 1.0


@njit(inline="always", **_jit)
def _chunking(rows):
    n_chunks = min(max((rows + NSC_MIN_ROWS_PER_CHUNK - 1) // NSC_MIN_ROWS_PER_CHUNK, 1), NSC_MAX_CHUNKS)
    return n_chunks, (rows + n_chunks - 1) // n_chunks


@njit(**_jit)
def _combine(part, first, second):
    n_chunks, _, channels = part.shape
    for c in range(channels):
        s0 = 0.0
        s1 = 0.0
        for k in range(n_chunks):  # fixed order: deterministic
            s0 += part[k, 0, c]
            s1 += part[k, 1, c]
        first[c] = s0
        second[c] = s1


# -- what every backward kernel computes first for a tile ("ncs") or a row ("nsc") ---------------------------------
# One function per (source, layout), inlined into the kernels (as written there, a call per row of a channels-last
# kernel with few channels cost up to 1.4x); the ``residual is None`` branch is pruned at compile time as in the
# kernels themselves.
@njit(inline="always", **_jit)
def _from_input_tile(x_t, residual, n, c, s0, m, a, b, kind, p, u, y, g):
    """For x_t = x[n, c, s0:s0 + k]: u = x - mean, y = u * scale + beta [+ r], g = phi'(y), in u, y, g[:k]."""
    k = len(x_t)
    for j in range(k):
        u[j] = widen(x_t[j]) - m
        y[j] = u[j] * a + b
    if residual is not None:
        r_t = residual[n, c, s0:s0 + k]
        for j in range(k):
            y[j] += widen(r_t[j])
    act_grad_tile(y, g, k, kind, p)


@njit(inline="always", **_jit)
def _from_input_row(x_r, residual, n, s, mean, scale, beta, kind, p, u, y, g):
    """For the row x_r = x[n, s] of C channels: u, y, g as in ``_from_input_tile``, per channel."""
    channels = len(x_r)
    for c in range(channels):
        u[c] = widen(x_r[c]) - mean[c]
        y[c] = u[c] * scale[c] + beta[c]
    if residual is not None:
        for c in range(channels):
            y[c] += widen(residual[n, s, c])
    act_grad_tile(y, g, channels, kind, p)


@njit(inline="always", **_jit)
def _from_output_tile(z_t, residual, n, c, s0, kind, p, y, g):
    """For z_t = z[n, c, s0:s0 + k]: y = phi^-1(z) [- r] and g = phi' at the pre-activation, in y, g[:k]."""
    k = len(z_t)
    for j in range(k):
        y[j] = widen(z_t[j])
    act_inverse_tile(y, g, k, kind, p)
    if residual is not None:  # z = phi(y + r): subtract r from the inverted pre-activation
        r_t = residual[n, c, s0:s0 + k]
        for j in range(k):
            y[j] -= widen(r_t[j])


@njit(inline="always", **_jit)
def _from_output_row(z_r, residual, n, s, kind, p, y, g):
    """For the row z_r = z[n, s]: y, g as in ``_from_output_tile``, per channel."""
    channels = len(z_r)
    for c in range(channels):
        y[c] = widen(z_r[c])
    act_inverse_tile(y, g, channels, kind, p)
    if residual is not None:
        for c in range(channels):
            y[c] -= widen(residual[n, s, c])
