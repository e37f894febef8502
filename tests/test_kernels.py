"""The CPU backend's primitives against plain float64 NumPy, plus strides, determinism and allocations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit
from numpy.lib.stride_tricks import as_strided

from kernel_data import (ACTIVATION_SPECS, HALF_FORMATS, RESIDUAL_SPECS, RUNNING_KINDS, all_half_bits, empty_as,
                         half_from_bits, half_to_bits, make, narrowing_cases, out_tol, running_case, running_values,
                         stored_as, to_layout, to_ncs, tol, values_of)
from ckptnorm import get_activation
from ckptnorm.backends import get_backend
from ckptnorm.backends.storage import narrow, widen
from ckptnorm.torch import BatchNormAct2d, batch_norm_act

BACKEND = get_backend("cpu")
ACTS = [get_activation(n, p) for n, p in ACTIVATION_SPECS]
RESIDUAL_ACTS = [get_activation(n, p) for n, p in RESIDUAL_SPECS]
# (N, C, S): rows = N*S around the channels-last chunk size (256) and channel counts around vector widths
SHAPES = [(1, 3, 2), (2, 1, 7), (3, 5, 85), (1, 17, 256), (2, 16, 257), (4, 15, 150)]


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats(shape, dtype, layout):
    x, *_ = make(shape, dtype)
    assert BACKEND.channel_stats(to_layout(x, layout), layout)[2:] == (None, None)
    mean, var, lo, hi = BACKEND.channel_stats(to_layout(x, layout), layout, with_range=True)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-11, atol=1e-13)
    np.testing.assert_array_equal(lo, x64.min(axis=(0, 2)))
    np.testing.assert_array_equal(hi, x64.max(axis=(0, 2)))


def test_channel_stats_large_mean_no_cancellation():
    x = (1e4 + np.random.default_rng(0).standard_normal((4, 2, 1000))).astype(np.float32)
    _, var, _, _ = BACKEND.channel_stats(x, "ncs")
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 2)), rtol=1e-9)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES[2:5])
def test_elementwise_and_reductions(shape, dtype, layout, act):
    x, dz, mean, invstd, gamma, beta = make(shape, dtype, seed=1)
    scale = gamma * invstd
    bc = lambda v: v[None, :, None]  # noqa: E731 (per-channel broadcast in NCS)
    x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
    u = x64 - bc(mean)
    y = u * bc(scale) + bc(beta)
    z_ref = act.forward(y)
    dy = dz64 * act.derivative(y)
    xl, dzl = to_layout(x, layout), to_layout(dz, layout)

    out = np.empty_like(xl)
    BACKEND.normalize_act(xl, out, layout, mean, scale, beta, act)
    np.testing.assert_allclose(to_ncs(out, layout), z_ref, **tol(dtype))
    inplace = xl.copy()
    BACKEND.normalize_act(inplace, inplace, layout, mean, scale, beta, act)  # output aliases input
    np.testing.assert_array_equal(inplace, out)

    s_dy, s_dyx = BACKEND.reduce_from_input(xl, dzl, layout, mean, invstd, scale, beta, act)
    np.testing.assert_allclose(s_dy, dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s_dyx, (dy * u * bc(invstd)).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)

    k_dy, k_u, k_0 = np.linspace(0.5, 1.5, shape[1]), np.linspace(-0.1, 0.1, shape[1]), np.linspace(-1, 1, shape[1])
    dx = np.empty_like(xl)
    BACKEND.dx_from_input(xl, dzl, dx, layout, mean, scale, beta, act, k_dy, k_u, k_0)
    np.testing.assert_allclose(to_ncs(dx, layout), bc(k_dy) * dy + bc(k_u) * u + bc(k_0), **tol(dtype))

    if act.invertible:
        zl = to_layout(z_ref.astype(np.float64), layout)  # z in float64: isolates the kernel from z's rounding
        # ... but not from the inverse's conditioning (celu(0.5) at y = -15: exp(30)): y and phi' as the oracle
        # recovers them from z
        y, dy = act.inverse(z_ref), dz64 * act.derivative_from_output(z_ref)
        s_dy, s_dyy = BACKEND.reduce_from_output(zl, dzl, layout, beta, act)
        np.testing.assert_allclose(s_dy, dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(s_dyy, (dy * (y - bc(beta))).sum(axis=(0, 2)), rtol=1e-8, atol=1e-8)
        dx = np.empty(zl.shape, dtype)
        BACKEND.dx_from_output(zl, dzl, dx, layout, beta, act, k_dy, k_u, k_0)
        want = bc(k_dy) * dy + bc(k_u) * (y - bc(beta)) + bc(k_0)
        np.testing.assert_allclose(to_ncs(dx, layout), want, **tol(dtype))


@pytest.mark.parametrize("act", RESIDUAL_ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("residual_kind", ["dense", "expanded", "strided"])
@pytest.mark.parametrize("shape", [(3, 5, 85), (2, 16, 257)])
def test_residual_primitives(shape, residual_kind, dtype, layout, act):
    """z = phi(y + r): every primitive with a residual operand of any strides, and dres = dy."""
    x, dz, mean, invstd, gamma, beta = make(shape, dtype, seed=2)
    rng = np.random.default_rng(5)
    r = (rng.standard_normal(shape) * 1.5).astype(dtype)
    if residual_kind == "expanded":  # one value per channel, broadcast: all strides but the channel's are 0
        # a writeable view, as an expanded tensor's is (np.broadcast_to's is read-only: a kernel type of its own)
        r = as_strided(r[:1, :, :1], shape, (0, r.strides[1], 0))
    scale = gamma * invstd
    bc = lambda v: v[None, :, None]  # noqa: E731
    x64, dz64, r64 = x.astype(np.float64), dz.astype(np.float64), r.astype(np.float64)
    u = x64 - bc(mean)
    y = u * bc(scale) + bc(beta)
    pre = y + r64
    dy = dz64 * act.derivative(pre)
    xl, dzl = to_layout(x, layout), to_layout(dz, layout)
    if residual_kind == "strided":  # every other element of a twice-as-long array
        wide = np.empty(to_layout(r, layout).shape[:2] + (2 * to_layout(r, layout).shape[2],), dtype)
        wide[:, :, ::2] = to_layout(r, layout)
        rl = wide[:, :, ::2]
    elif residual_kind == "expanded":
        rl = r if layout == "ncs" else r.transpose(0, 2, 1)
    else:
        rl = to_layout(r, layout)
    k_dy, k_u, k_0 = np.linspace(0.5, 1.5, shape[1]), np.linspace(-0.1, 0.1, shape[1]), np.linspace(-1, 1, shape[1])

    out = np.empty_like(xl)
    BACKEND.normalize_act(xl, out, layout, mean, scale, beta, act, residual=rl)
    np.testing.assert_allclose(to_ncs(out, layout), act.forward(pre), **tol(dtype))
    s_dy, s_dyx = BACKEND.reduce_from_input(xl, dzl, layout, mean, invstd, scale, beta, act, residual=rl)
    np.testing.assert_allclose(s_dy, dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s_dyx, (dy * u * bc(invstd)).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    dx, dres = np.empty_like(xl), np.empty_like(xl)
    BACKEND.dx_from_input(xl, dzl, dx, layout, mean, scale, beta, act, k_dy, k_u, k_0, residual=rl, dres=dres)
    np.testing.assert_allclose(to_ncs(dx, layout), bc(k_dy) * dy + bc(k_u) * u + bc(k_0), **tol(dtype))
    np.testing.assert_allclose(to_ncs(dres, layout), dy, **tol(dtype))

    if act.invertible:
        zl = to_layout(act.forward(pre), layout)  # float64 z: isolates the kernel from z's rounding
        y = act.inverse(act.forward(pre)) - r64  # and from the inverse's conditioning: y, phi' as the oracle has them
        dy = dz64 * act.derivative_from_output(act.forward(pre))
        rl64 = to_layout(r64, layout)
        s_dy, s_dyy = BACKEND.reduce_from_output(zl, dzl, layout, beta, act, residual=rl64)
        np.testing.assert_allclose(s_dy, dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(s_dyy, (dy * (y - bc(beta))).sum(axis=(0, 2)), rtol=1e-8, atol=1e-8)
        dx, dres = np.empty(zl.shape, dtype), np.empty(zl.shape, dtype)
        BACKEND.dx_from_output(zl, dzl, dx, layout, beta, act, k_dy, k_u, k_0, residual=rl64, dres=dres)
        want = bc(k_dy) * dy + bc(k_u) * (y - bc(beta)) + bc(k_0)
        np.testing.assert_allclose(to_ncs(dx, layout), want, **tol(dtype))
        np.testing.assert_allclose(to_ncs(dres, layout), dy, **tol(dtype))


def test_residual_none_is_the_plain_path():
    """Passing residual=None explicitly gives the same bits as not passing it."""
    x, dz, mean, invstd, gamma, beta = make((2, 6, 40), np.float32, seed=4)
    act = get_activation("leaky_relu", 0.1)
    a, b = np.empty_like(x), np.empty_like(x)
    BACKEND.normalize_act(x, a, "ncs", mean, gamma * invstd, beta, act)
    BACKEND.normalize_act(x, b, "ncs", mean, gamma * invstd, beta, act, residual=None)
    assert a.tobytes() == b.tobytes()


def test_reductions_are_bitwise_deterministic():
    rng = np.random.default_rng(3)
    for layout, shape in (("ncs", (8, 16, 4096)), ("nsc", (8, 4096, 16))):
        x = rng.standard_normal(shape).astype(np.float32)
        dz = rng.standard_normal(shape).astype(np.float32)
        c = 16
        args = (np.zeros(c), np.ones(c), np.ones(c), np.zeros(c), get_activation("leaky_relu"))
        first = BACKEND.channel_stats(x, layout, True) + BACKEND.reduce_from_input(x, dz, layout, *args)
        for _ in range(3):
            again = BACKEND.channel_stats(x, layout, True) + BACKEND.reduce_from_input(x, dz, layout, *args)
            for a, b in zip(first, again):
                assert a.tobytes() == b.tobytes()


# -- half-precision storage: fp16 as uint16 bits, bf16 as int16 bits ------------------------------------------------
@njit
def _widen_all(stored, out):
    for i in range(stored.size):
        out[i] = widen(stored[i])


@njit
def _narrow_all(values, out):
    for i in range(values.size):
        out[i] = narrow(values[i], out)


def assert_same_float64(got, want):
    """Bit for bit; a NaN matches any NaN of the same sign (payloads are not compared)."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(got[~nan].view(np.int64), want[~nan].view(np.int64))


@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_widen_every_bit_pattern(fmt):
    stored = all_half_bits(fmt)
    got = np.empty(stored.size)
    _widen_all(stored, got)
    assert_same_float64(got, half_from_bits(stored, fmt))


@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_narrow_rounds_once_to_nearest_even(fmt):
    storage = HALF_FORMATS[fmt]
    values, want = narrowing_cases(fmt)
    got = np.empty(values.size, storage)
    _narrow_all(values, got)
    np.testing.assert_array_equal(got, want)
    # every bit pattern, widened by the reference: back to the same bits; NaN stays NaN, with its sign
    stored = all_half_bits(fmt)
    wide = half_from_bits(stored, fmt)
    back = np.empty_like(stored)
    _narrow_all(wide, back)
    nan = np.isnan(wide)
    np.testing.assert_array_equal(back[~nan], stored[~nan])
    assert_same_float64(half_from_bits(back, fmt), wide)
    # random values over the whole range against the reference (bf16: float32 values, which it rounds only once)
    rng = np.random.default_rng(0)
    lowest, highest = (-30, 20) if fmt == "fp16" else (-140, 130)
    x = rng.standard_normal(100_000) * np.exp2(rng.integers(lowest, highest, 100_000))
    if fmt == "bf16":
        with np.errstate(over="ignore"):
            x = x.astype(np.float32).astype(np.float64)
    got = np.empty(x.size, storage)
    _narrow_all(x, got)
    np.testing.assert_array_equal(got, half_to_bits(x, fmt))


def bc(v):
    return v[None, :, None]  # per-channel broadcast in NCS


def check_storage(shape, layout, act, x_kind, dz_kind, r_kind=None, out_kind=None, dres_kind=None, seed=12):
    """Every primitive with activations stored as ``*_kind`` against float64 NumPy on the widened inputs.

    Outputs may be off by a couple of units of their format's rounding; per-channel sums are float64 over exactly
    the widened inputs, so they are as tight as with float64 storage.  ``r_kind`` None: no residual.
    """
    out_kind = out_kind or x_kind
    x, dz, mean, invstd, gamma, beta = make(shape, np.float64, seed)
    scale = gamma * invstd
    xs, x64 = stored_as(x, x_kind)
    dzs, dz64 = stored_as(dz, dz_kind)
    u = x64 - bc(mean)
    y = u * bc(scale) + bc(beta)
    res, r64 = {}, 0.0
    if r_kind is not None:
        rs, r64 = stored_as(np.random.default_rng(seed + 1).standard_normal(shape) * 1.5, r_kind)
        res = dict(residual=to_layout(rs, layout))
    dy = dz64 * act.derivative(y + r64)
    xl, dzl = to_layout(xs, layout), to_layout(dzs, layout)
    k_dy, k_u, k_0 = np.linspace(0.5, 1.5, shape[1]), np.linspace(-0.1, 0.1, shape[1]), np.linspace(-1, 1, shape[1])
    sums = dict(rtol=1e-9, atol=1e-9)

    mean_k, var_k, lo, hi = BACKEND.channel_stats(xl, layout, with_range=True)
    np.testing.assert_allclose(mean_k, x64.mean(axis=(0, 2)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var_k, x64.var(axis=(0, 2)), rtol=1e-11, atol=1e-13)
    np.testing.assert_array_equal(lo, x64.min(axis=(0, 2)))
    np.testing.assert_array_equal(hi, x64.max(axis=(0, 2)))

    out = empty_as(xl.shape, out_kind)
    BACKEND.normalize_act(xl, out, layout, mean, scale, beta, act, **res)
    np.testing.assert_allclose(values_of(to_ncs(out, layout), out_kind), act.forward(y + r64), **out_tol(out_kind))
    if out_kind == x_kind:
        inplace = xl.copy()
        BACKEND.normalize_act(inplace, inplace, layout, mean, scale, beta, act, **res)  # output aliases input
        np.testing.assert_array_equal(inplace, out)

    s_dy, s_dyx = BACKEND.reduce_from_input(xl, dzl, layout, mean, invstd, scale, beta, act, **res)
    np.testing.assert_allclose(s_dy, dy.sum(axis=(0, 2)), **sums)
    np.testing.assert_allclose(s_dyx, (dy * u * bc(invstd)).sum(axis=(0, 2)), **sums)

    def check_dx(dx, dres, want):
        np.testing.assert_allclose(values_of(to_ncs(dx, layout), out_kind), want, **out_tol(out_kind))
        if dres is not None:
            np.testing.assert_allclose(values_of(to_ncs(dres, layout), dres_kind), dy, **out_tol(dres_kind))

    dres = empty_as(xl.shape, dres_kind) if dres_kind else None
    dx = empty_as(xl.shape, out_kind)
    BACKEND.dx_from_input(xl, dzl, dx, layout, mean, scale, beta, act, k_dy, k_u, k_0, dres=dres, **res)
    check_dx(dx, dres, bc(k_dy) * dy + bc(k_u) * u + bc(k_0))

    if act.invertible:  # from z as the forward stored it (in x's format), widened
        zs, z64 = stored_as(act.forward(y + r64), x_kind)
        zl = to_layout(zs, layout)
        y = act.inverse(z64) - r64
        dy = dz64 * act.derivative_from_output(z64)
        s_dy, s_dyy = BACKEND.reduce_from_output(zl, dzl, layout, beta, act, **res)
        np.testing.assert_allclose(s_dy, dy.sum(axis=(0, 2)), **sums)
        np.testing.assert_allclose(s_dyy, (dy * (y - bc(beta))).sum(axis=(0, 2)), **sums)
        BACKEND.dx_from_output(zl, dzl, dx, layout, beta, act, k_dy, k_u, k_0, dres=dres, **res)
        check_dx(dx, dres, bc(k_dy) * dy + bc(k_u) * (y - bc(beta)) + bc(k_0))


HALF_ACTS = [get_activation("silu"), get_activation("leaky_relu", 0.1)]  # a tiled kernel and a branch-free one


@pytest.mark.parametrize("act", HALF_ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_half_storage_primitives(fmt, layout, act):
    check_storage((3, 5, 85), layout, act, fmt, fmt)


# Each kernel (activation x layout) and each format once with a residual: every kernel specialization costs a
# compilation of a second or two, the dominant cost of these tests on a cold cache.
@pytest.mark.parametrize("fmt,layout,act", [("fp16", "ncs", HALF_ACTS[0]), ("bf16", "nsc", HALF_ACTS[0]),
                                            ("bf16", "ncs", HALF_ACTS[1]), ("fp16", "nsc", HALF_ACTS[1])],
                         ids=lambda v: getattr(v, "name", v))
def test_half_storage_residual(fmt, layout, act):
    check_storage((2, 16, 257), layout, act, fmt, fmt, r_kind=fmt, dres_kind=fmt)


@pytest.mark.parametrize("layout,act", [("ncs", HALF_ACTS[0]), ("nsc", HALF_ACTS[1])],
                         ids=lambda v: getattr(v, "name", v))
def test_mixed_storage(layout, act):
    """Each array in its own format: fp16 x, float32 dz, bf16 residual, float32 outputs, fp16 dres."""
    check_storage((2, 6, 40), layout, act, "fp16", "f32", r_kind="bf16", out_kind="f32", dres_kind="fp16")


# -- gradients with unusual strides, through the PyTorch adapter ----------------------------------------------------
@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint", "inplace_abn"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_gradients(strategy, channels_last):
    """A stride-0 gradient (from .sum()), an expanded one (from a spatial mean) and a permuted one."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.rand(4, dtype=torch.float64) - 0.5
    losses = [lambda z: z.sum(), lambda z: z.mean(dim=(2, 3)).square().sum(),
              lambda z: (z.transpose(2, 3) * torch.arange(30.0, dtype=torch.float64).view(5, 6).T).sum()]
    for loss in losses:
        grads = []
        for strat in ("standard", strategy):
            xi = x.clone().requires_grad_()
            wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
            loss(batch_norm_act(xi, None, None, wi, bi, True, 0.1, 1e-5, "leaky_relu", 0.1, strat)).backward()
            grads.append((xi.grad, wi.grad, bi.grad))
        for got, want in zip(*grads[::-1]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("strategy", ["checkpoint", "efficient_checkpoint", "inplace_abn"])
def test_backward_allocates_only_dx(strategy):
    """Backward allocates one activation-sized tensor (dx); everything else it allocates is per-channel."""
    x = torch.randn(4, 32, 32, 32, requires_grad=True)
    layer = BatchNormAct2d(32, strategy=strategy)
    z = layer(x)  # a leaf input: its gradient is dx itself, no copy
    dz = torch.randn_like(z)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        z.backward(dz)
    # allocations of leaf ops only (a parent event repeats its children's allocations)
    sizes = [e.cpu_memory_usage for e in prof.events() if not e.cpu_children and e.cpu_memory_usage > 0]
    big = [s for s in sizes if s >= x.numel() * x.element_size() // 8]
    assert big == [x.numel() * x.element_size()], sizes


@pytest.mark.parametrize("count", [1, 2, 50])
@pytest.mark.parametrize("kind", RUNNING_KINDS)
def test_update_running_stats(kind, count):
    """In place on the buffers in their own storage format, rounded once: nn.BatchNorm's rule with the unbiased
    variance (count 1, which training refuses, keeps the biased one instead of dividing by zero)."""
    (running_mean, running_var), batch, want, tolerance = running_case(kind, count)
    BACKEND.update_running_stats(running_mean, running_var, *batch)
    np.testing.assert_allclose(running_values(running_mean, kind), want[0], **tolerance)
    np.testing.assert_allclose(running_values(running_var, kind), want[1], **tolerance)
