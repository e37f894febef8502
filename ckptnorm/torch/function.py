"""``batch_norm_act``: the functional PyTorch entry point, and the autograd Function behind the kernel strategies.

``standard`` runs PyTorch's native ops (the baseline).  The other strategies run one autograd Function that
hands NumPy views to the strategy (``ckptnorm.strategies``) and saves exactly what the strategy's plan keeps.
Synchronized BN (a ``reducer``, training) runs every strategy, ``standard`` included, through that Function:
PyTorch's own synchronized BN does not run on CPU tensors, and ``Standard``'s plan keeps what the native ops keep.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..activations import get_activation
from ..strategies import get_strategy, updated_running_stats
from . import _arrays, _recompute, sync
from ._recompute import in_backward


class _Config:
    """Per-call constants, passed to the Function as one non-tensor argument."""

    __slots__ = ("strategy", "act", "training", "momentum", "eps", "inplace", "update_stats", "reducer")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class BatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, cfg):
        layout = _arrays.layout_of(x)
        channels, device = x.shape[1], x.device
        backend = _arrays.backend_for(x)
        if cfg.reducer is not None and x.numel() == 0:  # still takes part in the exchanges, with nothing to add
            backend = sync.EmptyBatchBackend(backend, channels, device)
        gamma = _arrays.channel_values(weight, channels, 1.0, device)
        beta = _arrays.channel_values(bias, channels, 0.0, device)
        running = (None, None) if running_mean is None else (
            _arrays.channel_values(running_mean, channels, 0.0, device),
            _arrays.channel_values(running_var, channels, 1.0, device))
        x_arr = _arrays.activation_view(x, layout)
        r_arr = None if residual is None else _arrays.gradient_view(residual, layout)
        plan = cfg.strategy.plan(backend, x_arr, layout, gamma, beta, cfg.act, cfg.training, cfg.eps, *running,
                                 residual=r_arr, reducer=cfg.reducer)
        if cfg.training and cfg.update_stats and running_mean is not None:
            new_mean, new_var = updated_running_stats(*running, plan.mean, plan.var, plan.count, cfg.momentum)
            with torch.no_grad():
                running_mean.copy_(_arrays.channel_tensor(new_mean))
                running_var.copy_(_arrays.channel_tensor(new_var))
        # inplace_abn falling back to keeping x while writing z over it: keep a copy of x (invariant 3).
        x_kept = x.clone() if (cfg.inplace and "x" in plan.keep) else x
        out = x if cfg.inplace else torch.empty_like(x)
        backend.normalize_act(x_arr, _arrays.activation_view(out, layout), layout, plan.mean, plan.scale, beta,
                              cfg.act, r_arr)
        if cfg.inplace:
            ctx.mark_dirty(x)
        kept = {"x": x_kept, "z": out, "residual": residual,
                "mean": _arrays.channel_tensor(plan.mean), "invstd": _arrays.channel_tensor(plan.invstd)}
        ctx.save_for_backward(*(kept[name] for name in plan.keep))
        ctx.keep, ctx.cfg, ctx.layout, ctx.count = plan.keep, cfg, layout, plan.count
        ctx.gamma, ctx.beta = gamma, beta
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.plan = plan if cfg.strategy.rematerializes_output and residual is None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        cfg, layout = ctx.cfg, ctx.layout
        saved = dict(zip(ctx.keep, ctx.saved_tensors))
        ref = saved["x"] if "x" in saved else saved["z"]
        backend = _arrays.backend_for(ref)  # on the current stream of this backward
        if cfg.reducer is not None and ref.numel() == 0:
            backend = sync.EmptyBatchBackend(backend, ref.shape[1], ref.device)
        arrays = {name: (_arrays.activation_view(t, layout) if name in ("x", "z") else
                         _arrays.gradient_view(t, layout) if name == "residual" else _arrays.channel_array(t))
                  for name, t in saved.items()}
        # The residual's gradient dr = dy is written by the dx kernel, so dx is computed whenever either is needed.
        need_dres = "residual" in saved and ctx.needs_input_grad[5]
        dx = torch.empty_like(ref) if (ctx.needs_input_grad[0] or need_dres) else None
        dres = torch.empty_like(ref) if need_dres else None
        dgamma, dbeta = cfg.strategy.backward(
            backend, arrays, _arrays.gradient_view(dz, layout),
            None if dx is None else _arrays.activation_view(dx, layout),
            layout, ctx.gamma, ctx.beta, cfg.act, cfg.training, cfg.eps, ctx.count,
            None if dres is None else _arrays.activation_view(dres, layout), reducer=cfg.reducer)
        w_dtype, b_dtype = ctx.param_dtypes
        grad_w = _arrays.channel_tensor(dgamma).to(w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = _arrays.channel_tensor(dbeta).to(b_dtype) if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), grad_w, grad_b, None, None, dres, None


def _native_activation(y, act):
    # In place on BN's fresh output where autograd can differentiate it from the result (saves keeping y).
    if act.name == "identity":
        return y
    if act.name == "leaky_relu":
        return F.leaky_relu(y, act.param, inplace=act.param > 0)
    if act.name == "elu":
        return F.elu(y, act.param, inplace=act.param > 0)
    if act.name == "relu":
        return F.relu(y, inplace=True)
    if act.name == "silu":
        return F.silu(y)
    return F.gelu(y)


def _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, strategy, inplace, residual,
              synced=False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ckptnorm: input must be a torch.Tensor, got {type(x).__name__}; tip: convert it with "
                        "torch.as_tensor")
    if not (x.is_floating_point()):
        raise TypeError(f"ckptnorm: BatchNorm needs a floating-point input, got {x.dtype}; tip: convert it with "
                        "x.float()")
    if x.dim() < 2:
        raise ValueError(f"ckptnorm: expected an input of shape (N, C, ...), got {x.dim()}-D; tip: add a batch "
                         "dimension")
    if not eps > 0:
        raise ValueError(f"ckptnorm: eps must be positive, got {eps}; tip: use the default 1e-5")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"ckptnorm: input has {channels} channels but {name} has shape {tuple(t.shape)}; tip: "
                             "num_features must equal x.shape[1]")
        if t.device != x.device:
            raise ValueError(f"ckptnorm: {name} is on {t.device} but the input is on {x.device}; tip: move the "
                             "module with .to(x.device)")
        # float16/bfloat16 inputs may come with float32 parameters and statistics (mixed precision, autocast)
        if t.dtype != x.dtype and not (x.dtype in _arrays.HALF_DTYPES and t.dtype == torch.float32):
            raise TypeError(f"ckptnorm: {name} is {t.dtype} but the input is {x.dtype}; tip: convert the module "
                            "with .to(x.dtype) (float16/bfloat16 inputs also take float32 parameters)")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"ckptnorm: residual must be a torch.Tensor, got {type(residual).__name__}; tip: pass the "
                            "tensor added to the BatchNorm output before the activation")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"ckptnorm: residual must match the input (shape {tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}), got shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}; "
                             "tip: broadcast and convert it first, e.g. residual.expand_as(x).to(x)")
        if inplace and residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("ckptnorm: inplace=True would overwrite the residual, which shares memory with the "
                             "input; tip: use inplace=False")
    if (running_mean is None) != (running_var is None):
        raise ValueError("ckptnorm: pass both running_mean and running_var, or neither; tip: pass None for both to "
                         "use batch statistics only")
    if not training and running_mean is None:
        raise ValueError("ckptnorm: eval mode (training=False) needs running statistics; tip: pass running_mean and "
                         "running_var, or training=True")
    if training and running_mean is not None and momentum is None:
        raise ValueError("ckptnorm: momentum=None needs a batch count; tip: pass the factor 1 / num_batches_tracked "
                         "as momentum, or use a BatchNormAct module")
    if training and not synced and x.numel() // max(channels, 1) == 1:  # synced: the global count is checked
        raise ValueError(f"ckptnorm: expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}; tip: use a batch larger than 1, or eval mode")
    if inplace:
        if not strategy.may_overwrite_input:
            raise ValueError(f"ckptnorm: inplace=True is only meaningful with strategy='inplace_abn', got "
                             f"{strategy.name!r}; tip: drop inplace=True")
        if x.is_leaf and x.requires_grad:
            raise RuntimeError("ckptnorm: inplace=True would overwrite a leaf tensor that requires grad; tip: use "
                               "inplace=False, or pass a non-leaf (e.g. the output of the previous layer)")


@torch.compiler.disable
def batch_norm_act(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                   activation="identity", activation_param=None, strategy="efficient_checkpoint", inplace=False,
                   residual=None, reducer=None):
    """BatchNorm followed by an activation, with the memory strategy ``strategy``: ``phi(BN(x) [+ residual])``.

    Arguments follow ``torch.nn.functional.batch_norm`` (``momentum`` is the running-average factor used for this
    call), plus ``activation`` (a name or ``ckptnorm.Activation``), its ``activation_param`` (leaky slope, ELU
    alpha), ``strategy`` (name, class or instance), ``inplace`` (``inplace_abn`` only: write z over x) and
    ``residual`` (a tensor like x, any strides, added before the activation: the end of a post-activation
    residual block, fused into the layer; every strategy keeps it for backward -- the block's first conv keeps it
    anyway -- and the output is never re-materialized there, see the design note's "Residual sites").
    ``reducer``: a ``ckptnorm.strategies.Reducer`` (``ckptnorm.torch.sync.ProcessGroupReducer`` for
    torch.distributed) makes a training call synchronized BN: statistics and backward sums over every process's
    batch (which may be empty on some); ignored in eval mode.  The ``SyncBatchNormAct*d`` modules pass it.
    """
    strat = get_strategy(strategy)
    act = get_activation(activation, activation_param)
    strat.check_activation(act)
    reducer = reducer if training else None  # eval mode never communicates
    _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, strat, inplace, residual,
              synced=reducer is not None)
    recomputing = in_backward()
    if reducer is None and (strat.name == "standard" or x.numel() == 0):
        # native ops (they also define what an empty batch gives)
        if training and recomputing and running_mean is not None:
            # torch.utils.checkpoint re-running this forward: same ops (same saved tensors) on throwaway buffers,
            # so the running statistics are updated once only.
            running_mean, running_var = running_mean.clone(), running_var.clone()
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training or running_mean is None,
                         momentum or 0.0, eps)
        if residual is not None:
            y = y.add_(residual)  # in place on BN's fresh output, which BN's backward does not keep
        return _native_activation(y, act)
    if x.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"ckptnorm: strategy {strat.name!r} has no backend for {x.device.type} tensors "
                                  "(CPU and CUDA only); tip: use strategy='standard' there")
    if x.dtype not in _arrays.SUPPORTED_DTYPES:
        raise TypeError(f"ckptnorm: {x.dtype} inputs are not supported (float16, bfloat16, float32 and float64 "
                        "are); tip: use float32, or strategy='standard'")
    if _arrays.layout_of(x) is None:
        if inplace:
            raise ValueError("ckptnorm: inplace=True needs an NCHW-contiguous or channels_last input; tip: call "
                             ".contiguous() first, or use inplace=False")
        x = x.contiguous()  # arbitrary strides: one copy, then the NCHW kernels
    _recompute.release_hooks_if_idle()
    cfg = _Config(strategy=strat, act=act, training=training, momentum=momentum, eps=eps, inplace=inplace,
                  update_stats=not recomputing, reducer=reducer)
    z = BatchNormActFunction.apply(x, weight, bias, running_mean, running_var, residual, cfg)
    if strat.rematerializes_output and residual is None and z.requires_grad and x.numel():
        node = z.grad_fn  # the Function's ctx: holds the layout, plan and beta of this call
        plan = node.plan
        if reducer is not None and "mean" not in plan.keep:
            # A synced checkpoint's recipe reuses the forward's global statistics (two per-channel arrays) rather
            # than recomputing local ones, which would be wrong, or gathering them again: whether a consumer's
            # backward recomputes z or reuses a live copy depends on object lifetimes, which may differ between
            # processes, so an exchange there could pair up differently on each and deadlock.
            plan = copy.copy(plan)
            plan.keep = plan.keep + ("mean", "invstd")
        _recompute.register(z, _recompute.Recipe(z, x, node.layout, cfg, plan, node.beta))
    return z
