"""The one place where PyTorch tensors become kernel arrays (and back), and where a tensor's backend is chosen.

Activation-sized tensors are re-strided, without copying, into the 3-D memory-order views the backends take:

    NCHW-contiguous (N, C, *spatial)        -> "ncs" view (N, C, S)
    channels_last   (N, C, *spatial)        -> "nsc" view (N, S, C)      (also a contiguous 2-D N x C input)

CPU tensors become NumPy views (``Tensor.numpy()`` shares memory); CUDA tensors become Numba device arrays through
``__cuda_array_interface__`` (zero-copy, no synchronization: kernels run on PyTorch's current stream, and every
buffer a CUDA kernel needs is allocated by PyTorch's caching allocator).

Gradients may have any strides (a ``.sum()`` gives an all-zero-stride gradient); they are viewed in the same axis
order as x, merging the spatial dims when their strides allow it -- always the case for contiguous, channels_last
and expanded (stride-0) gradients.  Only a gradient whose spatial dims are permuted is copied, once.

Half precision: Numba's CPU target has no float16 and NumPy has no bfloat16, so 16-bit activations reach the
kernels as integer views of the same bits -- float16 as uint16, bfloat16 as int16 (the kernels tell the formats
apart by signedness, widen every load to float64 and round every store back; ``ckptnorm/backends/base.py``).  The
CUDA kernels take the same views.

Per-channel values (statistics, parameters in float64) are NumPy arrays for CPU tensors and float64 tensors on the
device for CUDA tensors; the strategies only use arithmetic operators on them.
"""
from __future__ import annotations

import contextvars
import math

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

from ..backends import backend_names, get_backend

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# 16-bit storage formats -> the integer dtype whose view carries their bits to the kernels
_BIT_VIEWS = {torch.float16: torch.uint16, torch.bfloat16: torch.int16}
_TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32,
                 np.dtype(np.int64): torch.int64}
_backend_override = contextvars.ContextVar("ckptnorm_backend_override", default=None)


def layout_of(t: torch.Tensor):
    """"ncs", "nsc", or None when ``t`` is neither NCHW-contiguous nor channels_last (a copy is needed)."""
    if t.dim() == 2:
        return "nsc" if t.is_contiguous() else None
    if t.is_contiguous():
        return "ncs"
    if _to_memory_order(t, "nsc").is_contiguous():
        return "nsc"
    return None


def _to_memory_order(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "ncs" or t.dim() == 2:
        return t
    return t.permute(0, *range(2, t.dim()), 1)


def _merged_stride(sizes, strides):
    """Stride of the flattened run of dims, or None if those dims cannot be flattened without a copy."""
    kept = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    for (_, outer), (n_inner, inner) in zip(kept, kept[1:]):
        if outer != inner * n_inner:
            return None
    return kept[-1][1] if kept else 0


def _shape3(sizes, layout: str) -> tuple:
    """The 3-D shape of a memory-order tensor of ``sizes``: (N, C, S) for "ncs", (N, S, C) for "nsc"."""
    if len(sizes) == 2:  # (N, C): one "spatial" position per sample
        return sizes[0], 1, sizes[1]
    if layout == "ncs":
        return sizes[0], sizes[1], math.prod(sizes[2:])
    return sizes[0], math.prod(sizes[1:-1]), sizes[-1]


def _strides3(sizes, strides, layout: str):
    """The 3-D strides (in elements) matching ``_shape3``, or None if the spatial dims do not merge."""
    if len(sizes) == 2:
        return strides[0], 0, strides[1]
    if layout == "ncs":
        merged = _merged_stride(sizes[2:], strides[2:])
        return None if merged is None else (strides[0], strides[1], merged)
    merged = _merged_stride(sizes[1:-1], strides[1:-1])
    return None if merged is None else (strides[0], merged, strides[-1])


def _bit_view(tp: torch.Tensor) -> torch.Tensor:
    """16-bit floats as the integer view of their bits (same strides); other dtypes as they are."""
    return tp.view(_BIT_VIEWS[tp.dtype]) if tp.dtype in _BIT_VIEWS else tp


def _view3(t: torch.Tensor, layout: str):
    tp = _bit_view(_to_memory_order(t.detach(), layout))
    sizes = tuple(tp.shape)
    if t.device.type == "cpu" and tp.is_contiguous():
        # x, z, dx and most gradients: one reshape, no stride arithmetic (this runs several times per call)
        return tp.numpy().reshape(_shape3(sizes, layout))
    strides3 = _strides3(sizes, tp.stride(), layout)
    if strides3 is None:
        return None
    shape3 = _shape3(sizes, layout)
    if t.device.type == "cpu":
        array = tp.numpy()
        return as_strided(array, shape3, tuple(s * array.itemsize for s in strides3))
    if t.device.type == "cuda":
        from numba import cuda
        return cuda.as_cuda_array(torch.as_strided(tp, shape3, strides3, tp.storage_offset()), sync=False)
    raise NotImplementedError(f"ckptnorm: no backend for {t.device.type} tensors; tip: use CPU or CUDA tensors, "
                              "or strategy='standard'")


def activation_view(t: torch.Tensor, layout: str):
    """View of an activation-sized tensor that ``layout_of`` accepted (x, z, dx)."""
    view = _view3(t, layout)
    if view is None:
        raise ValueError(f"ckptnorm: internal error: tensor with strides {t.stride()} is not in layout {layout}")
    return view


def gradient_view(dz: torch.Tensor, layout: str):
    """View of an incoming gradient with arbitrary strides; copied only if its spatial dims cannot be merged."""
    view = _view3(dz, layout)
    if view is None:
        fmt = torch.contiguous_format
        if layout == "nsc" and dz.dim() in (4, 5):
            fmt = torch.channels_last if dz.dim() == 4 else torch.channels_last_3d
        view = _view3(dz.contiguous(memory_format=fmt), layout)
    return view


def channel_values(t, channels: int, default: float, device: torch.device):
    """Per-channel float64 copy of a parameter or buffer (``default`` everywhere when it is None)."""
    if device.type == "cpu":
        if t is None:
            return np.full(channels, default)
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: widened by PyTorch (exactly)
            return t.detach().to(torch.float64).numpy()
        return t.detach().numpy().astype(np.float64)  # a copy, whatever the dtype
    if t is None:
        return torch.full((channels,), default, dtype=torch.float64, device=device)
    return t.detach().to(torch.float64, copy=True)


def channel_tensor(values) -> torch.Tensor:
    """Per-channel float64 values -> tensor (shares memory with a NumPy array; a tensor is returned as is)."""
    return values if isinstance(values, torch.Tensor) else torch.from_numpy(values)


# Parameter dtypes whose gradient NumPy rounds from float64 exactly as PyTorch does (to nearest even, once).
_NUMPY_GRAD_DTYPES = {t: d for d, t in _TORCH_DTYPES.items() if t.is_floating_point}


def channel_grad(values, dtype: torch.dtype) -> torch.Tensor:
    """Per-channel float64 values -> a parameter's gradient in ``dtype``: for NumPy values a conversion in NumPy
    (a few microseconds less per call than ``Tensor.to``), otherwise the tensor converted by PyTorch."""
    if isinstance(values, np.ndarray) and dtype in _NUMPY_GRAD_DTYPES:
        return torch.from_numpy(values.astype(_NUMPY_GRAD_DTYPES[dtype]))
    return channel_tensor(values).to(dtype)


def channel_array(t: torch.Tensor):
    """Per-channel tensor kept for backward -> what the backend takes (NumPy view on CPU, the tensor on CUDA)."""
    return t.detach().numpy() if t.device.type == "cpu" else t


def buffer_view(t: torch.Tensor):
    """A 1-D buffer (running statistics) as the array a backend updates in place: a NumPy view of a CPU tensor, the
    tensor itself on CUDA (viewed through ``__cuda_array_interface__``); 16-bit floats as their bit views."""
    bits = _bit_view(t.detach())
    return bits.numpy() if t.device.type == "cpu" else bits


def backend_for(t: torch.Tensor):
    """The backend that runs kernels on ``t``: "cpu" for CPU tensors, "cuda" for CUDA tensors.

    ``use_backend("cuda")`` routes CPU tensors through the CUDA kernels too (under Numba's CUDA simulator: how the
    CUDA path is tested on machines without a GPU).
    """
    name = _backend_override.get() or t.device.type
    if name == "cpu":
        if t.device.type != "cpu":
            raise ValueError(f"ckptnorm: the CPU backend cannot run on {t.device} tensors; tip: leave the backend "
                             "choice to ckptnorm")
        return get_backend("cpu")
    if t.device.type == "cuda":  # per call: PyTorch's current stream, memory from PyTorch's caching allocator
        from numba import cuda
        stream = cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)

        def allocate(shape, dtype):
            return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], device=t.device)

        return get_backend("cuda", allocate=allocate, stream=stream)
    # CPU tensors through the CUDA kernels (Numba's simulator): host buffers
    return get_backend(name, allocate=lambda shape, dtype: np.zeros(shape, dtype), stream=0)


class use_backend:
    """Context manager: run ckptnorm's kernels on the named backend ("cpu", "cuda") whatever the tensors' device.

    For testing and debugging: ``with use_backend("cuda"):`` on CPU tensors runs the CUDA kernels under Numba's
    CUDA simulator (set NUMBA_ENABLE_CUDASIM=1 before numba is imported).
    """

    def __init__(self, name):
        if name not in backend_names():
            raise ValueError(f"ckptnorm: unknown backend {name!r}; tip: use one of {', '.join(backend_names())}")
        self.name = name

    def __enter__(self):
        self._token = _backend_override.set(self.name)
        return self

    def __exit__(self, *exc):
        _backend_override.reset(self._token)
