"""numba-cuda kernels for fused BatchNorm + activation: the CUDA twin of ``ckptnorm/backends/cpu_kernels.py``.

Every kernel takes 3-D views of the activation in *memory order* and a ``channels_last`` flag:

    "ncs" layout (channels_last=False): shape (N, C, S)  -- NCHW-contiguous input, S = prod(spatial)
    "nsc" layout (channels_last=True):  shape (N, S, C)  -- channels_last input (and 2-D N x C input, S = 1)

Math (one channel, m = N*S elements; design note docs/design.md), exactly as the CPU kernels:

    stats      shift = first element of the channel, s1 = sum(x - shift), s2 = sum((x - shift)^2)
               mean = shift + s1/m,  var = max(s2/m - (s1/m)^2, 0)  (biased),  optional min/max of x
    forward    y = (x - mean) * scale + beta,   z = phi(y)                       (scale = gamma * invstd)
    reduce     sum_dy = sum(dz * phi'(y)),  sum_dy_xhat = invstd * sum(dy * (x - mean))            [from x]
               sum_dy = sum(dz * phi'(z)),  sum_dy_ybeta = sum(dy * (phi^-1(z) - beta))            [from z]
    dx         dx = coef_dy * dy + coef_u * u + coef_const,  u = x - mean [from x] or y - beta [from z]
    residual   (has_residual) z = phi(y + r):  forward z = phi(y + r),  dy = dz * phi'(y + r)             [from x]
               y = phi^-1(z) - r,  dy = dz * phi'(z)  (phi' of the pre-activation y + r, from z)       [from z]
               reduce and dx use this y and dy; the dx kernels also store dres = dy (has_dres)

Invariants:
 1. Arithmetic is float64 per element: every activation-sized load goes through ``widen`` and every store through
    ``narrow`` (``ckptnorm/backends/storage.py``, shared with the CPU kernels), selected at compile time by the
    array's element type: float32/float64 as they are, uint16 = IEEE binary16 bits, int16 = bfloat16 bits (a torch
    bfloat16 tensor has no ``__cuda_array_interface__`` type string, so adapters pass both half formats as
    integer views), rounded once to nearest even.  Only loads and stores see the storage format; each array has
    its own (mixed storage works).  Per-channel arrays are float64 and loaded with ``float64(...)``.
 2. Reductions are two-level and deterministic, with no atomics anywhere: each block folds its threads' float64
    sums in shared memory in a fixed tree order and writes one partial per channel to a float64 scratch array
    ``part[quantity, channel, block]``; a finalize kernel then folds each channel's partials in block order.  The
    launch geometry (``reduce_geometry``) depends on the shape only, never on the device, so the bits are the same
    on every run.  A reduction block's lanes per channel are ``blockDim.x // tile``: the geometry launches fewer
    threads than THREADS_PER_BLOCK when a channel has fewer rows.
 3. Nothing activation-sized is allocated here: callers pass every output and scratch array (outputs may alias
    inputs: each element is read before it is written, by the same thread).
 4. ``dz`` and ``residual`` may have any strides (stride 0 from a ``.sum()`` or ``.expand()`` included): they are
    only ever indexed.
 5. Optional operands are a flag plus an array (``has_residual``, ``has_dres``, ``with_range``, ``has_scale``):
    without the flag the array is a stand-in that is never read or written, one of the kernel's other arguments,
    so the plain path compiles no extra signature.  Not None with ``arg is None`` pruning: numba-cuda (0.30) can
    compile such a kernel (and the simulator runs it) but cannot launch one with a None argument on a GPU.
 6. Kernels are compiled lazily, once per argument-type signature, on first launch, and cached on disk by Numba
    (``cache=True``): importing this module compiles nothing and needs no GPU or driver.  The cache checks only
    this file: after editing ``ckptnorm/backends/activation_math.py`` or ``storage.py`` (compiled into every
    kernel), clear ``src_cuda/__pycache__``.
 7. phi, phi' and phi^-1 are ``ckptnorm/backends/activation_math.py``'s scalar functions, the very ones the CPU
    kernels inline (numba-cuda compiles a ``numba.njit`` function called from a kernel as a device function):
    the two backends cannot drift apart.

Layouts share one kernel per primitive: ``channels_last`` only decides which coordinate is the channel (a uniform
branch).  Indexing: each thread walks its elements with a mixed-radix counter over the memory-order dims
(``_split3``/``_advance3``, ``_advance2`` for reduction rows): a few integer divisions when a thread starts, then
only adds and compares per element.
"""
from __future__ import annotations

import math

from numba import cuda
from numba.cuda import float64

# The activations (branch on the integer `kind`; codes in ckptnorm.activations): the CPU kernels' scalar functions,
# compiled here as device functions; one definition of the math for both targets.
from ckptnorm.backends.activation_math import act_forward as _act_forward
from ckptnorm.backends.activation_math import act_grad as _act_grad
from ckptnorm.backends.activation_math import act_inverse as _act_inverse
from ckptnorm.backends.channel_math import running_stats_step as _running_stats_step
from ckptnorm.backends.storage import narrow, widen

from .geometry import (THREADS_PER_BLOCK, _Q_MAX, _Q_MIN, _advance2, _advance3, _block_fold, _dims, _fold_partials,
                       _load, _reduce_coords, _split3, _thread_range)

_jit = dict(cache=True)


# -- per-channel statistics -----------------------------------------------------------------------------------------
@cuda.jit(**_jit)
def stats_partials(x, channels_last, tile, n_part, with_range, part):
    """part[:, c, b] = (sum(x - shift), sum((x - shift)^2)[, min x, max x]) over block b's rows of channel c."""
    sh = cuda.shared.array((4, THREADS_PER_BLOCK), float64)
    n_batch, channels, spatial = _dims(x.shape, channels_last)
    lane, tx, c, b, n, s, dn, ds = _reduce_coords(channels_last, tile, n_part, spatial)
    t = cuda.threadIdx.x  # this thread's shared-memory slot
    s1 = 0.0
    s2 = 0.0
    lo = math.inf
    hi = -math.inf
    if c < channels and n < n_batch and spatial > 0:
        # shift = first element of the channel: removes the cancellation of E[x^2] - E[x]^2 when |mean| >> std
        shift = _load(x, 0, c, 0, channels_last)
        while n < n_batch:
            v = _load(x, n, c, s, channels_last)
            d = v - shift
            s1 += d
            s2 += d * d
            if with_range:
                lo = min(lo, v)
                hi = max(hi, v)
            n, s = _advance2(n, s, dn, ds, spatial)
    sh[0, t] = s1
    sh[1, t] = s2
    sh[_Q_MIN, t] = lo
    sh[_Q_MAX, t] = hi
    _block_fold(sh, 4 if with_range else 2, channels_last, tile, lane, tx, part, c, channels, b)


@cuda.jit(**_jit)
def stats_finalize(x, channels_last, part, n_part, with_range, mean, var, xmin, xmax):
    """Fold the partials of each channel; mean = shift + s1/m, var = max(s2/m - (s1/m)^2, 0)."""
    n_batch, channels, spatial = _dims(x.shape, channels_last)
    count = n_batch * spatial
    c, step = _thread_range()
    while c < channels:
        s1 = _fold_partials(part, 0, c, n_part)
        s2 = _fold_partials(part, 1, c, n_part)
        if count > 0:
            d = s1 / count
            mean[c] = _load(x, 0, c, 0, channels_last) + d
            var[c] = max(s2 / count - d * d, 0.0)
        else:
            mean[c] = math.nan
            var[c] = math.nan
        if with_range:
            xmin[c] = _fold_partials(part, _Q_MIN, c, n_part)
            xmax[c] = _fold_partials(part, _Q_MAX, c, n_part)
        c += step


@cuda.jit(**_jit)
def running_update(running_mean, running_var, mean, var, count, factor):
    """The running statistics updated in place, one thread per channel (the CPU kernel's formula)."""
    c, step = _thread_range()
    while c < running_mean.shape[0]:
        new_mean, new_var = _running_stats_step(widen(running_mean[c]), widen(running_var[c]), float64(mean[c]),
                                                float64(var[c]), count, factor)
        running_mean[c] = narrow(new_mean, running_mean)
        running_var[c] = narrow(new_var, running_var)
        c += step


@cuda.jit(**_jit)
def sums_finalize(part, n_part, scale_second, has_scale, first, second):
    """first[c] = sum of partials 0; second[c] = sum of partials 1, times scale_second[c] if has_scale."""
    channels = first.shape[0]
    c, step = _thread_range()
    while c < channels:
        first[c] = _fold_partials(part, 0, c, n_part)
        s = _fold_partials(part, 1, c, n_part)
        second[c] = s * float64(scale_second[c]) if has_scale else s
        c += step


# -- normalize + activation (out may be x itself) -------------------------------------------------------------------
@cuda.jit(**_jit)
def normalize_act(x, out, channels_last, mean, scale, beta, kind, p, residual, has_residual):
    """out = phi((x - mean) * scale + beta [+ residual]); out may alias x, never residual."""
    d0, d1, d2 = x.shape
    i, step = _thread_range()
    a0, a1, a2 = _split3(i, d1, d2)
    b0, b1, b2 = _split3(step, d1, d2)
    while a0 < d0:
        c = a2 if channels_last else a1
        y = (widen(x[a0, a1, a2]) - float64(mean[c])) * float64(scale[c]) + float64(beta[c])
        if has_residual:  # a uniform branch: without it, no load of the stand-in
            y += widen(residual[a0, a1, a2])
        out[a0, a1, a2] = narrow(_act_forward(y, kind, p), out)
        a0, a1, a2 = _advance3(a0, a1, a2, b0, b1, b2, d1, d2)


# -- what every backward kernel computes per element ---------------------------------------------------------------
# Element (n, c, s) of the memory-order views (``_load`` maps it to the layout); device functions are inlined by
# the CUDA compiler, so the reduction and the dx kernels share this at no cost.
@cuda.jit(device=True, **_jit)
def _dy_from_input(x, dz, residual, has_residual, n, c, s, channels_last, m, a, bt, kind, p):
    """(dy, u): u = x - mean, dy = dz * phi'(u * scale + beta [+ r])."""
    u = _load(x, n, c, s, channels_last) - m
    y = u * a + bt
    if has_residual:  # a uniform branch: without it, no load of the stand-in
        y += _load(residual, n, c, s, channels_last)
    return _load(dz, n, c, s, channels_last) * _act_grad(y, kind, p), u


@cuda.jit(device=True, **_jit)
def _dy_from_output(z, dz, residual, has_residual, n, c, s, channels_last, kind, p):
    """(dy, y): y = phi^-1(z) [- r], dy = dz * phi' at the pre-activation (taken from z)."""
    y, g = _act_inverse(_load(z, n, c, s, channels_last), kind, p)
    if has_residual:
        y -= _load(residual, n, c, s, channels_last)
    return _load(dz, n, c, s, channels_last) * g, y


# -- backward reduction from the input x (y and xhat recomputed on the fly) ----------------------------------------
@cuda.jit(**_jit)
def reduce_from_input_partials(x, dz, channels_last, mean, scale, beta, kind, p, residual, has_residual, tile, n_part,
                               part):
    """part[:, c, b] = (sum(dy), sum(dy * (x - mean))) over block b's rows of channel c, dy = dz * phi'(y [+ r])."""
    sh = cuda.shared.array((2, THREADS_PER_BLOCK), float64)
    n_batch, channels, spatial = _dims(x.shape, channels_last)
    lane, tx, c, b, n, s, dn, ds = _reduce_coords(channels_last, tile, n_part, spatial)
    t = cuda.threadIdx.x  # this thread's shared-memory slot
    s_dy = 0.0
    s_dyu = 0.0
    if c < channels and spatial > 0:
        m, a, bt = float64(mean[c]), float64(scale[c]), float64(beta[c])
        while n < n_batch:
            dy, u = _dy_from_input(x, dz, residual, has_residual, n, c, s, channels_last, m, a, bt, kind, p)
            s_dy += dy
            s_dyu += dy * u
            n, s = _advance2(n, s, dn, ds, spatial)
    sh[0, t] = s_dy
    sh[1, t] = s_dyu
    _block_fold(sh, 2, channels_last, tile, lane, tx, part, c, channels, b)


# -- backward reduction from the output z (y = phi^-1(z); no xhat, no x) -------------------------------------------
@cuda.jit(**_jit)
def reduce_from_output_partials(z, dz, channels_last, beta, kind, p, residual, has_residual, tile, n_part, part):
    """part[:, c, b] = (sum(dy), sum(dy * (y - beta))) over block b's rows of channel c, y = phi^-1(z) [- r]."""
    sh = cuda.shared.array((2, THREADS_PER_BLOCK), float64)
    n_batch, channels, spatial = _dims(z.shape, channels_last)
    lane, tx, c, b, n, s, dn, ds = _reduce_coords(channels_last, tile, n_part, spatial)
    t = cuda.threadIdx.x  # this thread's shared-memory slot
    s_dy = 0.0
    s_dyy = 0.0
    if c < channels and spatial > 0:
        bt = float64(beta[c])
        while n < n_batch:
            dy, y = _dy_from_output(z, dz, residual, has_residual, n, c, s, channels_last, kind, p)
            s_dy += dy
            s_dyy += dy * (y - bt)
            n, s = _advance2(n, s, dn, ds, spatial)
    sh[0, t] = s_dy
    sh[1, t] = s_dyy
    _block_fold(sh, 2, channels_last, tile, lane, tx, part, c, channels, b)


# -- dx from the input x (dx may be x or dz only if the caller accepts the overwrite) ------------------------------
@cuda.jit(**_jit)
def dx_from_input(x, dz, dx, channels_last, mean, scale, beta, kind, p, coef_dy, coef_u, coef_const, residual,
                  has_residual, dres, has_dres):
    """dx = coef_dy * dy + coef_u * (x - mean) + coef_const, dy = dz * phi'(y [+ residual]); [dres = dy]."""
    d0, d1, d2 = x.shape
    i, step = _thread_range()
    a0, a1, a2 = _split3(i, d1, d2)
    b0, b1, b2 = _split3(step, d1, d2)
    while a0 < d0:
        c, s = (a2, a1) if channels_last else (a1, a2)
        dy, u = _dy_from_input(x, dz, residual, has_residual, a0, c, s, channels_last, float64(mean[c]),
                               float64(scale[c]), float64(beta[c]), kind, p)
        # every load above precedes both stores: dx or dres may alias x or dz
        dx[a0, a1, a2] = narrow(float64(coef_dy[c]) * dy + float64(coef_u[c]) * u + float64(coef_const[c]), dx)
        if has_dres:
            dres[a0, a1, a2] = narrow(dy, dres)
        a0, a1, a2 = _advance3(a0, a1, a2, b0, b1, b2, d1, d2)


# -- dx from the output z ------------------------------------------------------------------------------------------
@cuda.jit(**_jit)
def dx_from_output(z, dz, dx, channels_last, beta, kind, p, coef_dy, coef_u, coef_const, residual, has_residual, dres,
                   has_dres):
    """dx = coef_dy * dy + coef_u * (y - beta) + coef_const, y = phi^-1(z) [- residual], dy = dz * phi' (from z);
    [dres = dy]."""
    d0, d1, d2 = z.shape
    i, step = _thread_range()
    a0, a1, a2 = _split3(i, d1, d2)
    b0, b1, b2 = _split3(step, d1, d2)
    while a0 < d0:
        c, s = (a2, a1) if channels_last else (a1, a2)
        dy, y = _dy_from_output(z, dz, residual, has_residual, a0, c, s, channels_last, kind, p)
        # every load above precedes both stores: dx or dres may alias z or dz
        dx_value = float64(coef_dy[c]) * dy + float64(coef_u[c]) * (y - float64(beta[c])) + float64(coef_const[c])
        dx[a0, a1, a2] = narrow(dx_value, dx)
        if has_dres:
            dres[a0, a1, a2] = narrow(dy, dres)
        a0, a1, a2 = _advance3(a0, a1, a2, b0, b1, b2, d1, d2)
