"""Shared pieces of the Numba CPU kernels (``cpu_kernels``, ``cpu_kernels_linear``): compile options, launch
geometry, the per-tile activation loops and the deterministic combination of chunk partials.

The per-tile loops take the activation's branch on ``kind`` once per tile, then run a simple loop that vectorizes;
the per-element formulas are ``activation_math``'s (shared with the CUDA kernels).
"""
from __future__ import annotations

from numba import njit

from ..activations import (CELU, ELU, GELU, GELU_TANH, HARDSIGMOID, HARDSWISH, LEAKY_RELU, MISH, RELU, RELU6, SELU,
                           SIGMOID, SILU, TANH)  # anything else: identity
from . import activation_math as am

# Channels-last reductions split the N*S rows into fixed chunks, each summed by one thread into a row of partials.
# At least NSC_MIN_ROWS_PER_CHUNK rows per chunk (amortizes the partials), at most NSC_MAX_CHUNKS chunks (bounds
# the partials to NSC_MAX_CHUNKS x C floats, whatever the batch size).  Depends on the shape only: deterministic.
NSC_MIN_ROWS_PER_CHUNK = 256
NSC_MAX_CHUNKS = 512
# Elements of one channel handled per tile in the "ncs" kernels (float64 scratch: 2 KiB, stays in L1).  Tiles are
# taken as 1-D slices so that indices are provably non-negative (no wraparound checks): the loops vectorize.
TILE = 256

_jit = dict(cache=True, nogil=True)
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
