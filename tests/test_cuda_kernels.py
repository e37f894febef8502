"""The CUDA backend's primitives against plain float64 NumPy and against the CPU backend.

Runs on a real GPU, or under Numba's CUDA simulator on a CPU-only machine (tests/conftest.py turns it on).  The
simulator runs every CUDA thread as a Python thread, so each case stays at a few thousand elements and a few
blocks; sizes straddle the launch geometry instead (THREADS_PER_BLOCK = 256 lanes per reduction block, 1024
elements per elementwise block, channel tiles of 1..32); smaller launches get fewer threads (whole warps).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from numba import cuda

from kernel_data import (ACTIVATION_SPECS, HALF_FORMATS, RESIDUAL_SPECS, RUNNING_KINDS, all_half_bits, empty_as,
                         half_from_bits, half_to_bits, make, narrowing_cases, out_tol, running_case, running_values,
                         stored_as, to_layout, to_ncs, tol, values_of)
from ckptnorm import get_activation
from ckptnorm._cuda import geometry
from ckptnorm._cuda.backend import CUDABackend, _simulated
from ckptnorm.backends import get_backend
from ckptnorm.backends.storage import narrow, widen

SIM = _simulated()
BACKEND = CUDABackend()
ACTS = [get_activation(n, p) for n, p in ACTIVATION_SPECS]
RESIDUAL_ACTS = [get_activation(n, p) for n, p in RESIDUAL_SPECS]
ELU = get_activation("elu", 1.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- helpers ----------------------------------------------------------------------------------------------------------




def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host()




def coefs(c):
    return np.linspace(0.5, 1.5, c), np.linspace(-0.1, 0.1, c), np.linspace(-1, 1, c)




def bc(v):
    return v[None, :, None]  # per-channel broadcast in NCS


def device_view(view, base):
    """The device twin of ``view``, a NumPy view (any strides, stride 0 included) starting at ``base[0, ...]``."""
    assert base.flags.c_contiguous and view.__array_interface__["data"][0] == base.__array_interface__["data"][0]
    if SIM:
        return view  # the backend views NumPy arrays without copying
    try:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        data = cuda.to_device(base)
        twin = DeviceNDArray(view.shape, view.strides, view.dtype, gpu_data=data.gpu_data)
        twin._keepalive = data
        return twin
    except Exception as exc:  # real CUDA only: no way to build such a device array here
        pytest.skip(f"cannot build a strided device view with this numba-cuda: {exc}")


def stride0(value, shape, dtype):
    """A gradient with stride 0 in every dim (what ``z.sum().backward()`` hands over)."""
    base = np.full((1,) * len(shape), value, dtype)
    return device_view(np.broadcast_to(base, shape), base)


def check_all(shape, dtype, layout, act, seed=0, dz_const=None):
    """Every primitive of the CUDA backend against float64 NumPy on one input (``dz_const``: a stride-0 dz)."""
    x, dz, mean, invstd, gamma, beta = make(shape, dtype, seed)
    if dz_const is not None:
        dz = np.full(shape, dz_const, dtype)
    scale = gamma * invstd
    x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
    u = x64 - bc(mean)
    y = u * bc(scale) + bc(beta)
    z_ref = act.forward(y)
    dy = dz64 * act.derivative(y)
    xl = to_layout(x, layout)
    dzl = to_layout(dz, layout)
    xd, dzd = dev(xl), (dev(dzl) if dz_const is None else stride0(dz_const, dzl.shape, dtype))
    m_d, s_d, b_d, i_d = dev(mean), dev(scale), dev(beta), dev(invstd)
    k_dy, k_u, k_0 = coefs(shape[1])
    k_d = [dev(k) for k in (k_dy, k_u, k_0)]

    out = cuda.device_array_like(xl)
    BACKEND.normalize_act(xd, out, layout, m_d, s_d, b_d, act)
    np.testing.assert_allclose(to_ncs(host(out), layout), z_ref, **tol(dtype))
    inplace = dev(xl)
    BACKEND.normalize_act(inplace, inplace, layout, m_d, s_d, b_d, act)  # output aliases input
    np.testing.assert_array_equal(host(inplace), host(out))

    s_dy, s_dyx = BACKEND.reduce_from_input(xd, dzd, layout, m_d, i_d, s_d, b_d, act)
    np.testing.assert_allclose(host(s_dy), dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(host(s_dyx), (dy * u * bc(invstd)).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)

    dx = cuda.device_array_like(xl)
    BACKEND.dx_from_input(xd, dzd, dx, layout, m_d, s_d, b_d, act, *k_d)
    np.testing.assert_allclose(to_ncs(host(dx), layout), bc(k_dy) * dy + bc(k_u) * u + bc(k_0), **tol(dtype))

    if act.invertible:
        zd = dev(to_layout(z_ref, layout))  # z in float64: isolates the kernel from z's rounding
        # ... but not from the inverse's conditioning (celu(0.5) far below 0): y, phi' as the oracle recovers them
        y, dy = act.inverse(z_ref), dz64 * act.derivative_from_output(z_ref)
        s_dy, s_dyy = BACKEND.reduce_from_output(zd, dzd, layout, b_d, act)
        np.testing.assert_allclose(host(s_dy), dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(host(s_dyy), (dy * (y - bc(beta))).sum(axis=(0, 2)), rtol=1e-8, atol=1e-8)
        dx = cuda.device_array(xl.shape, dtype)
        BACKEND.dx_from_output(zd, dzd, dx, layout, b_d, act, *k_d)
        want = bc(k_dy) * dy + bc(k_u) * (y - bc(beta)) + bc(k_0)
        np.testing.assert_allclose(to_ncs(host(dx), layout), want, **tol(dtype))


def check_stats(shape, dtype, layout, seed=0):
    x, *_ = make(shape, dtype, seed)
    mean, var, lo, hi = BACKEND.channel_stats(dev(to_layout(x, layout)), layout, with_range=True)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(host(mean), x64.mean(axis=(0, 2)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(host(var), x64.var(axis=(0, 2)), rtol=1e-11, atol=1e-13)
    np.testing.assert_array_equal(host(lo), x64.min(axis=(0, 2)))
    np.testing.assert_array_equal(host(hi), x64.max(axis=(0, 2)))


# -- import and compilation -------------------------------------------------------------------------------------------
def _without_simulator():
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return env


def test_import_without_simulator_compiles_nothing():
    """Importing the kernels needs no GPU, no driver and no simulator, and compiles nothing (lazy @cuda.jit)."""
    code = textwrap.dedent("""
        from ckptnorm._cuda import kernels
        from ckptnorm._cuda.backend import CUDABackend, _simulated
        assert not _simulated()
        CUDABackend()
        for name in ("stats_partials", "stats_finalize", "sums_finalize", "normalize_act",
                     "reduce_from_input_partials", "reduce_from_output_partials", "dx_from_input", "dx_from_output"):
            assert not getattr(kernels, name).overloads, name
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], check=False, env=_without_simulator(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def _libdevice():
    """libdevice of a CUDA toolkit: CUDA_HOME, CUDA_PATH, /usr/local/cuda*, or the pip wheel nvidia-cuda-nvcc
    (site-packages/nvidia/cu*/nvvm), which CI installs in its second environment for this test."""
    roots = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")] + sorted(glob.glob("/usr/local/cuda*"))
    nvidia = importlib.util.find_spec("nvidia")
    if nvidia is not None and nvidia.submodule_search_locations:
        roots += sorted(glob.glob(os.path.join(list(nvidia.submodule_search_locations)[0], "cu*")))
    for root in filter(None, roots):
        found = sorted(glob.glob(os.path.join(root, "nvvm", "libdevice", "libdevice*.bc")))
        if found:
            return found[-1]
    return None


def _skip_or_fail(why):
    """CKPTNORM_REQUIRE_PTX=1 (CI's second environment, which installs the toolkit) turns a skip into a failure."""
    if os.environ.get("CKPTNORM_REQUIRE_PTX") == "1":
        pytest.fail(f"the PTX check was required but cannot run: {why}")
    pytest.skip(why)


@pytest.mark.slow  # compiles every kernel to PTX (CI also runs it on its own)
def test_kernels_compile_for_a_real_gpu():
    """Every kernel type-checks and compiles to PTX for sm_90 (the simulator runs plain Python and checks neither).

    Needs only NVVM and libdevice, not a GPU: the device query and NVRTC's architecture lookup are stubbed in a
    subprocess.  Also checks the invariants visible in PTX: no atomics; barriers only in the partials kernels.
    Kernels with optional operands compile once per signature the backend launches: the plain path (stand-ins of
    the kernel's own argument types, flags False) and residual/dres views of any strides, also of another dtype;
    and activations stored as fp16 (uint16) or bf16 (int16) bits, alone and mixed with float32; the running
    statistics' update in each storage format.
    """
    libdevice = _libdevice()
    if libdevice is None:
        _skip_or_fail("no CUDA toolkit with libdevice found (CUDA_HOME, /usr/local/cuda*, pip nvidia-cuda-nvcc)")
    code = textwrap.dedent(rf"""
        import re
        import sys
        from numba import cuda
        from numba.cuda import boolean, float32, float64, int16, int64, uint16
        # Stubs of numba-cuda internals (no GPU here): if this numba-cuda lays them out differently, skip, since
        # what is under test is our kernels, not the stubs.
        try:
            import numba.cuda.dispatcher as dispatcher
            from numba.cuda.cudadrv import libs, nvrtc, nvvm
            nvvm.NVVM()

            class Device:
                compute_capability = (9, 0)

            dispatcher.get_current_device
            nvrtc.get_arch_option
            dispatcher.get_current_device = lambda: Device()
            nvrtc.get_arch_option = lambda major, minor: f"compute_{{major}}{{minor}}"
            for mod in (libs, nvvm):
                mod.get_libdevice = lambda: {libdevice!r}
                mod.open_libdevice = lambda: open({libdevice!r}, "rb").read()
        except Exception as exc:
            print("skip:", type(exc).__name__, exc)
            sys.exit(0)

        from ckptnorm._cuda import kernels as K
        X, DZ, V, P = float32[:, :, ::1], float32[:, :, :], float64[:], float64[:, :, :]
        B, I, F = boolean, int64, float64
        # half-precision storage: fp16 bits as uint16, bf16 bits as int16
        H, BF = uint16[:, :, ::1], int16[:, :, :]
        sigs = []
        for S in (X, H, BF):
            sigs += [("stats_partials", (S, B, I, I, B, P)), ("stats_finalize", (S, B, P, I, B, V, V, V, V))]
        sigs.append(("sums_finalize", (P, I, V, B, V, V)))
        # (x or z, dz, residual, dx or out, dres): the plain path's stand-ins (x or dz, dx), any strides, float64;
        # all in one half format; and mixed, each array in its own format
        for X_, DZ_, R, D, DR in ((X, DZ, X, X, X), (X, DZ, DZ, X, X), (X, DZ, P, X, P), (H, H, H, H, H),
                                  (BF, BF, BF, BF, BF), (H, DZ, BF, X, H)):
            sigs += [
                ("normalize_act", (X_, D, B, V, V, V, I, F, R, B)),
                ("reduce_from_input_partials", (X_, DZ_, B, V, V, V, I, F, R, B, I, I, P)),
                ("reduce_from_output_partials", (X_, DZ_, B, V, I, F, R, B, I, I, P)),
                ("dx_from_input", (X_, DZ_, D, B, V, V, V, I, F, V, V, V, R, B, DR, B)),
                ("dx_from_output", (X_, DZ_, D, B, V, I, F, V, V, V, R, B, DR, B)),
            ]
        # the running statistics, updated in place in each storage format
        for R in (float64[:], float32[:], uint16[:], int16[:]):
            sigs.append(("running_update", (R, R, V, V, I, F)))
        for name, sig in sigs:
            ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=(9, 0))
            assert not re.search(r"^\s*(@%p\d+\s+)?(atom|red)\.", ptx, re.M), name  # no atomics
            assert ("bar.sync" in ptx or "barrier" in ptx) == name.endswith("_partials"), name
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], check=False, env=_without_simulator(), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    if run.returncode == 0 and run.stdout.startswith("skip:"):
        _skip_or_fail(f"NVVM not available: {run.stdout[5:].strip()}")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


# -- launch geometry --------------------------------------------------------------------------------------------------
def test_geometry_depends_on_shape_only_and_is_bounded():
    T, W = geometry.THREADS_PER_BLOCK, geometry.WARP_SIZE
    items = geometry.ELEMENTWISE_ITEMS_PER_THREAD
    # elementwise: one thread per `items` elements in whole warps up to one block, then full blocks
    assert geometry.elementwise_launch(0) == (1, W) and geometry.elementwise_launch(1) == (1, W)
    assert geometry.elementwise_launch(W * items + 1) == (1, 2 * W)
    assert geometry.elementwise_launch(T * items) == (1, T)
    assert geometry.elementwise_launch(T * items + 1) == (2, T)
    assert geometry.elementwise_launch(10 ** 12) == (geometry.ELEMENTWISE_MAX_BLOCKS, T)
    for total in (0, 1, 33, 129, 1023, 1024, 1025, 10 ** 6):
        blocks, threads = geometry.elementwise_launch(total)
        assert threads % W == 0 and W <= threads <= T and blocks * threads * items >= min(total, 10 ** 6)
    # finalize: one thread per channel
    assert geometry.finalize_launch(3) == (1, W) and geometry.finalize_launch(33) == (1, 2 * W)
    assert geometry.finalize_launch(T + 1) == (2, T)
    for rows in (0, 1, 5, 17, 129, 4096, 4097, 10 ** 5, 10 ** 9):
        for channels in (1, 3, 17, 64, 2048):
            for cl in (False, True):
                tile, n_part, (blocks, threads) = geometry.reduce_geometry(rows, channels, cl)
                assert (tile, n_part, (blocks, threads)) == geometry.reduce_geometry(rows, channels, cl)
                lanes = threads // tile
                assert tile & (tile - 1) == 0 and lanes & (lanes - 1) == 0 and lanes * tile == threads
                # whole warps, at most one full block; lanes cover the rows, and fewer lanes than the full block's
                # only where half of them would not cover the rows or the block would drop below one warp
                assert W <= threads <= T and threads % W == 0
                assert lanes >= min(T // tile, rows)
                assert lanes == T // tile or lanes // 2 < rows or threads == W
                assert T // tile >= (8 if cl else 32)
                assert 1 <= n_part <= geometry.REDUCE_MAX_PARTIALS
                assert blocks == -(-channels // tile) * n_part
                assert n_part == 1 or rows > lanes * geometry.REDUCE_ITEMS_PER_THREAD * (n_part - 1)
    def tile_and_lanes(rows, channels, cl):
        tile, _, (_, threads) = geometry.reduce_geometry(rows, channels, cl)
        return tile, threads // tile

    assert tile_and_lanes(17, 17, False) == (8, 32)  # few rows: up to 8 channels per "ncs" block
    assert tile_and_lanes(257, 17, False) == (1, T)
    assert tile_and_lanes(100, 1, False) == (1, 128)  # 100 rows: 128 lanes, not 256
    assert tile_and_lanes(5, 3, True) == (4, 8)  # 3 channels: a tile of 4 in "nsc", one warp
    assert tile_and_lanes(5, 100, True) == (32, 8)  # 5 rows: 8 lanes (the next power of 2)


# -- statistics -------------------------------------------------------------------------------------------------------
# (N, C, S): rows N*S and channels around the block's 256 lanes, the channel tiles and the ncs tile thresholds
STATS_SHAPES = [(1, 1, 1), (3, 1, 5), (1, 3, 16), (1, 17, 1), (2, 1, 64), (1, 3, 129), (1, 1, 257)]


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", STATS_SHAPES, ids=str)
def test_channel_stats(shape, dtype, layout):
    check_stats(shape, dtype, layout)


@pytest.mark.parametrize("channels", [7, 300])  # one block, and two (a grid-stride of one thread per channel)
@pytest.mark.parametrize("kind", RUNNING_KINDS)
def test_update_running_stats(kind, channels):
    """The CPU kernel's rule (tests/test_kernels.py), in place on device buffers in their own storage format."""
    (running_mean, running_var), batch, want, tolerance = running_case(kind, 50, channels)
    mean_d, var_d = dev(running_mean), dev(running_var)
    BACKEND.update_running_stats(mean_d, var_d, dev(batch[0]), dev(batch[1]), *batch[2:])
    np.testing.assert_allclose(running_values(host(mean_d), kind), want[0], **tolerance)
    np.testing.assert_allclose(running_values(host(var_d), kind), want[1], **tolerance)


def test_channel_stats_without_range_and_large_mean():
    x = (1e4 + np.random.default_rng(0).standard_normal((2, 2, 600))).astype(np.float32)
    mean, var, lo, hi = BACKEND.channel_stats(dev(x), "ncs")
    assert lo is None and hi is None
    np.testing.assert_allclose(host(mean), x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(host(var), x.astype(np.float64).var(axis=(0, 2)), rtol=1e-9)  # no cancellation


# -- every primitive --------------------------------------------------------------------------------------------------
# Storage dtypes only change loads and stores, which the first six activations cover: the others in float64 only
# (each simulated case costs a second or two).
@pytest.mark.parametrize("dtype,act", [(dt, a) for a in ACTS for dt in (np.float32, np.float64)
                                       if dt == np.float64 or a in ACTS[:6]],
                         ids=lambda v: getattr(v, "name", getattr(v, "__name__", v)))
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_primitives_all_activations(dtype, layout, act):
    check_all((2, 3, 37), dtype, layout, act, seed=1)


# (N, C, S): totals around 1024 (one elementwise block), rows around the lanes, channel counts 1, 3, 17
ODD_SHAPES = [(1, 1, 1), (1, 17, 1), (3, 1, 5), (1, 3, 16), (1, 17, 17), (1, 3, 127), (2, 1, 64), (1, 3, 129),
              (1, 1, 257), (3, 17, 20), (2, 3, 171)]


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_primitives_odd_sizes(shape, layout):
    check_all(shape, np.float32, layout, ELU, seed=2)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_stride0_gradient(layout):
    shape = (2, 3, 37)
    check_all(shape, np.float32, layout, get_activation("leaky_relu", 0.1), seed=3, dz_const=0.75)


@pytest.mark.parametrize("layout,shape", [("ncs", (0, 2, 5)), ("nsc", (3, 0, 2))], ids=str)
def test_empty_batch(layout, shape):
    """No rows: sums are 0, statistics NaN (0/0), the range empty (inf, -inf); elementwise kernels do nothing."""
    x = cuda.device_array(shape, np.float32)
    v = dev(np.ones(2))
    mean, var, lo, hi = (host(a) for a in BACKEND.channel_stats(x, layout, with_range=True))
    assert np.isnan(mean).all() and np.isnan(var).all() and (lo == np.inf).all() and (hi == -np.inf).all()
    for sums in (BACKEND.reduce_from_input(x, x, layout, v, v, v, v, ELU),
                 BACKEND.reduce_from_output(x, x, layout, v, ELU),
                 BACKEND.reduce_from_input(x, x, layout, v, v, v, v, ELU, residual=x),
                 BACKEND.reduce_from_output(x, x, layout, v, ELU, residual=x)):
        assert [host(a).tolist() for a in sums] == [[0.0, 0.0], [0.0, 0.0]]
    BACKEND.normalize_act(x, x, layout, v, v, v, ELU)
    BACKEND.normalize_act(x, x, layout, v, v, v, ELU, residual=x)
    BACKEND.dx_from_output(x, x, x, layout, v, ELU, v, v, v)
    BACKEND.dx_from_input(x, x, x, layout, v, v, v, ELU, v, v, v, residual=x, dres=x)
    BACKEND.dx_from_output(x, x, x, layout, v, ELU, v, v, v, residual=x, dres=x)


# -- residual sites: z = phi(BN(x) + r) -------------------------------------------------------------------------------
RESIDUAL_KINDS = ["dense", "strided", "transposed", "expanded", "scalar"]


def residual(kind, shape, dtype, layout, seed):
    """A residual operand of the given kind and its values as float64 in NCS.

    dense: contiguous in the layout; strided: every other element of a wider array; transposed: stored in the other
    memory order; expanded: stride 0 over the batch (``r.expand(N, ...)``); scalar: stride 0 in every dim.
    """
    rng = np.random.default_rng(seed + 100)
    values = rng.standard_normal(shape).astype(dtype)  # NCS
    other = "nsc" if layout == "ncs" else "ncs"
    if kind == "dense":
        base = view = to_layout(values, layout)
    elif kind == "strided":
        dense = to_layout(values, layout)
        base = np.zeros(dense.shape[:2] + (2 * dense.shape[2],), dtype)
        base[:, :, ::2] = dense
        view = base[:, :, ::2]
    elif kind == "transposed":
        base = to_layout(values, other)
        view = base.transpose(0, 2, 1)
    elif kind == "expanded":
        base = to_layout(values[:1], layout)
        view = np.broadcast_to(base, to_layout(values, layout).shape)
        values = np.broadcast_to(values[:1], shape)
    elif kind == "scalar":
        base = values.reshape(-1)[:1].reshape(1, 1, 1)
        view = np.broadcast_to(base, to_layout(values, layout).shape)
        values = np.broadcast_to(base, shape)
    else:
        raise ValueError(kind)
    if kind in ("strided", "transposed") and min(shape) > 1:
        assert not view.flags.c_contiguous
    np.testing.assert_array_equal(to_ncs(view, layout), values)
    return device_view(view, base), values.astype(np.float64)


def check_residual(shape, dtype, layout, act, kind="dense", seed=0):
    """Every primitive with a residual (and dres) against float64 NumPy: z = phi(y + r), dy = dz * phi'(y + r)."""
    x, dz, mean, invstd, gamma, beta = make(shape, dtype, seed)
    scale = gamma * invstd
    rd, r = residual(kind, shape, dtype, layout, seed)
    x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
    u = x64 - bc(mean)
    y = u * bc(scale) + bc(beta)
    z_ref = act.forward(y + r)
    dy = dz64 * act.derivative(y + r)
    xl, dzl = to_layout(x, layout), to_layout(dz, layout)
    xd, dzd = dev(xl), dev(dzl)
    m_d, s_d, b_d, i_d = dev(mean), dev(scale), dev(beta), dev(invstd)
    k_dy, k_u, k_0 = coefs(shape[1])
    k_d = [dev(k) for k in (k_dy, k_u, k_0)]
    tol_sum = dict(rtol=1e-9, atol=1e-9)

    out = cuda.device_array_like(xl)
    BACKEND.normalize_act(xd, out, layout, m_d, s_d, b_d, act, residual=rd)
    np.testing.assert_allclose(to_ncs(host(out), layout), z_ref, **tol(dtype))
    inplace = dev(xl)
    BACKEND.normalize_act(inplace, inplace, layout, m_d, s_d, b_d, act, residual=rd)  # output aliases input
    np.testing.assert_array_equal(host(inplace), host(out))

    s_dy, s_dyx = BACKEND.reduce_from_input(xd, dzd, layout, m_d, i_d, s_d, b_d, act, residual=rd)
    np.testing.assert_allclose(host(s_dy), dy.sum(axis=(0, 2)), **tol_sum)
    np.testing.assert_allclose(host(s_dyx), (dy * u * bc(invstd)).sum(axis=(0, 2)), **tol_sum)

    dx, dres = cuda.device_array_like(xl), cuda.device_array_like(xl)
    BACKEND.dx_from_input(xd, dzd, dx, layout, m_d, s_d, b_d, act, *k_d, residual=rd, dres=dres)
    np.testing.assert_allclose(to_ncs(host(dx), layout), bc(k_dy) * dy + bc(k_u) * u + bc(k_0), **tol(dtype))
    np.testing.assert_allclose(to_ncs(host(dres), layout), dy, **tol(dtype))
    dx_only = cuda.device_array_like(xl)
    BACKEND.dx_from_input(xd, dzd, dx_only, layout, m_d, s_d, b_d, act, *k_d, residual=rd)  # no dres: same dx
    np.testing.assert_array_equal(host(dx_only), host(dx))
    dz_inplace = dev(dzl)
    BACKEND.dx_from_input(xd, dz_inplace, dx_only, layout, m_d, s_d, b_d, act, *k_d, residual=rd, dres=dz_inplace)
    np.testing.assert_array_equal(host(dz_inplace), host(dres))  # dres may overwrite dz
    np.testing.assert_array_equal(host(dx_only), host(dx))

    if act.invertible:
        zd = dev(to_layout(z_ref, layout))  # z in float64: isolates the kernel from z's rounding
        y, dy = act.inverse(z_ref) - r, dz64 * act.derivative_from_output(z_ref)  # and from the inverse's conditioning
        s_dy, s_dyy = BACKEND.reduce_from_output(zd, dzd, layout, b_d, act, residual=rd)
        np.testing.assert_allclose(host(s_dy), dy.sum(axis=(0, 2)), **tol_sum)
        np.testing.assert_allclose(host(s_dyy), (dy * (y - bc(beta))).sum(axis=(0, 2)), rtol=1e-8, atol=1e-8)
        dx, dres = cuda.device_array(xl.shape, dtype), cuda.device_array(xl.shape, dtype)
        BACKEND.dx_from_output(zd, dzd, dx, layout, b_d, act, *k_d, residual=rd, dres=dres)
        want = bc(k_dy) * dy + bc(k_u) * (y - bc(beta)) + bc(k_0)
        np.testing.assert_allclose(to_ncs(host(dx), layout), want, **tol(dtype))
        np.testing.assert_allclose(to_ncs(host(dres), layout), dy, **tol(dtype))
        dx_only = cuda.device_array(xl.shape, dtype)
        BACKEND.dx_from_output(zd, dzd, dx_only, layout, b_d, act, *k_d, residual=rd)
        np.testing.assert_array_equal(host(dx_only), host(dx))


@pytest.mark.parametrize("act", RESIDUAL_ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_all_activations(dtype, layout, act):
    check_residual((2, 3, 37), dtype, layout, act, seed=8)


@pytest.mark.parametrize("act", [ELU, ACTS[4]], ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("kind", RESIDUAL_KINDS[1:])
def test_residual_any_strides(kind, layout, act):
    """Residual views the kernels only index: non-contiguous, the other memory order, stride 0 (expanded)."""
    check_residual((3, 5, 13), np.float32, layout, act, kind, seed=9)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 17, 1), (3, 1, 5), (1, 3, 129), (3, 17, 20)], ids=str)
def test_residual_odd_sizes(shape, layout):
    check_residual(shape, np.float64, layout, get_activation("leaky_relu", 0.1), "strided", seed=10)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_residual_none_is_the_plain_path(layout):
    """residual=None / dres=None (given or left out) is the plain path, bit for bit; a zero residual changes no bit
    (y + 0 and phi^-1(z) - 0 are exact); dres without a residual is dz * phi'(y)."""
    shape = (2, 3, 37)
    x, dz, mean, invstd, gamma, beta = make(shape, np.float32, seed=11)
    xl, dzl = to_layout(x, layout), to_layout(dz, layout)
    xd, dzd, zd = dev(xl), dev(dzl), dev(to_layout(ELU.forward(x.astype(np.float64)), layout))
    m_d, i_d, s_d, b_d = dev(mean), dev(invstd), dev(gamma * invstd), dev(beta)
    k_d = [dev(k) for k in coefs(shape[1])]
    zero = stride0(0.0, xl.shape, np.float32)

    def run(**kw):
        res = {k: v for k, v in kw.items() if k == "residual"}
        out, dx_in, dx_out = (cuda.device_array_like(xl) for _ in range(3))
        BACKEND.normalize_act(xd, out, layout, m_d, s_d, b_d, ELU, **res)
        BACKEND.dx_from_input(xd, dzd, dx_in, layout, m_d, s_d, b_d, ELU, *k_d, **kw)
        BACKEND.dx_from_output(zd, dzd, dx_out, layout, b_d, ELU, *k_d, **kw)
        return [host(out), *map(host, BACKEND.reduce_from_input(xd, dzd, layout, m_d, i_d, s_d, b_d, ELU, **res)),
                *map(host, BACKEND.reduce_from_output(zd, dzd, layout, b_d, ELU, **res)), host(dx_in), host(dx_out)]

    plain = run()
    for a, b in zip(plain, run(residual=None, dres=None)):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(plain, run(residual=zero)):
        np.testing.assert_array_equal(a, b)
    dres = cuda.device_array_like(xl)
    BACKEND.dx_from_input(xd, dzd, cuda.device_array_like(xl), layout, m_d, s_d, b_d, ELU, *k_d, dres=dres)
    y = (x.astype(np.float64) - bc(mean)) * bc(gamma * invstd) + bc(beta)
    np.testing.assert_allclose(to_ncs(host(dres), layout), dz * ELU.derivative(y), **tol(np.float32))


def test_residual_shape_must_match():
    x = dev(np.ones((2, 3, 4), np.float32))
    v = dev(np.ones(3))
    with pytest.raises(ValueError, match="residual has shape"):
        BACKEND.normalize_act(x, x, "ncs", v, v, v, ELU, residual=dev(np.ones((2, 3, 1), np.float32)))
    with pytest.raises(ValueError, match="dres has shape"):
        BACKEND.dx_from_output(x, x, x, "ncs", v, ELU, v, v, v, residual=x, dres=dev(np.ones((2, 4, 3), np.float32)))


# -- several partials per channel, determinism -------------------------------------------------------------------------
# rows beyond one block's minimum work: 4500 > 256 lanes * 16 ("ncs"), 1100 > 64 lanes * 16 ("nsc", tile of 4)
PARTIAL_CASES = [("ncs", (1, 1, 4500)), ("nsc", (1, 3, 1100))]


@pytest.mark.parametrize("layout,shape", PARTIAL_CASES, ids=str)
def test_several_partials_per_channel_bitwise_deterministic(layout, shape):
    rows = shape[0] * shape[2]
    assert geometry.reduce_geometry(rows, shape[1], layout == "nsc")[1] >= 2
    x, dz, mean, invstd, gamma, beta = make(shape, np.float32, seed=4)
    scale = gamma * invstd
    check_stats(shape, np.float32, layout, seed=4)
    act = get_activation("silu")
    xd, dzd = dev(to_layout(x, layout)), dev(to_layout(dz, layout))
    args = (dev(mean), dev(invstd), dev(scale), dev(beta), act)

    def run():
        return [host(a) for a in BACKEND.channel_stats(xd, layout, True) + BACKEND.reduce_from_input(
            xd, dzd, layout, *args) + BACKEND.reduce_from_output(xd, dzd, layout, args[3], ELU)]

    first = run()
    x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
    u = x64 - bc(mean)
    dy = dz64 * act.derivative(u * bc(scale) + bc(beta))
    np.testing.assert_allclose(first[4], dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(first[5], (dy * u * bc(invstd)).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    y = ELU.inverse(x64)
    dy = dz64 * ELU.derivative_from_output(x64)
    np.testing.assert_allclose(first[6], dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(first[7], (dy * (y - bc(beta))).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    again = run()
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()


# -- half-precision storage: fp16 as uint16 bits, bf16 as int16 bits ---------------------------------------------------
@cuda.jit
def _widen_all(stored, out):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < stored.size:
        out[i] = widen(stored[i])
        i += step


@cuda.jit
def _narrow_all(values, out):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < values.size:
        out[i] = narrow(values[i], out)
        i += step


# The simulator runs each thread in Python: few threads, each with many elements, keep its overhead small.
CONVERT_GRID = (4, 32) if SIM else (256, 256)


def widened(stored):
    out = cuda.device_array(stored.size, np.float64)
    _widen_all[CONVERT_GRID](dev(stored), out)
    return host(out)


def narrowed(values, storage):
    out = cuda.device_array(values.size, storage)
    _narrow_all[CONVERT_GRID](dev(values), out)
    return host(out)


def assert_same_float64(got, want):
    """Bit for bit; a NaN matches any NaN of the same sign (payloads are not compared)."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    np.testing.assert_array_equal(got[~nan].view(np.int64), want[~nan].view(np.int64))


@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_widen_every_bit_pattern(fmt):
    stored = all_half_bits(fmt)
    assert_same_float64(widened(stored), half_from_bits(stored, fmt))


@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_narrow_rounds_once_to_nearest_even(fmt):
    storage = HALF_FORMATS[fmt]
    values, want = narrowing_cases(fmt)
    np.testing.assert_array_equal(narrowed(values, storage), want)
    stored = all_half_bits(fmt)  # every bit pattern round-trips; NaN stays NaN, with its sign
    wide = half_from_bits(stored, fmt)
    back = narrowed(wide, storage)
    nan = np.isnan(wide)
    np.testing.assert_array_equal(back[~nan], stored[~nan])
    assert_same_float64(half_from_bits(back, fmt), wide)
    rng = np.random.default_rng(0)  # random values over the range against the reference (bf16: float32 values)
    lowest, highest = (-30, 20) if fmt == "fp16" else (-140, 130)
    x = rng.standard_normal(5000) * np.exp2(rng.integers(lowest, highest, 5000))
    if fmt == "bf16":
        with np.errstate(over="ignore"):
            x = x.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(narrowed(x, storage), half_to_bits(x, fmt))


def check_storage(shape, layout, act, x_kind, dz_kind, r_kind=None, out_kind=None, dres_kind=None, seed=12):
    """Every primitive with activations stored as ``*_kind`` against float64 NumPy on the widened inputs (kinds:
    "fp16", "bf16", "f32"); outputs within a couple of units of their format's rounding, per-channel sums tight
    (float64 over exactly the widened inputs).  ``r_kind`` None: no residual."""
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
        res = dict(residual=dev(to_layout(rs, layout)))
    dy = dz64 * act.derivative(y + r64)
    xl = to_layout(xs, layout)
    xd, dzd = dev(xl), dev(to_layout(dzs, layout))
    m_d, s_d, b_d, i_d = dev(mean), dev(scale), dev(beta), dev(invstd)
    k_dy, k_u, k_0 = coefs(shape[1])
    k_d = [dev(k) for k in (k_dy, k_u, k_0)]
    sums = dict(rtol=1e-9, atol=1e-9)

    mean_k, var_k, lo, hi = (host(a) for a in BACKEND.channel_stats(xd, layout, with_range=True))
    np.testing.assert_allclose(mean_k, x64.mean(axis=(0, 2)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var_k, x64.var(axis=(0, 2)), rtol=1e-11, atol=1e-13)
    np.testing.assert_array_equal(lo, x64.min(axis=(0, 2)))
    np.testing.assert_array_equal(hi, x64.max(axis=(0, 2)))

    out = cuda.to_device(empty_as(xl.shape, out_kind))
    BACKEND.normalize_act(xd, out, layout, m_d, s_d, b_d, act, **res)
    z_want = act.forward(y + r64)
    np.testing.assert_allclose(values_of(to_ncs(host(out), layout), out_kind), z_want, **out_tol(out_kind))
    if out_kind == x_kind:
        inplace = dev(xl)
        BACKEND.normalize_act(inplace, inplace, layout, m_d, s_d, b_d, act, **res)  # output aliases input
        np.testing.assert_array_equal(host(inplace), host(out))

    s_dy, s_dyx = BACKEND.reduce_from_input(xd, dzd, layout, m_d, i_d, s_d, b_d, act, **res)
    np.testing.assert_allclose(host(s_dy), dy.sum(axis=(0, 2)), **sums)
    np.testing.assert_allclose(host(s_dyx), (dy * u * bc(invstd)).sum(axis=(0, 2)), **sums)

    def check_dx(dx, dres, want):
        np.testing.assert_allclose(values_of(to_ncs(host(dx), layout), out_kind), want, **out_tol(out_kind))
        if dres is not None:
            np.testing.assert_allclose(values_of(to_ncs(host(dres), layout), dres_kind), dy, **out_tol(dres_kind))

    dres = cuda.to_device(empty_as(xl.shape, dres_kind)) if dres_kind else None
    dx = cuda.to_device(empty_as(xl.shape, out_kind))
    BACKEND.dx_from_input(xd, dzd, dx, layout, m_d, s_d, b_d, act, *k_d, dres=dres, **res)
    check_dx(dx, dres, bc(k_dy) * dy + bc(k_u) * u + bc(k_0))

    if act.invertible:  # from z as the forward stored it (in x's format), widened
        zs, z64 = stored_as(z_want, x_kind)
        zd = dev(to_layout(zs, layout))
        y = act.inverse(z64) - r64
        dy = dz64 * act.derivative_from_output(z64)
        s_dy, s_dyy = BACKEND.reduce_from_output(zd, dzd, layout, b_d, act, **res)
        np.testing.assert_allclose(host(s_dy), dy.sum(axis=(0, 2)), **sums)
        np.testing.assert_allclose(host(s_dyy), (dy * (y - bc(beta))).sum(axis=(0, 2)), **sums)
        BACKEND.dx_from_output(zd, dzd, dx, layout, b_d, act, *k_d, dres=dres, **res)
        check_dx(dx, dres, bc(k_dy) * dy + bc(k_u) * (y - bc(beta)) + bc(k_0))


HALF_ACTS = [get_activation("silu"), ACTS[1]]  # a smooth activation and leaky_relu


@pytest.mark.parametrize("act", HALF_ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_half_storage_primitives(fmt, layout, act):
    check_storage((2, 3, 37), layout, act, fmt, fmt)


@pytest.mark.parametrize("act", HALF_ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("fmt", HALF_FORMATS)
def test_half_storage_residual(fmt, layout, act):
    check_storage((2, 3, 37), layout, act, fmt, fmt, r_kind=fmt, dres_kind=fmt, seed=13)


@pytest.mark.parametrize("layout,act", [("ncs", HALF_ACTS[0]), ("nsc", HALF_ACTS[1])],
                         ids=lambda v: getattr(v, "name", v))
def test_mixed_storage(layout, act):
    """Each array in its own format: fp16 x, float32 dz, bf16 residual, float32 outputs, fp16 dres."""
    check_storage((2, 3, 37), layout, act, "fp16", "f32", r_kind="bf16", out_kind="f32", dres_kind="fp16")


# -- against the CPU backend ------------------------------------------------------------------------------------------
def _close(got, want, scale):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("act", [get_activation(n, p) for n, p in [("leaky_relu", 0.1), ("elu", 1.0), ("gelu", None),
                                                                    ("hardswish", None), ("mish", None),
                                                                    ("celu", 0.5)]],
                         ids=lambda a: a.name)
@pytest.mark.parametrize("layout", ["ncs", "nsc"])
def test_matches_cpu_backend(layout, act):
    cpu = get_backend("cpu")
    shape = (2, 5, 30)
    x, dz, mean, invstd, gamma, beta = make(shape, np.float64, seed=5)
    scale = gamma * invstd
    xl, dzl = to_layout(x, layout), to_layout(dz, layout)
    xd, dzd = dev(xl), dev(dzl)
    m_d, i_d, s_d, b_d = dev(mean), dev(invstd), dev(scale), dev(beta)
    ks = coefs(shape[1])
    k_d = [dev(k) for k in ks]
    big = float(np.abs(xl).sum())  # scale of the sums, for their absolute tolerance

    for got, want in zip(BACKEND.channel_stats(xd, layout, True), cpu.channel_stats(xl, layout, True)):
        _close(host(got), want, big)
    z_cpu = np.empty_like(xl)
    cpu.normalize_act(xl, z_cpu, layout, mean, scale, beta, act)
    z = cuda.device_array_like(xl)
    BACKEND.normalize_act(xd, z, layout, m_d, s_d, b_d, act)
    _close(host(z), z_cpu, 1.0)
    for got, want in zip(BACKEND.reduce_from_input(xd, dzd, layout, m_d, i_d, s_d, b_d, act),
                         cpu.reduce_from_input(xl, dzl, layout, mean, invstd, scale, beta, act)):
        _close(host(got), want, big)
    dx_cpu = np.empty_like(xl)
    cpu.dx_from_input(xl, dzl, dx_cpu, layout, mean, scale, beta, act, *ks)
    dx = cuda.device_array_like(xl)
    BACKEND.dx_from_input(xd, dzd, dx, layout, m_d, s_d, b_d, act, *k_d)
    _close(host(dx), dx_cpu, 1.0)
    if act.invertible:
        zd = dev(z_cpu)
        for got, want in zip(BACKEND.reduce_from_output(zd, dzd, layout, b_d, act),
                             cpu.reduce_from_output(z_cpu, dzl, layout, beta, act)):
            _close(host(got), want, big)
        cpu.dx_from_output(z_cpu, dzl, dx_cpu, layout, beta, act, *ks)
        BACKEND.dx_from_output(zd, dzd, dx, layout, b_d, act, *k_d)
        _close(host(dx), dx_cpu, 1.0)


@pytest.mark.parametrize("name,param,floor", [("elu", 0.5, -0.5), ("celu", 0.5, -0.5),
                                              ("selu", None, -1.6732632423543772 * 1.0507009873554805)])
def test_exp_inverse_clamp_matches_cpu(name, param, floor):
    """z rounded onto the asymptote (-alpha; selu: -scale * alpha): y = phi^-1(z) stays finite, exactly as on the
    CPU."""
    cpu = get_backend("cpu")
    act = get_activation(name, param)
    z = np.array([floor, floor, -0.3, 0.0, 1.5, floor * (1 - 1e-17)]).reshape(1, 6, 1)
    dz = np.linspace(-1, 1, 6).reshape(1, 6, 1)
    beta, ks = np.full(1, 0.1), [np.full(1, v) for v in (0.5, -0.2, 0.3)]
    for got, want in zip(BACKEND.reduce_from_output(dev(z), dev(dz), "nsc", dev(beta), act),
                         cpu.reduce_from_output(z, dz, "nsc", beta, act)):
        assert np.isfinite(host(got)).all()
        _close(host(got), want, 10.0)
    dx_cpu, dx = np.empty_like(z), cuda.device_array_like(z)
    cpu.dx_from_output(z, dz, dx_cpu, "nsc", beta, act, *ks)
    BACKEND.dx_from_output(dev(z), dev(dz), dx, "nsc", dev(beta), act, *[dev(k) for k in ks])
    assert np.isfinite(host(dx)).all()
    _close(host(dx), dx_cpu, 10.0)


# -- memory and streams -----------------------------------------------------------------------------------------------
def test_every_buffer_comes_from_allocate_on_the_given_stream():
    calls = []

    def allocate(shape, dtype):
        calls.append((tuple(shape), np.dtype(dtype)))
        array = cuda.device_array(shape, dtype)
        returned.append(array)
        return array

    returned = []
    stream = cuda.stream()
    backend = CUDABackend(allocate=allocate, stream=stream)
    shape = (2, 3, 20)
    x, dz, mean, invstd, gamma, beta = make(shape, np.float32, seed=6)
    xd, dzd = dev(x), dev(dz)
    per_channel = [dev(v) for v in (mean, invstd, gamma * invstd, beta)]

    result = backend.channel_stats(xd, "ncs")
    assert len(calls) == 3 and result[0] is returned[0] and result[1] is returned[1] and result[2:] == (None, None)
    assert calls[:2] == [((3,), np.dtype(np.float64))] * 2 and calls[2][1] == np.float64  # + partials
    calls.clear(), returned.clear()
    result = backend.channel_stats(xd, "ncs", with_range=True)
    assert len(calls) == 5 and all(r is a for r, a in zip(result, returned))
    np.testing.assert_allclose(backend.to_host(result[0]), x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-13)
    calls.clear(), returned.clear()
    result = backend.reduce_from_input(xd, dzd, "ncs", *per_channel, ELU)
    assert len(calls) == 3 and result[0] is returned[0] and result[1] is returned[1]
    calls.clear(), returned.clear()
    result = backend.reduce_from_output(xd, dzd, "ncs", per_channel[3], ELU)
    assert len(calls) == 3 and result[0] is returned[0] and result[1] is returned[1]
    calls.clear(), returned.clear()
    result = backend.reduce_from_input(xd, dzd, "ncs", *per_channel, ELU, residual=dzd)  # the residual costs nothing
    assert len(calls) == 3 and result[0] is returned[0] and result[1] is returned[1]
    calls.clear()
    out, dres = cuda.device_array_like(x), cuda.device_array_like(x)
    backend.normalize_act(xd, out, "ncs", per_channel[0], per_channel[2], per_channel[3], ELU)
    backend.dx_from_input(xd, dzd, out, "ncs", per_channel[0], per_channel[2], per_channel[3], ELU, *per_channel[:3])
    backend.dx_from_output(xd, dzd, out, "ncs", per_channel[3], ELU, *per_channel[:3])
    backend.normalize_act(xd, out, "ncs", per_channel[0], per_channel[2], per_channel[3], ELU, residual=dzd)
    backend.dx_from_input(xd, dzd, out, "ncs", per_channel[0], per_channel[2], per_channel[3], ELU, *per_channel[:3],
                          residual=dzd, dres=dres)
    backend.dx_from_output(xd, dzd, out, "ncs", per_channel[3], ELU, *per_channel[:3], residual=dzd, dres=dres)
    assert calls == []  # elementwise primitives allocate nothing
    stream.synchronize()


def test_torch_allocator_and_tensor_inputs():
    """What the PyTorch adapter does: results are the tensors its allocator made, inputs may be tensors
    (CUDA tensors through __cuda_array_interface__; CPU tensors under the simulator)."""
    device = "cuda" if torch.cuda.is_available() and not SIM else "cpu"
    made = []

    def allocate(shape, dtype):
        made.append(torch.empty(shape, dtype=torch.float64 if np.dtype(dtype) == np.float64 else torch.float32,
                                device=device))
        return made[-1]

    backend = CUDABackend(allocate=allocate)
    shape = (2, 3, 20)
    x, dz, _, _, _, beta = make(shape, np.float32, seed=7)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    xt, dzt = t(x), t(dz)
    mean_t, var_t, _, _ = backend.channel_stats(xt, "ncs")
    assert mean_t is made[0] and var_t is made[1] and isinstance(mean_t, torch.Tensor)
    invstd_t = (var_t + 1e-5) ** -0.5  # per-channel arithmetic stays on the tensors
    s_dy, s_dyx = backend.reduce_from_input(xt, dzt, "ncs", mean_t, invstd_t, invstd_t, t(beta), ELU)
    x64 = x.astype(np.float64)
    mu, inv = x64.mean(axis=(0, 2)), 1.0 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5)
    u = x64 - bc(mu)
    dy = dz.astype(np.float64) * ELU.derivative(u * bc(inv) + bc(beta))
    np.testing.assert_allclose(backend.to_host(s_dy), dy.sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s_dyx.cpu().numpy(), (dy * u * bc(inv)).sum(axis=(0, 2)), rtol=1e-9, atol=1e-9)
    out = torch.empty_like(xt)
    backend.normalize_act(xt, out, "ncs", mean_t, invstd_t, t(beta), ELU)
    np.testing.assert_allclose(out.cpu().numpy(), ELU.forward(u * bc(inv) + bc(beta)), rtol=2e-6, atol=2e-6)
