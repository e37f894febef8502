"""Numba CPU kernels for fused BatchNorm + activation (no torch here: NumPy arrays in, NumPy arrays out).

Every kernel takes a 3-D view of the activation in *memory order*:

    "ncs" layout: shape (N, C, S)  -- NCHW-contiguous input, S = prod(spatial)
    "nsc" layout: shape (N, S, C)  -- channels_last input (and 2-D N x C input, S = 1)

Math (one channel, m = N*S elements; design note docs/design.md):

    forward    y = (x - mean) * invstd * gamma + beta,   z = phi(y)
    reduce     sum_dy = sum(dz * phi'(y)),  sum_dy_xhat = sum(dy * (x - mean) * invstd)          [from x]
               sum_dy = sum(dz * phi'(z)),  sum_dy_ybeta = sum(dy * (phi^-1(z) - beta))          [from z]
    dx         dx = coef_dy * dy + coef_u * u + coef_const,  u = x - mean [from x] or y - beta [from z]

Residual sites, z = phi(y + r) (``residual`` given, any strides): phi and phi' see ``y + r``; from z,
y = phi^-1(z) - r; the dx kernels also write ``dres = dy`` when ``dres`` is given.  ``residual``/``dres`` are None
otherwise, and Numba prunes their branches at compile time (a separate specialization; the plain path is unchanged).

The per-channel coefficients come from ``ckptnorm.strategies``; kernels only stream the data.

Invariants:
 1. Arithmetic is float64 per element: every activation-sized load goes through ``widen`` and every store through
    ``narrow`` (``storage``), which the element type selects at compile time: a plain conversion for
    float32/float64, IEEE binary16 bits for uint16 arrays, bfloat16 bits for int16 arrays (rounded once, to
    nearest even).  Each array is converted on its own, so mixed storage (fp16 x, float32 dz) needs nothing
    special, and a float32 kernel compiles to the same code as before half precision existed.
    Elements are processed in tiles (TILE elements of a channel in "ncs", one row of C channels in "nsc"): the
    activation's branch on ``kind`` is taken once per tile (``cpu_tiles.act_*_tile``, called per tile), so the
    per-element loops are simple and vectorize.
    The per-element formulas are ``activation_math``'s, shared with the CUDA kernels and inlined here; the
    per-tile loops and the backward kernels' common first steps are ``cpu_tiles``'.  Numba's disk cache does not
    notice edits in those modules (nor in ``storage``): clear ``__pycache__`` after editing any of them.
 2. Reductions are deterministic: each channel (ncs) or each fixed row chunk (nsc) is summed by one thread in a
    fixed order, and chunk partials are combined in chunk order.  Chunking depends on the shape only, never on
    the thread count, so results are bitwise identical run to run.
 3. Nothing activation-sized is allocated here; callers pass output buffers (which may alias the input).
 4. ``dz`` may have any strides (a stride-0 gradient from ``.sum()`` included): it is only ever indexed.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_tiles import (PRANGE_ONLY, TILE, LayoutKernels, _chunking, _combine, _from_input_row, _from_input_tile,
                        _from_output_row, _from_output_tile, _jit, _reduce_jit, act_forward_tile)
from .channel_math import running_stats_step
from .storage import narrow, widen

# -- per-channel statistics ---------------------------------------------------------------------------------------
# One pass, float64 sums of (x - shift) and (x - shift)^2 with shift = first element of the channel: the shift
# removes the cancellation of E[x^2] - E[x]^2 when |mean| >> std.  min/max only when asked (inplace_abn's ELU
# check): the comparisons would keep the sums from vectorizing.
@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def stats_ncs(x, mean, var, xmin, xmax, with_range):
    n_batch, channels, spatial = x.shape
    count = n_batch * spatial
    for c in prange(channels):
        shift = widen(x[0, c, 0])
        s1 = 0.0
        s2 = 0.0
        lo = np.inf
        hi = -np.inf
        for n in range(n_batch):
            x_row = x[n, c]
            for s in range(spatial):
                v = widen(x_row[s]) - shift
                s1 += v
                s2 += v * v
            if with_range:
                for s in range(spatial):
                    lo = min(lo, widen(x_row[s]))
                    hi = max(hi, widen(x_row[s]))
        d = s1 / count
        mean[c] = shift + d
        var[c] = max(s2 / count - d * d, 0.0)
        xmin[c] = lo
        xmax[c] = hi


@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def stats_nsc(x, mean, var, xmin, xmax, with_range):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 4, channels))
    shift = np.empty(channels)
    for c in range(channels):
        shift[c] = widen(x[0, 0, c])
    for k in prange(n_chunks):
        acc = part[k]
        for c in range(channels):
            acc[2, c] = np.inf
            acc[3, c] = -np.inf
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            for c in range(channels):
                v = widen(x[n, s, c]) - shift[c]
                acc[0, c] += v
                acc[1, c] += v * v
            if with_range:
                for c in range(channels):
                    acc[2, c] = min(acc[2, c], widen(x[n, s, c]))
                    acc[3, c] = max(acc[3, c], widen(x[n, s, c]))
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


# -- normalize + activation (out may be x itself: each tile is read before it is written) -------------------------
@njit(parallel=PRANGE_ONLY, **_jit)
def normalize_act_ncs(x, out, mean, scale, beta, kind, p, residual):
    n_batch, channels, spatial = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        m, a, b = mean[c], scale[c], beta[c]
        y = np.empty(TILE)
        for s0 in range(0, spatial, TILE):
            k = min(TILE, spatial - s0)
            x_t, out_t = x[n, c, s0:s0 + k], out[n, c, s0:s0 + k]
            for j in range(k):
                y[j] = (widen(x_t[j]) - m) * a + b
            if residual is not None:
                r_t = residual[n, c, s0:s0 + k]
                for j in range(k):
                    y[j] += widen(r_t[j])
            act_forward_tile(y, k, kind, p)
            for j in range(k):
                out_t[j] = narrow(y[j], out_t)


@njit(parallel=PRANGE_ONLY, **_jit)
def normalize_act_nsc(x, out, mean, scale, beta, kind, p, residual):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    for k in prange(n_chunks):
        y = np.empty(channels)
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            for c in range(channels):
                y[c] = (widen(x[n, s, c]) - mean[c]) * scale[c] + beta[c]
            if residual is not None:
                for c in range(channels):
                    y[c] += widen(residual[n, s, c])
            act_forward_tile(y, channels, kind, p)
            for c in range(channels):
                out[n, s, c] = narrow(y[c], out)


# -- backward reduction from the input x (y and xhat recomputed on the fly) --------------------------------------
@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_input_ncs(x, dz, mean, invstd, scale, beta, kind, p, sum_dy, sum_dy_xhat, residual):
    n_batch, channels, spatial = x.shape
    for c in prange(channels):
        m, a, b = mean[c], scale[c], beta[c]
        u = np.empty(TILE)
        y = np.empty(TILE)
        g = np.empty(TILE)
        s_dy = 0.0
        s_dyu = 0.0
        for n in range(n_batch):
            for s0 in range(0, spatial, TILE):
                k = min(TILE, spatial - s0)
                x_t, dz_t = x[n, c, s0:s0 + k], dz[n, c, s0:s0 + k]
                _from_input_tile(x_t, residual, n, c, s0, m, a, b, kind, p, u, y, g)
                for j in range(k):
                    dy = widen(dz_t[j]) * g[j]
                    s_dy += dy
                    s_dyu += dy * u[j]
        sum_dy[c] = s_dy
        sum_dy_xhat[c] = s_dyu * invstd[c]


@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_input_nsc(x, dz, mean, invstd, scale, beta, kind, p, sum_dy, sum_dy_xhat, residual):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        acc = part[k]
        u = np.empty(channels)
        y = np.empty(channels)
        g = np.empty(channels)
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            _from_input_row(x[n, s], residual, n, s, mean, scale, beta, kind, p, u, y, g)
            for c in range(channels):
                dy = widen(dz[n, s, c]) * g[c]
                acc[0, c] += dy
                acc[1, c] += dy * u[c]
    _combine(part, sum_dy, sum_dy_xhat)
    for c in range(channels):
        sum_dy_xhat[c] *= invstd[c]


# -- backward reduction from the output z (y = phi^-1(z); no xhat, no x) -----------------------------------------
@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_output_ncs(z, dz, beta, kind, p, sum_dy, sum_dy_ybeta, residual):
    n_batch, channels, spatial = z.shape
    for c in prange(channels):
        b = beta[c]
        y = np.empty(TILE)
        g = np.empty(TILE)
        s_dy = 0.0
        s_dyy = 0.0
        for n in range(n_batch):
            for s0 in range(0, spatial, TILE):
                k = min(TILE, spatial - s0)
                z_t, dz_t = z[n, c, s0:s0 + k], dz[n, c, s0:s0 + k]
                _from_output_tile(z_t, residual, n, c, s0, kind, p, y, g)
                for j in range(k):
                    dy = widen(dz_t[j]) * g[j]
                    s_dy += dy
                    s_dyy += dy * (y[j] - b)
        sum_dy[c] = s_dy
        sum_dy_ybeta[c] = s_dyy


@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_output_nsc(z, dz, beta, kind, p, sum_dy, sum_dy_ybeta, residual):
    n_batch, spatial, channels = z.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        acc = part[k]
        y = np.empty(channels)
        g = np.empty(channels)
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            _from_output_row(z[n, s], residual, n, s, kind, p, y, g)
            for c in range(channels):
                dy = widen(dz[n, s, c]) * g[c]
                acc[0, c] += dy
                acc[1, c] += dy * (y[c] - beta[c])
    _combine(part, sum_dy, sum_dy_ybeta)


# -- dx from the input x -------------------------------------------------------------------------------------------
@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_input_ncs(x, dz, dx, mean, scale, beta, kind, p, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, channels, spatial = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        m, a, b = mean[c], scale[c], beta[c]
        k_dy, k_u, k_0 = coef_dy[c], coef_u[c], coef_const[c]
        u = np.empty(TILE)
        y = np.empty(TILE)
        g = np.empty(TILE)
        for s0 in range(0, spatial, TILE):
            k = min(TILE, spatial - s0)
            x_t, dz_t, dx_t = x[n, c, s0:s0 + k], dz[n, c, s0:s0 + k], dx[n, c, s0:s0 + k]
            _from_input_tile(x_t, residual, n, c, s0, m, a, b, kind, p, u, y, g)
            for j in range(k):
                dx_t[j] = narrow(k_dy * (widen(dz_t[j]) * g[j]) + k_u * u[j] + k_0, dx_t)
            if dres is not None:
                dres_t = dres[n, c, s0:s0 + k]
                for j in range(k):
                    dres_t[j] = narrow(widen(dz_t[j]) * g[j], dres_t)


@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_input_nsc(x, dz, dx, mean, scale, beta, kind, p, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    for k in prange(n_chunks):
        u = np.empty(channels)
        y = np.empty(channels)
        g = np.empty(channels)
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            _from_input_row(x[n, s], residual, n, s, mean, scale, beta, kind, p, u, y, g)
            for c in range(channels):
                dx[n, s, c] = narrow(coef_dy[c] * (widen(dz[n, s, c]) * g[c]) + coef_u[c] * u[c] + coef_const[c],
                                     dx)
            if dres is not None:
                for c in range(channels):
                    dres[n, s, c] = narrow(widen(dz[n, s, c]) * g[c], dres)


# -- dx from the output z ------------------------------------------------------------------------------------------
@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_output_ncs(z, dz, dx, beta, kind, p, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, channels, spatial = z.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        b = beta[c]
        k_dy, k_u, k_0 = coef_dy[c], coef_u[c], coef_const[c]
        y = np.empty(TILE)
        g = np.empty(TILE)
        for s0 in range(0, spatial, TILE):
            k = min(TILE, spatial - s0)
            z_t, dz_t, dx_t = z[n, c, s0:s0 + k], dz[n, c, s0:s0 + k], dx[n, c, s0:s0 + k]
            _from_output_tile(z_t, residual, n, c, s0, kind, p, y, g)
            for j in range(k):
                dx_t[j] = narrow(k_dy * (widen(dz_t[j]) * g[j]) + k_u * (y[j] - b) + k_0, dx_t)
            if dres is not None:
                dres_t = dres[n, c, s0:s0 + k]
                for j in range(k):
                    dres_t[j] = narrow(widen(dz_t[j]) * g[j], dres_t)


@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_output_nsc(z, dz, dx, beta, kind, p, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, spatial, channels = z.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    for k in prange(n_chunks):
        y = np.empty(channels)
        g = np.empty(channels)
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            _from_output_row(z[n, s], residual, n, s, kind, p, y, g)
            for c in range(channels):
                dx[n, s, c] = narrow(coef_dy[c] * (widen(dz[n, s, c]) * g[c]) + coef_u[c] * (y[c] - beta[c])
                                     + coef_const[c], dx)
            if dres is not None:
                for c in range(channels):
                    dres[n, s, c] = narrow(widen(dz[n, s, c]) * g[c], dres)


# The kernels per layout, as ``CPUBackend`` looks them up.
KERNELS = {
    "ncs": LayoutKernels(normalize_act_ncs, reduce_from_input_ncs, reduce_from_output_ncs, dx_from_input_ncs,
                         dx_from_output_ncs),
    "nsc": LayoutKernels(normalize_act_nsc, reduce_from_input_nsc, reduce_from_output_nsc, dx_from_input_nsc,
                         dx_from_output_nsc),
}
STATS = {"ncs": stats_ncs, "nsc": stats_nsc}


@njit(**_jit)
def running_update(running_mean, running_var, mean, var, count, factor):
    """The running statistics updated in place, one channel at a time (a handful of channels: no threads)."""
    for c in range(running_mean.shape[0]):
        new_mean, new_var = running_stats_step(widen(running_mean[c]), widen(running_var[c]), mean[c], var[c],
                                               count, factor)
        running_mean[c] = narrow(new_mean, running_mean)
        running_var[c] = narrow(new_var, running_var)
