"""The one place where PyTorch tensors become kernel arrays (and back).

CPU tensors are viewed as NumPy arrays without copying (``Tensor.numpy()`` shares memory), then re-strided into
the 3-D memory-order views the backends take:

    NCHW-contiguous (N, C, *spatial)        -> "ncs" view (N, C, S)
    channels_last   (N, C, *spatial)        -> "nsc" view (N, S, C)      (also a contiguous 2-D N x C input)

Gradients may have any strides (a ``.sum()`` gives an all-zero-stride gradient); they are viewed in the same axis
order as x, merging the spatial dims when their strides allow it -- always the case for contiguous, channels_last
and expanded (stride-0) gradients.  Only a gradient whose spatial dims are permuted is copied, once.
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

SUPPORTED_DTYPES = (torch.float32, torch.float64)


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


def _view3(t: torch.Tensor, layout: str):
    """Zero-copy 3-D NumPy view of ``t`` in memory order, or None if the dims do not merge."""
    if t.device.type != "cpu":
        raise NotImplementedError("ckptnorm: only CPU tensors are supported so far; tip: use strategy='standard' "
                                  "on CUDA until the CUDA backend lands")
    a = _to_memory_order(t.detach(), layout).numpy()
    item = a.itemsize
    sizes, strides = a.shape, tuple(s // item for s in a.strides)
    if t.dim() == 2:  # (N, C): one "spatial" position per sample
        shape3, strides3 = (sizes[0], 1, sizes[1]), (strides[0], 0, strides[1])
    elif layout == "ncs":
        merged = _merged_stride(sizes[2:], strides[2:])
        if merged is None:
            return None
        shape3, strides3 = (sizes[0], sizes[1], int(np.prod(sizes[2:]))), (strides[0], strides[1], merged)
    else:
        merged = _merged_stride(sizes[1:-1], strides[1:-1])
        if merged is None:
            return None
        shape3, strides3 = (sizes[0], int(np.prod(sizes[1:-1])), sizes[-1]), (strides[0], merged, strides[-1])
    return as_strided(a, shape3, tuple(s * item for s in strides3))


def activation_view(t: torch.Tensor, layout: str) -> np.ndarray:
    """View of an activation-sized tensor that ``layout_of`` accepted (x, z, dx)."""
    view = _view3(t, layout)
    if view is None:
        raise ValueError(f"ckptnorm: internal error: tensor with strides {t.stride()} is not in layout {layout}")
    return view


def gradient_view(dz: torch.Tensor, layout: str) -> np.ndarray:
    """View of an incoming gradient with arbitrary strides; copied only if its spatial dims cannot be merged."""
    view = _view3(dz, layout)
    if view is None:
        fmt = torch.contiguous_format
        if layout == "nsc" and dz.dim() in (4, 5):
            fmt = torch.channels_last if dz.dim() == 4 else torch.channels_last_3d
        view = _view3(dz.contiguous(memory_format=fmt), layout)
    return view


def channel_values(t, channels: int, default: float) -> np.ndarray:
    """Per-channel float64 copy of a parameter (or ``default`` everywhere when the parameter is None)."""
    if t is None:
        return np.full(channels, default)
    return t.detach().to(torch.float64).cpu().numpy().copy()


def channel_tensor(values: np.ndarray) -> torch.Tensor:
    """Per-channel float64 NumPy array -> tensor sharing its memory (kept for backward)."""
    return torch.from_numpy(values)


def channel_array(t: torch.Tensor) -> np.ndarray:
    """Per-channel tensor kept for backward -> NumPy view."""
    return t.detach().numpy()
