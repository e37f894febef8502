"""Drop-in modules for ``nn.BatchNorm*d`` followed by an activation.

Same constructor arguments, parameters, buffers and state_dict keys as ``nn.BatchNorm*d`` (a plain BN state_dict
loads with ``strict=True``), plus ``activation``, ``activation_param``, ``strategy`` and ``inplace``.
``SyncBatchNormAct*d`` are the synchronized versions (like ``nn.SyncBatchNorm``, plus ``process_group``).

``activation`` is a name (then the attribute ``activation`` is that canonical name and ``activation_param`` its
parameter) or an elementwise activation module or callable ckptnorm has no kernel for, ``nn.Hardtanh(-2., 2.)``,
a user's ``nn.Module`` (then the attribute ``activation`` is that module -- a registered child without state,
modules with parameters or buffers are refused -- so that state_dict keys stay BatchNorm's while
``.train()``/``.eval()``/``deepcopy`` reach it; ``activation_param`` must be None and stays None).  Rules and
strategies: ``function.activation_module``.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _compat
from ..activations import get_activation
from ..strategies import get_strategy
from .module_call import describe_callable
from .function import activation_module, batch_norm_act, in_backward, is_activation_module
from .sync import reducer_for


class _BatchNormAct(_BatchNorm):
    _expected_dims: tuple = ()
    _shape_hint = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True, activation="leaky_relu", activation_param=None,
                 strategy="efficient_checkpoint", inplace=False):
        if not eps > 0:
            raise ValueError(f"ckptnorm: eps must be positive, got {eps}; tip: use the default 1e-5")
        _compat.init_batch_norm(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias)
        strat = get_strategy(strategy)
        fn = activation_module(activation, activation_param, strat)  # None for a named activation
        act = None if fn is not None else get_activation(activation, activation_param)
        if act is not None:
            strat.check_activation(act)
        if inplace and not strat.may_overwrite_input:
            raise ValueError(f"ckptnorm: inplace=True is only meaningful with strategy='inplace_abn', got "
                             f"{strat.name!r}; tip: drop inplace=True")
        # A module activation becomes a registered child (no state_dict keys: it has no state; modes follow ours).
        self.activation = fn if fn is not None else act.name
        self.activation_param = None if fn is not None else act.param
        self.strategy = strat.name
        self.inplace = inplace

    def reset_parameters(self) -> None:
        # BatchNorm's own, but also for a module without bias on a torch whose BatchNorm always has one (2.11).
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def __setattr__(self, name, value):
        # Replacing a module activation by a name (or plain callable): nn.Module refuses a non-module value for a
        # registered child, so unregister it first.
        if name == "activation" and not isinstance(value, nn.Module) and "activation" in self.__dict__.get(
                "_modules", {}):
            del self._modules["activation"]
        super().__setattr__(name, value)

    def _check_input_dim(self, input):
        if input.dim() not in self._expected_dims:
            raise ValueError(f"ckptnorm: {type(self).__name__} expects a {self._shape_hint} input, got a "
                             f"{input.dim()}-D input; tip: use BatchNormAct1d for (N, C) or (N, C, L), "
                             "BatchNormAct2d for (N, C, H, W), BatchNormAct3d for (N, C, D, H, W)")

    def _reducer(self):
        """What combines statistics across processes in a training forward: None (local BatchNorm) here."""
        return None

    def forward(self, input, residual=None):
        """``phi(BN(input) [+ residual])``; ``residual`` fuses the end of a post-activation residual block."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        # A forward re-run by autograd (torch.utils.checkpoint) must not count the batch twice.
        if self.training and self.track_running_stats and self.num_batches_tracked is not None \
                and not in_backward():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        # Like nn.SyncBatchNorm: only a module in training mode synchronizes (batch statistics in eval mode, without
        # running statistics, stay local).
        reducer = self._reducer() if self.training else None
        param = None if is_activation_module(self.activation) else self.activation_param  # a module: its own
        return batch_norm_act(input, self.running_mean if track else None, self.running_var if track else None,
                              self.weight, self.bias, use_batch_stats, factor, self.eps, self.activation,
                              param, self.strategy, self.inplace, residual, reducer)

    def extra_repr(self):
        if is_activation_module(self.activation):
            act = describe_callable(self.activation)
        else:
            act = get_activation(self.activation, self.activation_param).describe()
        extra = f", activation={act}, strategy={self.strategy}"
        if self.inplace:
            extra += ", inplace=True"
        # BatchNorm's own fields, written here so that ``bias`` shows also on a torch whose BatchNorm lacks it (2.11).
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}" + extra)


class BatchNormAct1d(_BatchNormAct):
    """``nn.BatchNorm1d`` + activation, for (N, C) or (N, C, L) inputs."""

    _expected_dims = (2, 3)
    _shape_hint = "2-D (N, C) or 3-D (N, C, L)"


class BatchNormAct2d(_BatchNormAct):
    """``nn.BatchNorm2d`` + activation, for (N, C, H, W) inputs (NCHW or channels_last)."""

    _expected_dims = (4,)
    _shape_hint = "4-D (N, C, H, W)"


class BatchNormAct3d(_BatchNormAct):
    """``nn.BatchNorm3d`` + activation, for (N, C, D, H, W) inputs (NCDHW or channels_last_3d)."""

    _expected_dims = (5,)
    _shape_hint = "5-D (N, C, D, H, W)"


class _SyncBatchNormAct(_BatchNormAct):
    """Synchronized BatchNorm + activation: in training, statistics and backward sums over every process of
    ``process_group`` (torch.distributed; None: the default group), each process holding part of the batch.

    Arguments follow ``nn.SyncBatchNorm`` (``process_group`` after ``track_running_stats``), plus the keyword
    arguments of ``BatchNormAct*d``; parameters, buffers and state_dict keys are BatchNorm's.  Every strategy
    synchronizes.  Eval mode does not communicate.  Without torch.distributed (not initialized) it falls back to
    local statistics and warns once (``SyncFallbackWarning``).  Every process must call the layer, in the same
    order; a process may pass an empty batch.  Parameters must be equal on every process (as DDP keeps them).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True, activation="leaky_relu",
                 activation_param=None, strategy="efficient_checkpoint", inplace=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         activation=activation, activation_param=activation_param, strategy=strategy,
                         inplace=inplace)
        self.process_group = process_group
        self._warned_local = False

    def _reducer(self):
        return reducer_for(self, self.process_group)


class SyncBatchNormAct1d(_SyncBatchNormAct, BatchNormAct1d):
    """Synchronized ``BatchNormAct1d``, for (N, C) or (N, C, L) inputs."""


class SyncBatchNormAct2d(_SyncBatchNormAct, BatchNormAct2d):
    """Synchronized ``BatchNormAct2d``, for (N, C, H, W) inputs (NCHW or channels_last)."""


class SyncBatchNormAct3d(_SyncBatchNormAct, BatchNormAct3d):
    """Synchronized ``BatchNormAct3d``, for (N, C, D, H, W) inputs (NCDHW or channels_last_3d)."""
