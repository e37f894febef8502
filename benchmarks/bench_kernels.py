"""Per-kernel CPU benchmarks: each primitive of ``ckptnorm.backends.get_backend("cpu")`` on NumPy arrays, with a
plain copy of the same size as the bandwidth yardstick.

Arrays are the backends' 3-D memory-order views: layout ``ncs`` = (N, C, H*W) (NCHW), ``nsc`` = (N, H*W, C)
(channels_last).  Effective bandwidth = minimal bytes moved / time, with ``KERNEL_PASSES`` (common.py) per kernel;
the ``copy`` baseline is ``Tensor.copy_`` on the same buffers (PyTorch's copy, multi-threaded like the kernels).
"""
import statistics
import time

import numpy as np
import torch

from ckptnorm import get_activation
from ckptnorm.backends import get_backend

from .common import COPY_PASSES, DTYPES, KERNEL_PASSES, SHAPES, SLOPE, parse_shape

KERNEL_NAMES = ["copy"] + list(KERNEL_PASSES)


def kernel_calls(shape, dtype, layout):
    """name -> zero-argument call, all on arrays of one shape (outputs preallocated: kernels never allocate)."""
    n, c, h, w = parse_shape(shape)
    dims = (n, c, h * w) if layout == "ncs" else (n, h * w, c)
    rng = np.random.default_rng(0)
    x, z, dz = (rng.standard_normal(dims).astype(dtype) for _ in range(3))
    out, dx = np.empty_like(x), np.empty_like(x)
    zeros, ones = np.zeros(c), np.ones(c)
    act, cpu = get_activation("leaky_relu", SLOPE), get_backend("cpu")
    src, dst = torch.from_numpy(x), torch.from_numpy(out)
    return {
        "copy": lambda: dst.copy_(src),
        "channel_stats": lambda: cpu.channel_stats(x, layout),
        "normalize_act": lambda: cpu.normalize_act(x, out, layout, zeros, ones, zeros, act),
        "reduce_from_input": lambda: cpu.reduce_from_input(x, dz, layout, zeros, ones, ones, zeros, act),
        "reduce_from_output": lambda: cpu.reduce_from_output(z, dz, layout, zeros, act),
        "dx_from_input": lambda: cpu.dx_from_input(x, dz, dx, layout, zeros, ones, zeros, act, ones, zeros, zeros),
        "dx_from_output": lambda: cpu.dx_from_output(z, dz, dx, layout, zeros, act, ones, zeros, zeros),
    }


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


class CpuKernel:
    params = [KERNEL_NAMES, SHAPES, DTYPES, ["ncs", "nsc"]]
    param_names = ["kernel", "shape", "dtype", "layout"]
    timeout = 300

    def setup(self, kernel, shape, dtype, layout):
        calls = kernel_calls(shape, dtype, layout)
        self.kernel, self.copy = calls[kernel], calls["copy"]
        self.passes = COPY_PASSES if kernel == "copy" else KERNEL_PASSES[kernel]
        self.kernel()  # compiles (or loads from Numba's disk cache) and touches every page

    def time_kernel(self, kernel, shape, dtype, layout):
        self.kernel()

    def track_fraction_of_copy_bandwidth(self, kernel, shape, dtype, layout):
        """(passes / kernel time) / (2 / copy time), both medians of 5 runs taken in turn."""
        kernel_times, copy_times = [], []
        for _ in range(5):
            kernel_times.append(_seconds(self.kernel))
            copy_times.append(_seconds(self.copy))
        return (self.passes / statistics.median(kernel_times)) / (COPY_PASSES / statistics.median(copy_times))

    track_fraction_of_copy_bandwidth.unit = "fraction"
