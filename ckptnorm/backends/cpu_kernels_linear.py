"""Numba CPU kernels for the piecewise-linear activations -- identity, relu, leaky_relu -- without tiles.

Same primitives, layouts, arguments and invariants as ``cpu_kernels`` (read its docstring first); the difference is
how phi is evaluated.  ``cpu_kernels`` branches on the activation code once per tile and streams each tile through
float64 scratch arrays, because a branch on a runtime code inside a ``prange`` body keeps the loop from
vectorizing (Numba outlines the body, so the code is not a compile-time constant there).  A piecewise-linear phi
needs no code at all: with ``slope`` = phi'(y) for y < 0 (identity 1, relu 0, leaky_relu a) and ``at_zero`` =
phi'(0) as PyTorch takes it (identity 1, relu 0, leaky_relu a),

    phi(y)    = y if y > 0 else slope * y           (+ 0.0: relu gives +0.0, not -0.0, for y < 0)
    phi'(y)   = 1 if y > 0 else (slope if y < 0 else at_zero)
    inverse   y = z if z > 0 else z / slope,  phi' = 1 if z > 0 else slope       (slope > 0 only)

are selects that vectorize in one pass over the data, with no scratch arrays: each element is loaded once
(``widen``), the float64 math stays in registers, and the result is stored once (``narrow``: rounded to the output
array's storage format, fp16/bf16 bits included; ``storage``).  ``CPUBackend`` sends these three activations
here and all the others (relu6, hardswish and hardsigmoid included: more than one kink) to ``cpu_kernels``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_tiles import PRANGE_ONLY, LayoutKernels, _chunking, _combine, _jit, _reduce_jit
from .storage import narrow, widen


@njit(inline="always", **_jit)
def _phi(y, slope):
    return (y if y > 0.0 else slope * y) + 0.0


@njit(inline="always", **_jit)
def _grad(y, slope, at_zero):
    return 1.0 if y > 0.0 else (slope if y < 0.0 else at_zero)


@njit(inline="always", **_jit)
def _inverse(z, slope):
    return z if z > 0.0 else z / slope


@njit(inline="always", **_jit)
def _grad_from_output(z, slope):
    return 1.0 if z > 0.0 else slope  # z = 0 means y = 0: PyTorch's slope there


# The pre-activation of one element, and what each backward kernel needs with it.  ``residual[i0, i1, i2]`` is the
# element's r in memory order ((n, c, s) or (n, s, c)); with ``residual`` None the branch is pruned at compile time
# (inlined, so the plain loop is what it was before residual sites existed).
@njit(inline="always", **_jit)
def _pre_activation(y, residual, i0, i1, i2):
    if residual is not None:
        y += widen(residual[i0, i1, i2])
    return y


@njit(inline="always", **_jit)
def _dy_from_input(xv, dzv, m, a, b, slope, at_zero, residual, i0, i1, i2):
    """(dy, u) from x: u = x - mean, dy = dz * phi'(u * scale + beta [+ r])."""
    u = xv - m
    return dzv * _grad(_pre_activation(u * a + b, residual, i0, i1, i2), slope, at_zero), u


@njit(inline="always", **_jit)
def _dy_from_output(zv, dzv, slope, residual, i0, i1, i2):
    """(dy, y) from z: y = phi^-1(z) [- r], dy = dz * phi' (taken from z)."""
    y = _inverse(zv, slope)
    if residual is not None:
        y -= widen(residual[i0, i1, i2])
    return dzv * _grad_from_output(zv, slope), y


# -- normalize + activation ---------------------------------------------------------------------------------------
@njit(parallel=PRANGE_ONLY, **_jit)
def normalize_act_ncs(x, out, mean, scale, beta, slope, residual):
    n_batch, channels, spatial = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        m, a, b = mean[c], scale[c], beta[c]
        x_r, out_r = x[n, c], out[n, c]
        for s in range(spatial):
            y = _pre_activation((widen(x_r[s]) - m) * a + b, residual, n, c, s)
            out_r[s] = narrow(_phi(y, slope), out_r)


@njit(parallel=PRANGE_ONLY, **_jit)
def normalize_act_nsc(x, out, mean, scale, beta, slope, residual):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    for k in prange(n_chunks):
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            x_r, out_r = x[n, s], out[n, s]
            for c in range(channels):
                y = _pre_activation((widen(x_r[c]) - mean[c]) * scale[c] + beta[c], residual, n, s, c)
                out_r[c] = narrow(_phi(y, slope), out_r)


# -- backward reductions ------------------------------------------------------------------------------------------
@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_input_ncs(x, dz, mean, invstd, scale, beta, slope, at_zero, sum_dy, sum_dy_xhat, residual):
    n_batch, channels, spatial = x.shape
    for c in prange(channels):
        m, a, b = mean[c], scale[c], beta[c]
        s_dy = 0.0
        s_dyu = 0.0
        for n in range(n_batch):
            x_r, dz_r = x[n, c], dz[n, c]
            for s in range(spatial):
                dy, u = _dy_from_input(widen(x_r[s]), widen(dz_r[s]), m, a, b, slope, at_zero, residual, n, c, s)
                s_dy += dy
                s_dyu += dy * u
        sum_dy[c] = s_dy
        sum_dy_xhat[c] = s_dyu * invstd[c]


@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_input_nsc(x, dz, mean, invstd, scale, beta, slope, at_zero, sum_dy, sum_dy_xhat, residual):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        acc_dy, acc_dyu = part[k, 0], part[k, 1]
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            x_r, dz_r = x[n, s], dz[n, s]
            for c in range(channels):
                dy, u = _dy_from_input(widen(x_r[c]), widen(dz_r[c]), mean[c], scale[c], beta[c], slope, at_zero,
                                       residual, n, s, c)
                acc_dy[c] += dy
                acc_dyu[c] += dy * u
    _combine(part, sum_dy, sum_dy_xhat)
    for c in range(channels):
        sum_dy_xhat[c] *= invstd[c]


@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_output_ncs(z, dz, beta, slope, sum_dy, sum_dy_ybeta, residual):
    n_batch, channels, spatial = z.shape
    for c in prange(channels):
        b = beta[c]
        s_dy = 0.0
        s_dyy = 0.0
        for n in range(n_batch):
            z_r, dz_r = z[n, c], dz[n, c]
            for s in range(spatial):
                dy, y = _dy_from_output(widen(z_r[s]), widen(dz_r[s]), slope, residual, n, c, s)
                s_dy += dy
                s_dyy += dy * (y - b)
        sum_dy[c] = s_dy
        sum_dy_ybeta[c] = s_dyy


@njit(parallel=PRANGE_ONLY, **_reduce_jit)
def reduce_from_output_nsc(z, dz, beta, slope, sum_dy, sum_dy_ybeta, residual):
    n_batch, spatial, channels = z.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    part = np.zeros((n_chunks, 2, channels))
    for k in prange(n_chunks):
        acc_dy, acc_dyy = part[k, 0], part[k, 1]
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            z_r, dz_r = z[n, s], dz[n, s]
            for c in range(channels):
                dy, y = _dy_from_output(widen(z_r[c]), widen(dz_r[c]), slope, residual, n, s, c)
                acc_dy[c] += dy
                acc_dyy[c] += dy * (y - beta[c])
    _combine(part, sum_dy, sum_dy_ybeta)


# -- dx (and dres = dy at residual sites) ---------------------------------------------------------------------------
@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_input_ncs(x, dz, dx, mean, scale, beta, slope, at_zero, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, channels, spatial = x.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        m, a, b = mean[c], scale[c], beta[c]
        k_dy, k_u, k_0 = coef_dy[c], coef_u[c], coef_const[c]
        x_r, dz_r, dx_r = x[n, c], dz[n, c], dx[n, c]
        for s in range(spatial):
            dy, u = _dy_from_input(widen(x_r[s]), widen(dz_r[s]), m, a, b, slope, at_zero, residual, n, c, s)
            dx_r[s] = narrow(k_dy * dy + k_u * u + k_0, dx_r)
            if dres is not None:
                dres[n, c, s] = narrow(dy, dres)


@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_input_nsc(x, dz, dx, mean, scale, beta, slope, at_zero, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, spatial, channels = x.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    for k in prange(n_chunks):
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            x_r, dz_r, dx_r = x[n, s], dz[n, s], dx[n, s]
            for c in range(channels):
                dy, u = _dy_from_input(widen(x_r[c]), widen(dz_r[c]), mean[c], scale[c], beta[c], slope, at_zero,
                                       residual, n, s, c)
                dx_r[c] = narrow(coef_dy[c] * dy + coef_u[c] * u + coef_const[c], dx_r)
                if dres is not None:
                    dres[n, s, c] = narrow(dy, dres)


@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_output_ncs(z, dz, dx, beta, slope, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, channels, spatial = z.shape
    for i in prange(n_batch * channels):
        n = i // channels
        c = i - n * channels
        b = beta[c]
        k_dy, k_u, k_0 = coef_dy[c], coef_u[c], coef_const[c]
        z_r, dz_r, dx_r = z[n, c], dz[n, c], dx[n, c]
        for s in range(spatial):
            dy, y = _dy_from_output(widen(z_r[s]), widen(dz_r[s]), slope, residual, n, c, s)
            dx_r[s] = narrow(k_dy * dy + k_u * (y - b) + k_0, dx_r)
            if dres is not None:
                dres[n, c, s] = narrow(dy, dres)


@njit(parallel=PRANGE_ONLY, **_jit)
def dx_from_output_nsc(z, dz, dx, beta, slope, coef_dy, coef_u, coef_const, residual, dres):
    n_batch, spatial, channels = z.shape
    rows = n_batch * spatial
    n_chunks, per_chunk = _chunking(rows)
    for k in prange(n_chunks):
        for r in range(k * per_chunk, min(rows, (k + 1) * per_chunk)):
            n = r // spatial
            s = r - n * spatial
            z_r, dz_r, dx_r = z[n, s], dz[n, s], dx[n, s]
            for c in range(channels):
                dy, y = _dy_from_output(widen(z_r[c]), widen(dz_r[c]), slope, residual, n, s, c)
                dx_r[c] = narrow(coef_dy[c] * dy + coef_u[c] * (y - beta[c]) + coef_const[c], dx_r)
                if dres is not None:
                    dres[n, s, c] = narrow(dy, dres)


# The kernels per layout, as ``CPUBackend`` looks them up.
KERNELS = {
    "ncs": LayoutKernels(normalize_act_ncs, reduce_from_input_ncs, reduce_from_output_ncs, dx_from_input_ncs,
                         dx_from_output_ncs),
    "nsc": LayoutKernels(normalize_act_nsc, reduce_from_input_nsc, reduce_from_output_nsc, dx_from_input_nsc,
                         dx_from_output_nsc),
}
