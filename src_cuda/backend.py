"""numba-cuda backend: dispatches the primitives of ``Backend`` to the kernels in ``kernels``.

Arrays in: numba device arrays, any object with ``__cuda_array_interface__`` (a CUDA torch tensor: viewed
zero-copy with ``numba.cuda.as_cuda_array(..., sync=False)`` right before launching), or, under Numba's CUDA
simulator only, NumPy arrays (viewed without a copy, so aliasing and stride-0 views behave as on a device).
Activations are float64, float32, or half precision as integer views of its bits: float16 as uint16, bfloat16 as
int16 (``ckptnorm.backends.base``; e.g. ``t.view(torch.int16)``: a bfloat16 tensor itself has no
``__cuda_array_interface__`` type string).

Memory: every buffer the backend needs -- per-channel results and the float64 reduction partials -- comes from
``allocate(shape, dtype)``, so a framework adapter can have its own allocator own the memory (PyTorch's caching
allocator); the per-channel results are returned as the very objects ``allocate`` gave.  Default allocator:
``numba.cuda.device_array``.

Residual sites: ``residual`` (read, any strides) and ``dres`` (written) are views of the activation's shape; without
them a kernel gets ``has_residual``/``has_dres`` False and one of its other arrays as a stand-in that it never
touches (numba-cuda cannot launch a kernel with a None argument), so the plain path loads and compiles nothing new.

Streams: every launch goes on ``stream`` (a numba stream, or 0 for the default stream).  No primitive waits for the
device; only ``to_host`` (a small per-channel copy) does.  Kernels compile lazily, once per argument-type signature.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ckptnorm.backends.base import Backend

from . import geometry, kernels


def _simulated() -> bool:
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda
        from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def _channels_last(layout) -> bool:
    if layout == "ncs":
        return False
    if layout == "nsc":
        return True
    raise ValueError(f"ckptnorm: unknown layout {layout!r}; tip: use 'ncs' (N, C, S) or 'nsc' (N, S, C)")


class CUDABackend(Backend):
    """Fused BatchNorm+activation primitives on a CUDA device (or Numba's CUDA simulator)."""

    name = "cuda"

    def __init__(self, allocate=None, stream=0):
        self.stream = stream
        self._allocate = allocate if allocate is not None else self._device_array
        self._sim = _simulated()

    def _device_array(self, shape, dtype):
        return cuda.device_array(shape, dtype, stream=self.stream)

    # -- arrays -------------------------------------------------------------------------------------------------
    def _arg(self, a):
        """What a kernel is launched with: a view of ``a``, never a copy."""
        if self._sim:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            if isinstance(a, FakeCUDAArray):
                return a
            # NumPy arrays (or CPU tensors) wrapped without a copy: the simulator would copy them in and out
            return FakeCUDAArray(np.asarray(a))
        if getattr(a, "__cuda_ndarray__", False):  # already a numba device array
            return a
        if cuda.is_cuda_array(a):
            # zero-copy; sync=False: the caller produced it on this backend's stream (adapter's contract)
            return cuda.as_cuda_array(a, sync=False)
        raise TypeError(f"ckptnorm: the CUDA backend needs device arrays, got {type(a).__name__}; tip: pass numba "
                        "device arrays or objects with __cuda_array_interface__ (CUDA tensors)")

    def _optional(self, a, stand_in, like, what):
        """``(kernel argument, flag)`` for an optional activation-sized operand: ``a`` viewed, after a shape check
        against ``like``, or ``stand_in`` (never touched by the kernel) when ``a`` is None."""
        if a is None:
            return stand_in, False
        ak = self._arg(a)
        if tuple(ak.shape) != tuple(like.shape):
            raise ValueError(f"ckptnorm: {what} has shape {tuple(ak.shape)}, the activation {tuple(like.shape)}; "
                             "tip: pass it in the activation's memory order (an expanded view is fine)")
        return ak, True

    def _launch(self, kernel, launch, *args):
        """Launch ``kernel`` with ``launch = (blocks, threads per block)`` from ``geometry`` on this stream."""
        blocks, threads = launch
        kernel[blocks, threads, self.stream](*args)

    @staticmethod
    def _dims(shape, channels_last):
        n, a, b = shape
        return (n, b, a) if channels_last else (n, a, b)

    # -- primitives -----------------------------------------------------------------------------------------------
    def channel_stats(self, x, layout, with_range=False):
        cl = _channels_last(layout)
        xk = self._arg(x)
        n_batch, channels, spatial = self._dims(xk.shape, cl)
        tile, n_part, launch = geometry.reduce_geometry(n_batch * spatial, channels, cl)
        with_range = bool(with_range)
        mean, var = self._allocate((channels,), np.float64), self._allocate((channels,), np.float64)
        xmin = xmax = None
        if with_range:
            xmin, xmax = self._allocate((channels,), np.float64), self._allocate((channels,), np.float64)
        if channels == 0:
            return mean, var, xmin, xmax
        part = self._arg(self._allocate((4 if with_range else 2, channels, n_part), np.float64))
        self._launch(kernels.stats_partials, launch, xk, cl, tile, n_part, with_range, part)
        mean_k, var_k = self._arg(mean), self._arg(var)
        # without a range, xmin/xmax are never written: mean/var stand in (same types, no extra compilation)
        lo_k, hi_k = (self._arg(xmin), self._arg(xmax)) if with_range else (mean_k, var_k)
        self._launch(kernels.stats_finalize, geometry.finalize_launch(channels),
                     xk, cl, part, n_part, with_range, mean_k, var_k, lo_k, hi_k)
        return mean, var, xmin, xmax

    def normalize_act(self, x, out, layout, mean, scale, beta, act, residual=None):
        cl = _channels_last(layout)
        xk = self._arg(x)
        rk, has_r = self._optional(residual, xk, xk, "residual")
        total = int(np.prod(xk.shape))
        if total == 0:
            return
        self._launch(kernels.normalize_act, geometry.elementwise_launch(total), xk, self._arg(out), cl,
                     self._arg(mean), self._arg(scale), self._arg(beta), act.kernel_code, float(act.param), rk, has_r)

    def _sums(self, partials_kernel, x, dz, layout, args, residual, scale_second):
        """Per-channel (sum 0, sum 1) from ``partials_kernel(x, dz, channels_last, *args, residual, has_residual,
        ...)`` and the finalize kernel; sum 1 is multiplied by ``scale_second`` (per channel) unless it is None."""
        cl = _channels_last(layout)
        xk, dzk = self._arg(x), self._arg(dz)
        rk, has_r = self._optional(residual, dzk, xk, "residual")  # stand-in: dz, the same type as most residuals
        n_batch, channels, spatial = self._dims(xk.shape, cl)
        tile, n_part, launch = geometry.reduce_geometry(n_batch * spatial, channels, cl)
        first, second = self._allocate((channels,), np.float64), self._allocate((channels,), np.float64)
        if channels == 0:
            return first, second
        part = self._arg(self._allocate((2, channels, n_part), np.float64))
        self._launch(partials_kernel, launch, xk, dzk, cl, *(self._arg(a) for a in args[:-2]),
                     *args[-2:], rk, has_r, tile, n_part, part)
        first_k, second_k = self._arg(first), self._arg(second)
        has_scale = scale_second is not None
        scale_k = self._arg(scale_second) if has_scale else first_k  # never read without has_scale
        self._launch(kernels.sums_finalize, geometry.finalize_launch(channels),
                     part, n_part, scale_k, has_scale, first_k, second_k)
        return first, second

    def reduce_from_input(self, x, dz, layout, mean, invstd, scale, beta, act, residual=None):
        return self._sums(kernels.reduce_from_input_partials, x, dz, layout,
                          (mean, scale, beta, act.kernel_code, float(act.param)), residual, invstd)

    def reduce_from_output(self, z, dz, layout, beta, act, residual=None):
        return self._sums(kernels.reduce_from_output_partials, z, dz, layout,
                          (beta, act.kernel_code, float(act.param)), residual, None)

    def _dx(self, kernel, src, dz, dx, layout, channel_args, act, coefs, residual, dres):
        """Launch a dx kernel: ``kernel(src, dz, dx, channels_last, *channel_args, kind, p, *coefs, residual,
        has_residual, dres, has_dres)`` over every element (stand-ins: dz for the residual, dx for dres -- their
        usual types)."""
        cl = _channels_last(layout)
        srck, dzk, dxk = self._arg(src), self._arg(dz), self._arg(dx)
        optional = (*self._optional(residual, dzk, srck, "residual"), *self._optional(dres, dxk, srck, "dres"))
        total = int(np.prod(srck.shape))
        if total == 0:
            return
        self._launch(kernel, geometry.elementwise_launch(total), srck, dzk, dxk, cl,
                     *(self._arg(a) for a in channel_args), act.kernel_code, float(act.param),
                     *(self._arg(k) for k in coefs), *optional)

    def dx_from_input(self, x, dz, dx, layout, mean, scale, beta, act, coef_dy, coef_u, coef_const, residual=None,
                      dres=None):
        self._dx(kernels.dx_from_input, x, dz, dx, layout, (mean, scale, beta), act, (coef_dy, coef_u, coef_const),
                 residual, dres)

    def dx_from_output(self, z, dz, dx, layout, beta, act, coef_dy, coef_u, coef_const, residual=None, dres=None):
        self._dx(kernels.dx_from_output, z, dz, dx, layout, (beta,), act, (coef_dy, coef_u, coef_const), residual,
                 dres)

    def update_running_stats(self, running_mean, running_var, mean, var, count, factor):
        channels = running_mean.shape[0]
        if channels == 0:
            return
        self._launch(kernels.running_update, geometry.finalize_launch(channels), self._arg(running_mean),
                     self._arg(running_var), self._arg(mean), self._arg(var), int(count), float(factor))

    # -- host copies --------------------------------------------------------------------------------------------
    def to_host(self, array):
        """A NumPy copy of a (small, per-channel) array this backend returned; waits for this backend's stream."""
        if array is None or isinstance(array, np.ndarray):
            return array
        if self._sim and not getattr(array, "__cuda_ndarray__", False):
            return np.asarray(array).copy()  # e.g. a CPU tensor from an adapter's allocator
        host = self._arg(array).copy_to_host(stream=self.stream)
        if not isinstance(self.stream, int):
            self.stream.synchronize()  # a copy on a stream is asynchronous
        return host
