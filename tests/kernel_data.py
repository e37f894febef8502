"""Inputs and tolerances shared by the CPU and CUDA kernel tests (arrays in memory order, per-channel float64)."""
import numpy as np


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
