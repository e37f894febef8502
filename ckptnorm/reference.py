"""Float64 NumPy reference of BatchNorm + activation, forward and backward, for every strategy: the test oracle.

Written for clarity, independent of the backends and kernels: plain NumPy on (N, C, *spatial) arrays in float64.
``forward`` follows ``torch.nn.BatchNorm*d`` (biased variance to normalize, unbiased for the running variance,
momentum or cumulative average when momentum is None).  ``backward`` runs the backward of one strategy from
exactly what that strategy keeps:

* standard, efficient_checkpoint: x with the forward's mean and 1/sigma (textbook formula with xhat);
* checkpoint: x only, statistics recomputed;
* inplace_abn: z and 1/sigma only, y = phi^-1(z), the xhat-free formulas of the design note.

With ``residual`` r (a residual site, z = phi(y + r)) every strategy also keeps r, phi' is taken at y + r, the
inverse path uses y = phi^-1(z) - r, and ``backward`` returns the residual's gradient dr = dy as a fourth value.

In exact arithmetic all four give the same gradient; in float64 they agree to ~1e-12 (see tests), which checks
the derivation in docs/design.md independently of any kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import Activation, get_activation
from .strategies import get_strategy


@dataclass
class ReferenceForward:
    z: np.ndarray
    mean: np.ndarray            # statistics used to normalize (batch in training, running in eval)
    invstd: np.ndarray
    running_mean: "np.ndarray | None"
    running_var: "np.ndarray | None"
    num_batches_tracked: "int | None"
    kept: dict                  # what the strategy keeps for backward


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def _affine(weight, bias, channels):
    gamma = np.ones(channels) if weight is None else np.asarray(weight, dtype=np.float64)
    beta = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    return gamma, beta


def forward(x, running_mean=None, running_var=None, weight=None, bias=None, *, training=True, momentum=0.1,
            eps=1e-5, activation="identity", activation_param=None, num_batches_tracked=0, strategy="standard",
            residual=None):
    """Forward of BatchNorm + activation in float64.  Returns a ``ReferenceForward`` (inputs are not modified)."""
    act = activation if isinstance(activation, Activation) else get_activation(activation, activation_param)
    x = np.asarray(x, dtype=np.float64)
    gamma, beta = _affine(weight, bias, x.shape[1])
    track = running_mean is not None
    new_mean = None if not track else np.asarray(running_mean, dtype=np.float64).copy()
    new_var = None if not track else np.asarray(running_var, dtype=np.float64).copy()
    nbt = num_batches_tracked
    use_batch_stats = training or not track
    if use_batch_stats:
        mean = x.mean(axis=_axes(x))
        var = x.var(axis=_axes(x))
        m = x.size // x.shape[1]
        if training and track:
            nbt = num_batches_tracked + 1
            factor = 1.0 / nbt if momentum is None else momentum
            new_mean = (1 - factor) * new_mean + factor * mean
            new_var = (1 - factor) * new_var + factor * var * m / (m - 1)
    else:
        mean, var = new_mean, new_var
    invstd = 1.0 / np.sqrt(var + eps)
    y = _per_channel(gamma, x) * (x - _per_channel(mean, x)) * _per_channel(invstd, x) + _per_channel(beta, x)
    r = None if residual is None else np.broadcast_to(np.asarray(residual, dtype=np.float64), x.shape)
    z = act.forward(y if r is None else y + r)
    name = get_strategy(strategy).name
    kept = {
        "standard": {"x": x, "mean": mean, "invstd": invstd},
        "efficient_checkpoint": {"x": x, "mean": mean, "invstd": invstd},
        "checkpoint": {"x": x} if use_batch_stats else {"x": x, "mean": mean, "invstd": invstd},
        "inplace_abn": {"z": z, "invstd": invstd},
    }[name]
    if r is not None:
        kept = dict(kept, residual=r)
    return ReferenceForward(z, mean, invstd, new_mean, new_var, nbt if track else None, kept)


def backward(dz, fwd: ReferenceForward, weight=None, bias=None, *, training=True, eps=1e-5,
             activation="identity", activation_param=None, strategy="standard"):
    """Return (dx, dgamma, dbeta) in float64 from what ``strategy`` kept in ``fwd.kept`` (and dres last at a
    residual site).

    ``training`` must be the mode of the forward that made the statistics (batch statistics when True).
    """
    act = activation if isinstance(activation, Activation) else get_activation(activation, activation_param)
    dz = np.asarray(dz, dtype=np.float64)
    kept = fwd.kept
    ref = kept.get("x", kept.get("z"))
    gamma, beta = _affine(weight, bias, ref.shape[1])
    g, b = _per_channel(gamma, ref), _per_channel(beta, ref)
    m = ref.size // ref.shape[1]
    axes = _axes(ref)
    r = kept.get("residual")
    grads = _backward(dz, kept, act, g, b, gamma, m, axes, training, eps, 0.0 if r is None else r)
    return grads[:3] if r is None else grads


def _backward(dz, kept, act, g, b, gamma, m, axes, training, eps, r):
    """(dx, dgamma, dbeta, dy) with phi' taken at y + r."""
    if "x" in kept:
        x = kept["x"]
        if "mean" in kept:
            mean, invstd = kept["mean"], kept["invstd"]
        else:  # checkpoint: recompute the batch statistics from x
            mean, invstd = x.mean(axis=axes), 1.0 / np.sqrt(x.var(axis=axes) + eps)
        xhat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        dy = dz * act.derivative(g * xhat + b + r)
        dbeta = dy.sum(axis=axes)
        dgamma = (dy * xhat).sum(axis=axes)
        inv = _per_channel(invstd, x)
        if training:
            dx = g * inv * (dy - _per_channel(dbeta, x) / m - xhat * _per_channel(dgamma, x) / m)
        else:
            dx = g * inv * dy
        return dx, dgamma, dbeta, dy
    # inplace_abn: from z and 1/sigma only
    z, invstd = kept["z"], kept["invstd"]
    y = act.inverse(z) - r
    dy = dz * act.derivative_from_output(z)
    dbeta = dy.sum(axis=axes)
    s = (dy * (y - b)).sum(axis=axes)
    dgamma = s / gamma
    inv = _per_channel(invstd, z)
    if training:
        dx = g * inv * (dy - _per_channel(dbeta, z) / m) - (y - b) * inv * _per_channel(s, z) / (g * m)
    else:
        dx = g * inv * dy
    return dx, dgamma, dbeta, dy
