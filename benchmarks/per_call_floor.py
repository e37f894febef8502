"""The per-call floor: inplace_abn's training forward and backward as a bare ``torch.autograd.Function`` over the
CPU backend's primitives and the library's per-channel math (``batch_statistics``, ``backward_from_output``), with
nothing else -- no validation, no strategy or activation objects, no precision check, recipe, hook or
running-statistics rule beyond the update itself.  NCHW float32 tensors, leaky_relu(SLOPE),
training mode only.

``benchmarks.report`` times it beside ckptnorm's layers on small inputs: host work (the autograd Function's own
machinery, the kernel calls, the per-channel arithmetic) that a layer made of an autograd Function and these kernels
cannot go below on the machine at hand.  The distance from a strategy's row to this one is what the library's own
Python costs per call.  Not a usable layer: it computes what ``BatchNormAct2d(strategy="inplace_abn")`` computes
only for the inputs above (``tests/test_benchmarks.py`` checks that it does).
"""
from __future__ import annotations

import numpy as np
import torch

from ckptnorm import get_activation
from ckptnorm.backends import get_backend
from ckptnorm.channel_stats import batch_statistics
from ckptnorm.strategies import backward_from_output

from .common import SLOPE

_CPU = get_backend("cpu")
_ACT = get_activation("leaky_relu", SLOPE)


def _ncs(t):
    return t.detach().numpy().reshape(t.shape[0], t.shape[1], -1)


class _FloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        x_arr = _ncs(x)
        gamma, beta = weight.detach().numpy().astype(np.float64), bias.detach().numpy().astype(np.float64)
        mean, var, invstd, _, _ = batch_statistics(_CPU, x_arr, "ncs", eps)
        count = x_arr.shape[0] * x_arr.shape[2]
        _CPU.update_running_stats(running_mean.numpy(), running_var.numpy(), mean, var, count, momentum)
        z = torch.empty_like(x)
        _CPU.normalize_act(x_arr, _ncs(z), "ncs", mean, gamma * invstd, beta, _ACT)
        ctx.save_for_backward(z, torch.from_numpy(invstd))
        ctx.gamma, ctx.beta, ctx.count = gamma, beta, count
        return z

    @staticmethod
    def backward(ctx, dz):
        z, invstd = ctx.saved_tensors
        z_arr, dz_arr, invstd = _ncs(z), _ncs(dz.contiguous()), invstd.numpy()
        dx = torch.empty_like(z)
        dgamma, dbeta = backward_from_output(_CPU, z_arr, dz_arr, _ncs(dx), "ncs", invstd, ctx.gamma, ctx.beta, _ACT,
                                             True, ctx.count)
        return (dx, torch.from_numpy(dgamma.astype(np.float32)), torch.from_numpy(dbeta.astype(np.float32)),
                None, None, None, None)


class FloorLayer(torch.nn.BatchNorm2d):
    """``nn.BatchNorm2d`` + leaky_relu(SLOPE) through ``_FloorFunction`` (training, NCHW float32 only)."""

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        return _FloorFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum,
                                    self.eps)
