"""``batch_norm_act``: the functional PyTorch entry point, and the autograd Function behind the kernel strategies.

``standard`` runs PyTorch's native ops (the baseline).  The other strategies run one autograd Function that
hands NumPy views to the strategy (``ckptnorm.strategies``) and saves exactly what the strategy's decision keeps.
Synchronized BN (a ``reducer``, training) runs every strategy, ``standard`` included, through that Function:
PyTorch's own synchronized BN does not run on CPU tensors, and ``Standard``'s decision keeps what the native ops keep.

Activation modules (any elementwise ``nn.Module`` or callable f without a kernel here, ``nn.Hardtanh(-2, 2)``, a
user's own): z = f(BN(x) [+ r]).  Under ``checkpoint``/``efficient_checkpoint`` the Function computes y with the
identity-activation kernels and z = f(y) without a graph, keeping only what the strategy keeps; its backward
recomputes y, re-runs f under autograd for dy, then runs the identity activation's BN backward with that dy.
Consumers of z keep a recipe that re-runs f too (``module_call.ModuleCall``).  Under ``standard`` (and wherever the
strategy keeps z anyway) f simply runs after BN, recorded by autograd as in the original model.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch._C import _functions as _autograd_functions  # DelayedError: what once_differentiable uses

from ..activations import Activation, get_activation
from ..channel_stats import batch_statistics, merged_statistics
from ..strategies import OutputRecipe, get_strategy
from . import _arrays, _recompute, sync
from ._recompute import in_backward
from .module_call import ModuleCall, check_elementwise, describe_callable


class _Config:
    """Per-call constants, passed to the Function as one non-tensor argument."""

    __slots__ = ("strategy", "act", "training", "momentum", "eps", "inplace", "update_stats", "reducer", "module",
                 "recipe", "for_backward")

    def __init__(self, strategy, act, training, momentum, eps, inplace, update_stats, reducer, module, for_backward):
        self.strategy, self.act, self.training, self.momentum, self.eps = strategy, act, training, momentum, eps
        self.inplace, self.update_stats, self.reducer, self.for_backward = inplace, update_stats, reducer, for_backward
        self.module = module  # a module_call.ModuleCall when the activation is a module (act is then identity)
        self.recipe = None  # set by forward when the strategy declares one (decision.recipe), taken by the caller


def _once_differentiable(backward):
    """The backward records no graph, so its gradients cannot be differentiated again.

    Rules: 1. a plain backward (no ``create_graph``) already runs with grad mode off: called directly, at no cost;
    2. under ``create_graph`` it runs without grad, and where an incoming gradient requires grad (double backward:
    a gradient penalty, MAML) its outputs are wired to a node that raises a ckptnorm error if reached, as
    ``torch.autograd.function.once_differentiable`` does with PyTorch's generic message."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not any(g is not None and g.requires_grad for g in grads):
            return outputs
        message = (f"ckptnorm: a second derivative through a BatchNormAct layer ({ctx.cfg.strategy.name}, "
                   f"{ctx.channels} channels) is not supported: its backward is not itself differentiable; tip: give "
                   "the layers that need double backward (gradient penalty, MAML) strategy='standard', e.g. "
                   "convert(model, {'<their names>': 'standard', '*': 'efficient_checkpoint'})")
        detached = [None if t is None else t.detach().requires_grad_() for t in outputs]
        return _autograd_functions.DelayedError(message.encode(), len(outputs))(*detached)
    return wrapper


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
        running = (None, None) if (running_mean is None or cfg.training) else (  # eval mode reads them
            _arrays.channel_values(running_mean, channels, 0.0, device),
            _arrays.channel_values(running_var, channels, 1.0, device))
        x_arr = _arrays.activation_view(x, layout)
        r_arr = None if residual is None else _arrays.gradient_view(residual, layout)
        decision = cfg.strategy.decide(backend, x_arr, layout, gamma, beta, cfg.act, cfg.training, cfg.eps,
                                       *running, residual=r_arr, reducer=cfg.reducer, for_backward=cfg.for_backward)
        _check_not_inference(decision.keep, x, residual)  # before the running statistics change
        if cfg.training and cfg.update_stats and running_mean is not None:
            backend.update_running_stats(_arrays.buffer_view(running_mean), _arrays.buffer_view(running_var),
                                         decision.mean, decision.var, decision.count, cfg.momentum)
        # inplace_abn falling back to keeping x while writing z over it: keep a copy of x (invariant 3).
        x_kept = x.clone() if (cfg.inplace and "x" in decision.keep) else x
        out = x if cfg.inplace else torch.empty_like(x)
        backend.normalize_act(x_arr, _arrays.activation_view(out, layout), layout, decision.mean, decision.scale, beta,
                              cfg.act, r_arr)
        if cfg.module is not None:  # out is y: z = f(y), no graph (forward runs without grad); "z" is never kept
            out = cfg.module.first_run(out)
        if cfg.inplace:
            ctx.mark_dirty(x)
        kept = {"x": x_kept, "z": out, "residual": residual, "mean": decision.mean, "invstd": decision.invstd}
        ctx.save_for_backward(*(_arrays.channel_tensor(kept[name]) if name in _CHANNEL_VALUES else kept[name]
                                for name in decision.keep))
        ctx.keep, ctx.cfg, ctx.layout, ctx.count, ctx.channels = decision.keep, cfg, layout, decision.count, channels
        ctx.gamma, ctx.beta = gamma, beta
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        if decision.recipe is not OutputRecipe.NONE:  # handed to the caller, which binds it to the returned z
            cfg.recipe = _recompute.Recipe(x, layout, cfg, decision, beta, residual)
        return out

    @staticmethod
    @_once_differentiable
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
        count = ctx.count
        if cfg.module is not None:  # the gradient reaching the BN is dy = dz * f'(y), not dz
            dz, count = _gradient_through_module(cfg, backend, arrays, dz, ref, layout, ctx.gamma, ctx.beta, count)
        dgamma, dbeta = cfg.strategy.backward(
            backend, arrays, _arrays.gradient_view(dz, layout),
            None if dx is None else _arrays.activation_view(dx, layout),
            layout, ctx.gamma, ctx.beta, cfg.act, cfg.training, cfg.eps, count,
            None if dres is None else _arrays.activation_view(dres, layout), reducer=cfg.reducer)
        w_dtype, b_dtype = ctx.param_dtypes
        grad_w = _arrays.channel_grad(dgamma, w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = _arrays.channel_grad(dbeta, b_dtype) if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), grad_w, grad_b, None, None, dres, None


_CHANNEL_VALUES = ("mean", "invstd")  # kept per-channel values, saved as tensors


def _check_not_inference(keep, x, residual):
    """Autograd's rule for tensors made under ``torch.inference_mode``: they cannot be kept for backward."""
    for name, kept_as, t in (("input", "x", x), ("residual", "residual", residual)):
        if kept_as in keep and t.is_inference():
            raise RuntimeError(
                f"ckptnorm: the {name} was made under torch.inference_mode, and this layer must keep it for "
                "backward (inference tensors cannot be saved); tip: use torch.no_grad() instead of "
                f"torch.inference_mode() where it was made, or pass a clone made outside it ({name}.clone())")


def _gradient_through_module(cfg, backend, arrays, dz, x, layout, gamma, beta, count):
    """(dy, count) for an activation module: y recomputed from x by the identity kernel, f re-run under autograd.

    The statistics y needs are added to ``arrays``, so that the strategy's backward (which then sees "mean" and
    "invstd", as efficient_checkpoint's) does not recompute them a second time: checkpoint makes one reduction pass
    here, and a synchronized checkpoint one exchange, as with a kernel activation."""
    if "mean" not in arrays:  # checkpoint in training: recompute the statistics (global ones when synced)
        if cfg.reducer is not None:
            count, mean, _, invstd, _, _, _ = merged_statistics(backend, arrays["x"], layout, cfg.eps, cfg.reducer)
        else:
            mean, _, invstd, _, _ = batch_statistics(backend, arrays["x"], layout, cfg.eps)
        arrays["mean"], arrays["invstd"] = mean, invstd
    y = torch.empty_like(x)
    backend.normalize_act(arrays["x"], _arrays.activation_view(y, layout), layout, arrays["mean"],
                          gamma * arrays["invstd"], beta, cfg.act, arrays.get("residual"))
    return cfg.module.gradient(y, dz), count


_IDENTITY = get_activation("identity")


def is_activation_module(activation) -> bool:
    """True for a module or callable activation, False for a name, an ``Activation`` or None (identity)."""
    return activation is not None and not isinstance(activation, (str, Activation)) and callable(activation)


def activation_module(activation, activation_param=None, strategy=None):
    """The activation as a callable f when it is a module or callable (checked), None when it is a name.

    Rules (each raises ValueError/TypeError with a tip): f has no parameters and no buffers (the layer's state is
    BatchNorm's, and a recomputation would neither train nor update them); f is an instance, not a class; no
    ``activation_param`` (configure f itself); not ``inplace_abn``, which inverts phi (f has no known inverse).
    The promises that cannot be checked cheaply are the user's: f is elementwise (the output's shape and device
    are checked on every call) and deterministic apart from the default RNGs (whose state is restored for re-runs).
    """
    if not is_activation_module(activation):
        return None
    name = describe_callable(activation)
    if isinstance(activation, type):
        raise TypeError(f"ckptnorm: activation {activation.__name__} is a class; tip: pass an instance, e.g. "
                        f"activation={activation.__name__}()")
    if activation_param is not None:
        raise ValueError(f"ckptnorm: activation_param={activation_param!r} given with activation module {name}; "
                         "tip: configure the module itself and drop activation_param")
    if isinstance(activation, torch.nn.Module):
        state = [n for n, _ in activation.named_parameters()] + [n for n, _ in activation.named_buffers()]
        if state:
            raise ValueError(
                f"ckptnorm: activation module {name} has parameters or buffers ({', '.join(state)}); a BatchNormAct "
                "layer holds BatchNorm's state only, and its recomputation in backward would neither train nor update "
                "them; tip: keep it as a separate module after the layer, e.g. nn.Sequential(BatchNormAct2d(C, "
                "activation='identity'), nn.PReLU(C))")
    strat = get_strategy(strategy) if strategy is not None else None
    if strat is not None and strat.requires_invertible:
        raise ValueError(
            f"ckptnorm: strategy {strat.name!r} recovers y from z = phi(y) and needs an invertible activation with a "
            f"kernel, but activation module {name} has no known inverse; tip: use strategy='efficient_checkpoint' "
            "(keeps x and re-runs the module in backward), or a named activation with an inverse (e.g. leaky_relu)")
    return activation


def _native_activation(y, act):
    # In place on BN's fresh output where PyTorch's in-place variant differentiates from the result (saves keeping
    # y) and computes what the out-of-place op does.  Not in place: relu6 (hardtanh_), hardswish_, hardsigmoid_,
    # mish_ and silu_ keep a copy of their input for backward, which saves nothing and costs a copy; gelu has no
    # in-place variant; a negative leaky slope or elu alpha has no backward from the result; celu_ and selu_
    # differentiate from the result as z + alpha (resp. z + scale*alpha), which cancels where y << 0 and in float32
    # loses what exp(y) keeps (more than twice PyTorch's out-of-place error), and nn.CELU, nn.SELU are out of place
    # by default.  elu stays in place as before (the baseline's saved bytes).
    name, a = act.name, act.param
    if name == "identity":
        return y
    if name == "leaky_relu":
        return F.leaky_relu(y, a, inplace=a > 0)
    if name == "elu":
        return F.elu(y, a, inplace=a > 0)
    if name == "celu":
        return F.celu(y, a)
    if name == "selu":
        return F.selu(y)
    if name == "relu":
        return F.relu(y, inplace=True)
    if name == "relu6":
        return F.relu6(y)
    if name == "hardswish":
        return F.hardswish(y)
    if name == "hardsigmoid":
        return F.hardsigmoid(y)
    if name == "mish":
        return F.mish(y)
    if name == "tanh":
        return torch.tanh_(y)
    if name == "sigmoid":
        return torch.sigmoid_(y)
    if name == "silu":
        return F.silu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
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


def _backward_can_run(*tensors) -> bool:
    """Whether autograd records this call: grad mode on (off under ``no_grad`` and ``inference_mode``) and some
    input requiring grad.  Otherwise nothing is kept, no recipe is built and no hook is registered: there is no
    backward to serve, and inference tensors have no version counter to record."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def batch_norm_act(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                   activation="identity", activation_param=None, strategy="efficient_checkpoint", inplace=False,
                   residual=None, reducer=None):
    """BatchNorm followed by an activation, with the memory strategy ``strategy``: ``phi(BN(x) [+ residual])``.

    Arguments follow ``torch.nn.functional.batch_norm`` (``momentum`` is the running-average factor used for this
    call), plus ``activation`` (a name or ``ckptnorm.Activation``; or any elementwise activation module or callable
    on tensors without a kernel here, ``nn.Hardtanh(-2., 2.)``, ``torch.tanh``: see ``activation_module`` for its
    rules, not with ``inplace_abn``), its ``activation_param`` (leaky slope, ELU alpha; None with a module),
    ``strategy`` (name, class or instance), ``inplace`` (``inplace_abn`` only: write z over x) and
    ``residual`` (a tensor like x, any strides, added before the activation: the end of a post-activation
    residual block, fused into the layer; every strategy keeps it for backward -- the block's first conv keeps it
    anyway -- and a re-materialized output's recipe holds it too, see the design note's "Residual sites").
    ``reducer``: a ``ckptnorm.channel_stats.Reducer`` (``ckptnorm.torch.sync.ProcessGroupReducer`` for
    torch.distributed) makes a training call synchronized BN: statistics and backward sums over every process's
    batch (which may be empty on some); ignored in eval mode.  The ``SyncBatchNormAct*d`` modules pass it.
    """
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the kernels' host code (NumPy views, Numba): the call runs eagerly, a graph break.
        # Decided here rather than by decorating this function, because torch.compiler.disable's wrapper costs
        # every eager call some 25 us (a sixth of a small layer's forward).
        return _batch_norm_act_eagerly(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                       activation, activation_param, strategy, inplace, residual, reducer)
    strat = get_strategy(strategy)
    fn = activation_module(activation, activation_param, strat)
    act = _IDENTITY if fn is not None else get_activation(activation, activation_param)
    strat.check_activation(act)
    reducer = reducer if training else None  # eval mode never communicates
    _validate(x, running_mean, running_var, weight, bias, training, momentum, eps, strat, inplace, residual,
              synced=reducer is not None)
    if fn is not None and (not strat.rematerializes_output or (reducer is None and x.numel() == 0)):
        # standard (or a strategy keeping z anyway, or an empty batch): BN as that strategy computes it, then f
        # recorded by autograd, exactly as the original model runs (f keeps what it keeps).
        y = batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum, eps, _IDENTITY, None,
                           strat, inplace, residual, reducer)
        z = fn(y)
        check_elementwise(fn, x.shape, x.device, z)
        return z
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
    _recompute.HOOKS.release_if_idle()
    cfg = _Config(strategy=strat, act=act, training=training, momentum=momentum, eps=eps, inplace=inplace,
                  update_stats=not recomputing, reducer=reducer, module=None if fn is None else ModuleCall(fn),
                  for_backward=_backward_can_run(x, weight, bias, residual))
    z = BatchNormActFunction.apply(x, weight, bias, running_mean, running_var, residual, cfg)
    # The recipe the strategy declared for this call (forward built it); taken off cfg at once, since the
    # autograd node keeps cfg and must not hold x outside save_for_backward.
    recipe, cfg.recipe = cfg.recipe, None
    if recipe is not None and z.requires_grad and x.numel():
        _recompute.HOOKS.register(z, recipe)
    return z


_batch_norm_act_eagerly = torch.compiler.disable(batch_norm_act)
