"""Numba CPU kernels for fused BatchNorm + activation (no torch here: NumPy arrays in, NumPy arrays out).

Every kernel takes a 3-D view of the activation in *memory order*:

    "ncs" layout: shape (N, C, S)  -- NCHW-contiguous input, S = prod(spatial)
    "nsc" layout: shape (N, S, C)  -- channels_last input (and 2-D N x C input, S = 1)

Math (one channel, m = N*S elements; design note ../shared/design/strategies.md):

    forward    y = (x - mean) * invstd * gamma + beta,   z = phi(y)
    reduce     sum_dy = sum(dz * phi'(y)),  sum_dy_xhat = sum(dy * (x - mean) * invstd)          [from x]
               sum_dy = sum(dz * phi'(z)),  sum_dy_ybeta = sum(dy * (phi^-1(z) - beta))          [from z]
    dx         dx = coef_dy * dy + coef_u * u + coef_const,  u = x - mean [from x] or y - beta [from z]

The per-channel coefficients come from ``ckptnorm.strategies``; kernels only stream the data.

Invariants:
 1. Arithmetic is float64 per element; inputs are widened on load and outputs rounded once on store.
 2. Reductions are deterministic: each channel (ncs) or each fixed row chunk (nsc) is summed by one thread in a
    fixed order, and chunk partials are combined in chunk order.  Chunking depends on the shape only, never on
    the thread count, so results are bitwise identical run to run.
 3. Nothing activation-sized is allocated here; callers pass output buffers (which may alias the input).
 4. ``dz`` may have any strides (a stride-0 gradient from ``.sum()`` included): it is only ever indexed.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..activations import ELU, GELU, IDENTITY, LEAKY_RELU, RELU, SILU

# Channels-last reductions split the N*S rows into fixed chunks, each summed by one thread into a row of partials.
# At least NSC_MIN_ROWS_PER_CHUNK rows per chunk (amortizes the partials), at most NSC_MAX_CHUNKS chunks (bounds
# the partials to NSC_MAX_CHUNKS x C floats, whatever the batch size).  Depends on the shape only: deterministic.
NSC_MIN_ROWS_PER_CHUNK = 256
NSC_MAX_CHUNKS = 512
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# ELU inverse: a z rounded onto -alpha would give log1p(-1) = -inf; clamp to a finite y (phi' is ~0 there).
_ELU_INVERSE_CLAMP = -1.0 + 1e-16

_jit = dict(cache=True, nogil=True)


# -- activations (inlined into every kernel; `kind` is loop-invariant, so LLVM unswitches the branch) -------------
@njit(inline="always", **_jit)
def act_forward(y, kind, p):
    if kind == LEAKY_RELU:
        return y if y >= 0.0 else p * y
    if kind == ELU:
        return y if y >= 0.0 else p * math.expm1(y)
    if kind == RELU:
        return y if y > 0.0 else 0.0
    if kind == SILU:
        return y / (1.0 + math.exp(-y))
    if kind == GELU:
        return 0.5 * y * (1.0 + math.erf(y * _SQRT_HALF))
    return y


@njit(inline="always", **_jit)
def act_grad(y, kind, p):
    if kind == LEAKY_RELU:
        return 1.0 if y >= 0.0 else p
    if kind == ELU:
        return 1.0 if y >= 0.0 else p * math.exp(y)
    if kind == RELU:
        return 1.0 if y > 0.0 else 0.0
    if kind == SILU:
        s = 1.0 / (1.0 + math.exp(-y))
        return s * (1.0 + y * (1.0 - s))
    if kind == GELU:
        return 0.5 * (1.0 + math.erf(y * _SQRT_HALF)) + y * math.exp(-0.5 * y * y) * _INV_SQRT_2PI
    return 1.0


@njit(inline="always", **_jit)
def act_inverse(z, kind, p):
    if kind == LEAKY_RELU:
        return z if z >= 0.0 else z / p
    if kind == ELU:
        return z if z >= 0.0 else math.log1p(max(z / p, _ELU_INVERSE_CLAMP))
    return z


@njit(inline="always", **_jit)
def act_grad_from_output(z, kind, p):
    if kind == LEAKY_RELU:
        return 1.0 if z >= 0.0 else p
    if kind == ELU:
        return 1.0 if z >= 0.0 else z + p
    return 1.0


@njit(inline="always", **_jit)
def _chunking(rows):
    n_chunks = min(max((rows + NSC_MIN_ROWS_PER_CHUNK - 1) // NSC_MIN_ROWS_PER_CHUNK, 1), NSC_MAX_CHUNKS)
    return n_chunks, (rows + n_chunks - 1) // n_chunks


# -- per-channel statistics ---------------------------------------------------------------------------------------
# One pass, float64 sums of (x - shift) and (x - shift)^2 with shift = first element of the channel: the shift
# removes the cancellation of E[x^2] - E[x]^2 when |mean| >> std.  min/max are kept for inplace_abn's ELU check.
@njit(parallel=True, **_jit)
def stats_ncs(x, mean, var, xmin, xmax):
    n_batch, channels, spatial = x.shape
    count = n_batch * spatial
    for c in prange(channels):
        shift = np.float64(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        lo = np.inf
        hi = -np.inf
        for n in range(n_batch):
            for s in range(spatial):
                raw = np.float64(x[n, c, s])
                v = raw - shift
                s1 += v
                s2 += v * v
                lo = min(lo, raw)
                hi = max(hi, raw)
        d = s1 / count
        mean[c] = shift + d
        var[c] = max(s2 / count - d * d, 0.0)
        xmin[c] = lo
        xmax[c] = hi


@njit(parallel=True, **_jit)
def stats_nsc(x, mean, var, xmin, xmax):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 4, channels))
    shift = np.empty(channels)
    for c in range(channels):
        shift[c] = x[0, 0, c]
    for k in prange(n_chunks):
        acc = part[k]
        for c in range(channels):
            acc[2, c] = np.inf
            acc[3, c] = -np.inf
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            for c in range(channels):
                raw = np.float64(x[n, s, c])
                v = raw - shift[c]
                acc[0, c] += v
                acc[1, c] += v * v
                acc[2, c] = min(acc[2, c], raw)
                acc[3, c] = max(acc[3, c], raw)
    for c in range(channels):
        s1 = 0.0
        s2 = 0.0
        lo = np.inf
        hi = -np.inf
        for k in range(n_chunks):  # fixed order: deterministic
            s1 += part[k, 0, c]
            s2 += part[k, 1, c]
            lo = min(lo, part[k, 2, c])
            hi = max(hi, part[k, 3, c])
        d = s1 / rows
        mean[c] = shift[c] + d
        var[c] = max(s2 / rows - d * d, 0.0)
        xmin[c] = lo
        xmax[c] = hi


# -- normalize + activation (out may be x itself: each element is read before it is written) ---------------------
@njit(parallel=True, **_jit)
def normalize_act_ncs(x, out, mean, scale, beta, kind, p):
    n_batch, channels, spatial = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        m, a, b = mean[c], scale[c], beta[c]
        for s in range(spatial):
            out[n, c, s] = act_forward((np.float64(x[n, c, s]) - m) * a + b, kind, p)


@njit(parallel=True, **_jit)
def normalize_act_nsc(x, out, mean, scale, beta, kind, p):
    n_batch, spatial, channels = x.shape
    for r in prange(n_batch * spatial):
        n = r // spatial
        s = r - n * spatial
        for c in range(channels):
            out[n, s, c] = act_forward((np.float64(x[n, s, c]) - mean[c]) * scale[c] + beta[c], kind, p)


# -- backward reduction from the input x (y and xhat recomputed on the fly) --------------------------------------
@njit(parallel=True, **_jit)
def reduce_from_input_ncs(x, dz, mean, invstd, scale, beta, kind, p, sum_dy, sum_dy_xhat):
    n_batch, channels, spatial = x.shape
    for c in prange(channels):
        m, inv, a, b = mean[c], invstd[c], scale[c], beta[c]
        s_dy = 0.0
        s_dyx = 0.0
        for n in range(n_batch):
            for s in range(spatial):
                u = np.float64(x[n, c, s]) - m
                dy = np.float64(dz[n, c, s]) * act_grad(u * a + b, kind, p)
                s_dy += dy
                s_dyx += dy * (u * inv)
        sum_dy[c] = s_dy
        sum_dy_xhat[c] = s_dyx


@njit(parallel=True, **_jit)
def reduce_from_input_nsc(x, dz, mean, invstd, scale, beta, kind, p, sum_dy, sum_dy_xhat):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        acc = part[k]
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            for c in range(channels):
                u = np.float64(x[n, s, c]) - mean[c]
                dy = np.float64(dz[n, s, c]) * act_grad(u * scale[c] + beta[c], kind, p)
                acc[0, c] += dy
                acc[1, c] += dy * (u * invstd[c])
    _combine(part, sum_dy, sum_dy_xhat)


# -- backward reduction from the output z (y = phi^-1(z); no xhat, no x) -----------------------------------------
@njit(parallel=True, **_jit)
def reduce_from_output_ncs(z, dz, beta, kind, p, sum_dy, sum_dy_ybeta):
    n_batch, channels, spatial = z.shape
    for c in prange(channels):
        b = beta[c]
        s_dy = 0.0
        s_dyy = 0.0
        for n in range(n_batch):
            for s in range(spatial):
                zv = np.float64(z[n, c, s])
                dy = np.float64(dz[n, c, s]) * act_grad_from_output(zv, kind, p)
                s_dy += dy
                s_dyy += dy * (act_inverse(zv, kind, p) - b)
        sum_dy[c] = s_dy
        sum_dy_ybeta[c] = s_dyy


@njit(parallel=True, **_jit)
def reduce_from_output_nsc(z, dz, beta, kind, p, sum_dy, sum_dy_ybeta):
    n_batch, spatial, channels = z.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        acc = part[k]
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            for c in range(channels):
                zv = np.float64(z[n, s, c])
                dy = np.float64(dz[n, s, c]) * act_grad_from_output(zv, kind, p)
                acc[0, c] += dy
                acc[1, c] += dy * (act_inverse(zv, kind, p) - beta[c])
    _combine(part, sum_dy, sum_dy_ybeta)


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


# -- dx from the input x -------------------------------------------------------------------------------------------
@njit(parallel=True, **_jit)
def dx_from_input_ncs(x, dz, dx, mean, scale, beta, kind, p, coef_dy, coef_u, coef_const):
    n_batch, channels, spatial = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        m, a, b = mean[c], scale[c], beta[c]
        k_dy, k_u, k_0 = coef_dy[c], coef_u[c], coef_const[c]
        for s in range(spatial):
            u = np.float64(x[n, c, s]) - m
            dy = np.float64(dz[n, c, s]) * act_grad(u * a + b, kind, p)
            dx[n, c, s] = k_dy * dy + k_u * u + k_0


@njit(parallel=True, **_jit)
def dx_from_input_nsc(x, dz, dx, mean, scale, beta, kind, p, coef_dy, coef_u, coef_const):
    n_batch, spatial, channels = x.shape
    for r in prange(n_batch * spatial):
        n = r // spatial
        s = r - n * spatial
        for c in range(channels):
            u = np.float64(x[n, s, c]) - mean[c]
            dy = np.float64(dz[n, s, c]) * act_grad(u * scale[c] + beta[c], kind, p)
            dx[n, s, c] = coef_dy[c] * dy + coef_u[c] * u + coef_const[c]


# -- dx from the output z ------------------------------------------------------------------------------------------
@njit(parallel=True, **_jit)
def dx_from_output_ncs(z, dz, dx, beta, kind, p, coef_dy, coef_u, coef_const):
    n_batch, channels, spatial = z.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        b = beta[c]
        k_dy, k_u, k_0 = coef_dy[c], coef_u[c], coef_const[c]
        for s in range(spatial):
            zv = np.float64(z[n, c, s])
            dy = np.float64(dz[n, c, s]) * act_grad_from_output(zv, kind, p)
            dx[n, c, s] = k_dy * dy + k_u * (act_inverse(zv, kind, p) - b) + k_0


@njit(parallel=True, **_jit)
def dx_from_output_nsc(z, dz, dx, beta, kind, p, coef_dy, coef_u, coef_const):
    n_batch, spatial, channels = z.shape
    for r in prange(n_batch * spatial):
        n = r // spatial
        s = r - n * spatial
        for c in range(channels):
            zv = np.float64(z[n, s, c])
            dy = np.float64(dz[n, s, c]) * act_grad_from_output(zv, kind, p)
            dx[n, s, c] = coef_dy[c] * dy + coef_u[c] * (act_inverse(zv, kind, p) - beta[c]) + coef_const[c]
