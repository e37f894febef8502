"""Every private PyTorch API ckptnorm relies on, in one place, each with what it is for and what happens without it.

PyTorch offers no public way to do these; they have been stable across the releases we support (torch >= 2.13),
and a new release that moves one breaks this module only.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


# -- autograd: the default saved-tensor hook stack (rematerialization, ``_recompute``) -----------------------------------
def graph_task_running() -> bool:
    """True while autograd runs a backward on this thread (a forward then is a re-run, e.g. torch.utils.checkpoint)."""
    return torch._C._current_graph_task_id() != -1


def top_saved_tensors_hooks():
    """The innermost (pack, unpack) pair of this thread's saved-tensor hook stack, or None when it is empty.  The
    public ``saved_tensors_hooks`` context manager cannot tell whether other hooks are active."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def saved_tensors_hooks_enabled() -> bool:
    """False where hooks are refused (inside ``torch.func`` transforms)."""
    return torch._C._autograd._saved_tensors_hooks_is_enabled()


def push_saved_tensors_hooks(pack, unpack) -> None:
    """Install (pack, unpack) on this thread without a ``with`` block: their lifetime is that of our outputs, which
    no context manager in user code brackets."""
    torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def pop_saved_tensors_hooks() -> None:
    torch._C._autograd._pop_saved_tensors_default_hooks()


# -- BatchNorm's constructor (public, but its ``bias`` keyword is newer than torch 2.11) ---------------------------------
_NORM_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


def init_batch_norm(module: nn.Module, num_features, eps, momentum, affine, track_running_stats, device, dtype,
                    bias: bool) -> None:
    """Run ``_NormBase.__init__`` on ``module`` with ``bias``, also on a torch whose BatchNorm lacks the keyword:
    there an affine module without bias gets its weight only, as the keyword would have left it."""
    if _NORM_TAKES_BIAS:
        _NormBase.__init__(module, num_features, eps, momentum, affine, track_running_stats, device, dtype,
                           bias=bias)
        return
    _NormBase.__init__(module, num_features, eps, momentum, affine, track_running_stats, device, dtype)
    if affine and not bias:
        module.register_parameter("bias", None)


# -- modules -------------------------------------------------------------------------------------------------------------
def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks besides its forward (its own or global ones): inlining its code would
    skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def deepcopy_keeping_groups(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` where process groups (C++ handles that cannot be copied) are shared, not copied."""
    memo = {}
    for module in model.modules():
        group = getattr(module, "process_group", None)
        if group is not None:
            memo[id(group)] = group
    return copy.deepcopy(model, memo)


# -- torch.distributed -----------------------------------------------------------------------------------------------
def group_timeout(group, device):
    """The process group's timeout (a timedelta), or None where the backend does not expose it (the group's own
    timeout still applies then)."""
    import torch.distributed as dist
    try:
        pg = group if group is not None else dist.group.WORLD
        return pg._get_backend(device).options._timeout
    except Exception:  # absent on some backends and versions
        return None
