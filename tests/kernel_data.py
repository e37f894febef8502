"""Inputs and tolerances shared by the CPU and CUDA kernel tests (arrays in memory order, per-channel float64)."""
import numpy as np
import torch


def to_layout(a_ncs, layout):
    """Memory-order view for the layout ("nsc" is an (N, S, C)-contiguous copy)."""
    return np.ascontiguousarray(a_ncs) if layout == "ncs" else np.ascontiguousarray(a_ncs.transpose(0, 2, 1))


def to_ncs(a, layout):
    return a if layout == "ncs" else a.transpose(0, 2, 1)


def make(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dz = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    mean, invstd = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)
    return x, dz, mean, invstd, gamma, beta


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)


# -- half-precision storage: fp16 as uint16 bits, bf16 as int16 bits (ckptnorm/backends/storage.py) -----------------
# The reference conversions are NumPy's float16 and PyTorch's bfloat16, never the code under test.
HALF_FORMATS = {"fp16": np.uint16, "bf16": np.int16}
# Unit roundoff of each format (2**-11, 2**-8); outputs may be off by a couple of units, as the tolerance allows.
HALF_RTOL = {"fp16": 2.0 ** -10, "bf16": 2.0 ** -7}
# Below the normal range the rounding error is absolute (half the smallest subnormal: fp16 2**-25, bf16 2**-134).
HALF_ATOL = {"fp16": 2.0 ** -24, "bf16": 2.0 ** -133}


def half_tol(fmt):
    return dict(rtol=HALF_RTOL[fmt], atol=HALF_ATOL[fmt])


def half_from_bits(bits, fmt):
    """16-bit storage -> float64 values, by the reference conversion."""
    bits = np.ascontiguousarray(bits)
    if fmt == "fp16":
        return bits.view(np.float16).astype(np.float64)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()


def half_to_bits(values, fmt):
    """float64 values -> 16-bit storage (the format's bits, as HALF_FORMATS' dtype), by the reference conversion.

    bf16 goes through float32 (PyTorch's own path), so it is correctly rounded only for float32 values."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):  # out of range: inf, as it should
        if fmt == "fp16":
            return values.astype(np.float16).view(np.uint16)
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def to_half(a, fmt):
    """An input in the format, and its exact float64 values (what the kernels see after widening)."""
    bits = half_to_bits(a, fmt)
    return bits, half_from_bits(bits, fmt)


def all_half_bits(fmt):
    """All 65536 bit patterns of the format, in its storage dtype."""
    return np.arange(65536, dtype=np.int64).astype(np.uint16).view(HALF_FORMATS[fmt])


def narrowing_cases(fmt):
    """float64 values and the bits a correct round-to-nearest-even narrowing gives, by construction.

    Every finite value of the format (exact), every midpoint between neighbouring magnitudes (ties to the even
    pattern), the float64 neighbours of each midpoint (to the nearer side: a conversion through float32 would
    round these twice and land on the tie's even side instead), the midpoint between the largest finite value and
    the next power of two (overflow to inf), infinities, out-of-range and float64-subnormal values; all with both
    signs.  NaNs are left to the caller (any NaN with the sign kept is right).
    """
    inf_bits = 0x7C00 if fmt == "fp16" else 0x7F80
    magnitudes = np.arange(inf_bits, dtype=np.int64)  # 0 .. largest finite
    values = half_from_bits(magnitudes.astype(np.uint16), fmt)
    # the value just past the largest finite one, were the exponent unbounded: 2**16 (fp16) or 2**128 (bf16)
    beyond = 2.0 ** 16 if fmt == "fp16" else 2.0 ** 128
    upper = np.append(values[1:], beyond)
    mids = values + (upper - values) / 2  # exact: one more bit than the format has
    low, high = magnitudes, magnitudes + 1  # high == inf_bits: rounds to inf
    even = np.where(low % 2 == 0, low, high)
    specials = np.array([np.inf, 1e300, 2.0 ** 1000, 5e-324, 1e-310, 2.0 ** -1074 * 3])
    special_bits = np.array([inf_bits, inf_bits, inf_bits, 0, 0, 0])
    pos_values = np.concatenate([values, mids, np.nextafter(mids, np.inf), np.nextafter(mids, 0.0), specials])
    pos_bits = np.concatenate([magnitudes, even, high, low, special_bits])
    # the float64 neighbours of 0's midpoint (half the smallest subnormal) are positive: fine; 0 itself excluded
    values64 = np.concatenate([pos_values, -pos_values])
    bits = np.concatenate([pos_bits, pos_bits | 0x8000]).astype(np.uint16).view(HALF_FORMATS[fmt])
    return values64, bits


# Storage of one operand: a half format, or float32 (mixed storage: each array is widened on its own).
def stored_as(a, kind):
    """``a`` (float64, NCS) in storage ``kind``, and the float64 values the kernels will see."""
    if kind == "f32":
        a32 = a.astype(np.float32)
        return a32, a32.astype(np.float64)
    return to_half(a, kind)


def values_of(a, kind):
    return a.astype(np.float64) if kind == "f32" else half_from_bits(a, kind)


def empty_as(shape, kind):
    return np.empty(shape, np.float32 if kind == "f32" else HALF_FORMATS[kind])


def out_tol(kind):
    return tol(np.float32) if kind == "f32" else half_tol(kind)


# Every activation, for the kernel tests: each has its own code in the tiled kernels (identity, relu and leaky_relu
# also their branch-free CPU kernels), so each runs through every primitive.  celu with alpha 0.5: its exponential
# in units of alpha.
ACTIVATION_SPECS = [("identity", None), ("leaky_relu", 0.1), ("elu", 1.0), ("relu", None), ("silu", None),
                    ("gelu", None), ("relu6", None), ("hardswish", None), ("hardsigmoid", None), ("mish", None),
                    ("gelu_tanh", None), ("selu", None), ("celu", 0.5), ("tanh", None), ("sigmoid", None)]
# The residual and storage variants of the kernels branch on the activation exactly as the plain ones do: a few
# activations cover them (the original ones, plus one of each new kind: kinked, exponential-invertible).
RESIDUAL_SPECS = ACTIVATION_SPECS[:6] + [("hardswish", None), ("selu", None), ("celu", 0.5)]


# -- running statistics (Backend.update_running_stats) ---------------------------------------------------------------
RUNNING_KINDS = ["f64", "f32", "fp16", "bf16"]


def running_case(kind, count, channels=7, factor=0.1, seed=20):
    """Running buffers stored as ``kind``, a batch's float64 mean and biased var of ``count`` elements per channel,
    and what the buffers must hold after the update, as float64: nn.BatchNorm's rule written out here, in float64
    from the stored values, within the format's rounding (``tolerance``)."""
    rng = np.random.default_rng(seed)
    running_mean, running_var = rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)
    mean, var = rng.standard_normal(channels), rng.uniform(0.0, 3.0, channels)
    if kind == "f64":
        stored = running_mean.copy(), running_var.copy()
    else:
        stored = stored_as(running_mean, kind)[0], stored_as(running_var, kind)[0]
    old_mean, old_var = (values_of(a, kind) if kind != "f64" else a.copy() for a in stored)
    unbiased = var * count / (count - 1) if count > 1 else var
    want = (1 - factor) * old_mean + factor * mean, (1 - factor) * old_var + factor * unbiased
    tolerance = dict(rtol=1e-15, atol=0) if kind == "f64" else dict(rtol=2e-7, atol=0) if kind == "f32" else \
        dict(rtol=HALF_RTOL[kind] / 2, atol=0)
    return stored, (mean, var, count, factor), want, tolerance


def running_values(stored, kind):
    return stored.copy() if kind == "f64" else values_of(stored, kind)
