"""The four strategies behind one interface, and a name-keyed registry with aliases.

Math (one channel, m elements; derivation in docs/design.md):

    forward   mean, var = batch statistics (training) or running ones (eval);  invstd = 1 / sqrt(var + eps)
              y = gamma * (x - mean) * invstd + beta;  z = phi(y)
    backward  dy = dz * phi'(y);  dbeta = sum(dy);  dgamma = sum(dy * xhat)
              dx = gamma * invstd * (dy - dbeta / m - xhat * dgamma / m)         (eval: dx = gamma * invstd * dy)
    from z    with S = sum(dy * (y - beta)):  dgamma = S / gamma,
              dx = gamma * invstd * (dy - dbeta / m) - (y - beta) * invstd * S / (gamma * m)
    residual  z = phi(y + r) (end of a post-activation residual block): phi' is taken at y + r, from z
              y = phi^-1(z) - r, and the residual's gradient is dr = dy.  Every strategy keeps r (the block's
              input, which its first conv keeps anyway).  Where z is re-materialized (checkpoint,
              efficient_checkpoint), its recipe needs r too, which is often the previous block's re-materialized
              output: a chain of recipes, bounded in length by the adapter (docs/design.md, section 4).

A strategy decides what is kept between forward and backward and which of the two backward paths runs.  It is
framework-agnostic: arrays are NumPy views handed over by an adapter (``ckptnorm.torch``), and every pass over the
data goes through a ``Backend``.  The adapter saves exactly the arrays named by ``CallDecision.keep``.

Invariants:
 1. Running statistics are updated once per forward call, never by a backward or a recompute.
 2. No strategy changes the model: all compute z = phi(gamma * xhat + beta) (standard BatchNorm semantics).
 3. A strategy that cannot produce an accurate gradient from what it keeps keeps more (``InplaceABN``), never less.
 4. The per-channel math between kernel calls in the backward path uses arithmetic operators only, so a backend
    may return its per-channel results as device arrays of its framework and nothing waits for the device.
 5. Synchronized BatchNorm (several processes, each with part of the batch) is one optional ``Reducer`` argument
    (``channel_stats``): the statistics and the backward sums become those of the union of the batches, m the
    global count; the fused kernels never know.  Everything a keep decision reads is merged too, so every process
    keeps the same names and runs the same backward path (their sums are then like terms).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from ._caller import warn_at_caller
from .activations import Activation
from .channel_stats import batch_statistics, elements_per_channel, merged_statistics


class PrecisionFallbackWarning(UserWarning):
    """``inplace_abn`` kept x for one call because z alone would have given an inaccurate gradient."""


class OutputRecipe(enum.Enum):
    """What the consumers of a call's output z keep instead of z (rematerialization, docs/design.md section 5).

    A strategy declares it per call (``Strategy.output_recipe``); the adapter's rematerialization module builds
    the recipe from it and never guesses from what was kept."""

    NONE = "none"                        # consumers keep z itself
    RECOMPUTE_STATISTICS = "x"           # x alone: the statistics are recomputed from x, then y and z
    REUSE_STATISTICS = "x+statistics"    # x and this call's per-channel statistics: y and z elementwise


@dataclass
class CallDecision:
    """What a forward call computed and what its backward will need (per-channel arrays are float64)."""

    mean: np.ndarray
    invstd: np.ndarray
    var: "np.ndarray | None"       # batch variance (training only)
    count: int                     # m: elements per channel
    keep: tuple                    # names among "x", "z", "mean", "invstd", "residual", in saving order
    fallback_reason: str = ""      # why inplace_abn keeps x this call ("" when it does not)
    recipe: OutputRecipe = OutputRecipe.NONE  # what consumers of z keep instead of z
    scale: np.ndarray = field(init=False)

    def set_affine(self, gamma):
        self.scale = gamma * self.invstd


def backward_from_input(backend, x, dz, dx, layout, mean, invstd, gamma, beta, act, training, count, residual=None,
                        dres=None, reducer=None):
    """Reduce then write dx (and dres = dy when given), both recomputing y from x.  Returns (dgamma, dbeta).

    With a ``reducer`` (synchronized BN, training) dx uses the sums over every process and ``count`` is the global
    m; the returned dgamma, dbeta stay this process's share (data parallelism sums or averages them itself)."""
    scale = gamma * invstd
    sum_dy, sum_dy_xhat = backend.reduce_from_input(x, dz, layout, mean, invstd, scale, beta, act, residual)
    if dx is not None:
        if training:
            all_dy, all_dy_xhat = ((sum_dy, sum_dy_xhat) if reducer is None
                                   else reducer.sum_channels(sum_dy, sum_dy_xhat))
            # few array operations: each costs microseconds on a small layer (host work, per call)
            minus_scale_by_m = scale / -count
            coef_u = minus_scale_by_m * invstd * all_dy_xhat
            coef_const = minus_scale_by_m * all_dy
        else:
            coef_u = coef_const = scale * 0.0
        backend.dx_from_input(x, dz, dx, layout, mean, scale, beta, act, scale, coef_u, coef_const, residual, dres)
    return sum_dy_xhat, sum_dy


def backward_from_output(backend, z, dz, dx, layout, invstd, gamma, beta, act, training, count, residual=None,
                         dres=None, reducer=None):
    """Reduce then write dx (and dres = dy when given) from z (y = phi^-1(z) [- r], no xhat).  Returns (dgamma,
    dbeta) as float64.  ``reducer``: as in ``backward_from_input``."""
    sum_dy, sum_dy_ybeta = backend.reduce_from_output(z, dz, layout, beta, act, residual)
    dgamma = sum_dy_ybeta / gamma
    if dx is not None:
        scale = gamma * invstd
        if training:
            all_dy, all_dgamma = ((sum_dy, dgamma) if reducer is None
                                  else reducer.sum_channels(sum_dy, dgamma))  # sum(S) / gamma = sum(S / gamma)
            # few array operations, as in backward_from_input
            coef_u = invstd / -count * all_dgamma
            coef_const = scale / -count * all_dy
        else:
            coef_u = coef_const = scale * 0.0
        backend.dx_from_output(z, dz, dx, layout, beta, act, scale, coef_u, coef_const, residual, dres)
    return dgamma, sum_dy


class Strategy:
    """Base class: declares what is kept and recomputed, and runs the backward that matches."""

    name: str = ""
    keeps: tuple = ()                  # kept between forward and backward (activation-sized first)
    recomputes: tuple = ()             # recomputed in backward
    requires_invertible: bool = False  # needs phi^-1 (z alone must determine y)
    may_overwrite_input: bool = False  # inplace=True writes z over x

    def output_recipe(self, training: bool, synced: bool, residual: bool) -> OutputRecipe:
        """What consumers of this call's z keep instead of z: ``OutputRecipe.NONE`` unless the strategy keeps x
        and rematerializes z.  At a residual site (``residual``) the recipe also holds r (or r's own recipe)."""
        return OutputRecipe.NONE

    @property
    def rematerializes_output(self) -> bool:
        """Whether consumers of z keep a recipe instead of z at a plain (non-residual) training site."""
        return self.output_recipe(True, False, False) is not OutputRecipe.NONE

    def check_activation(self, act: Activation) -> None:
        if self.requires_invertible and not act.invertible:
            raise ValueError(
                f"ckptnorm: strategy {self.name!r} needs an invertible activation, got {act.describe()}; tip: use "
                "identity, leaky_relu with slope > 0, elu or celu with alpha > 0, or selu; or "
                "strategy='efficient_checkpoint'")

    def decide(self, backend, x, layout, gamma, beta, act, training, eps, running_mean, running_var, residual=None,
               reducer=None, for_backward=True):
        """Compute the statistics for this call and decide what to keep.  Does not touch running stats.

        Per-channel arguments are float64 arrays of the backend's kind (running ones only used in eval mode).
        ``residual``: the r of a residual site z = phi(BN(x) + r) (then "residual" is kept too), or None.
        ``reducer``: a ``Reducer`` for synchronized BN (used in training only: eval mode never communicates); the
        decision's statistics and count are then global.
        ``for_backward=False``: no backward can run for this call (grad mode off, inference mode, nothing requires
        grad): the decision keeps nothing and declares no recipe, and what only backward needs is not computed
        (value ranges, the precision check, its warning).
        """
        count = elements_per_channel(x.shape, layout)
        xmin = xmax = residual_range = None
        if training and reducer is not None:
            # The exchange has the same shape on every process whatever this one's grad mode (a mismatch would hang).
            if residual is not None and self.needs_residual_range(act):
                residual_range = backend.channel_stats(residual, layout, with_range=True)[2:]
            count, mean, var, invstd, xmin, xmax, residual_range = merged_statistics(
                backend, x, layout, eps, reducer, self.needs_input_range(act), residual_range)
        elif training:
            mean, var, invstd, xmin, xmax = batch_statistics(backend, x, layout, eps,
                                                             for_backward and self.needs_input_range(act))
        else:
            mean, var, invstd = running_mean, None, (running_var + eps) ** -0.5
        keep, reason, recipe = (), "", OutputRecipe.NONE
        if for_backward:
            keep, reason = self._keep(backend, x, layout, gamma, beta, act, training, mean, invstd, xmin, xmax,
                                      residual, residual_range)
            if residual is not None:
                keep = keep + ("residual",)
            recipe = self.output_recipe(training, training and reducer is not None, residual is not None)
        decision = CallDecision(mean, invstd, var, count, keep, reason, recipe)
        decision.set_affine(gamma)
        return decision

    def _keep(self, backend, x, layout, gamma, beta, act, training, mean, invstd, xmin, xmax, residual,
              residual_range=None):
        return self.keeps, ""

    def needs_input_range(self, act) -> bool:
        """Whether ``_keep`` needs the per-channel min/max of x (computed with the statistics in training)."""
        return False

    def needs_residual_range(self, act) -> bool:
        """Whether ``_keep`` reads the per-channel min/max of a residual (merged across processes when synced)."""
        return False

    def backward(self, backend, saved, dz, dx, layout, gamma, beta, act, training, eps, count, dres=None,
                 reducer=None):
        """``saved`` maps the names in ``decision.keep`` to arrays.  Writes dx (if not None) and, at a residual site,
        the residual's gradient into ``dres`` (if not None; needs dx); returns (dgamma, dbeta).  ``reducer``: the
        forward's (training only); ``count`` is then the global m."""
        residual = saved.get("residual")
        reducer = reducer if training else None
        if "z" in saved and "x" not in saved:
            return backward_from_output(backend, saved["z"], dz, dx, layout, saved["invstd"], gamma, beta, act,
                                        training, count, residual, dres, reducer)
        x = saved["x"]
        if "mean" in saved:
            mean, invstd = saved["mean"], saved["invstd"]
        elif reducer is not None:  # synced checkpoint: the recomputed statistics must be the global ones again
            count, mean, _, invstd, _, _, _ = merged_statistics(backend, x, layout, eps, reducer)
        else:  # checkpoint: recompute the statistics (a full reduction pass over x)
            mean, _, invstd, _, _ = batch_statistics(backend, x, layout, eps)
        return backward_from_input(backend, x, dz, dx, layout, mean, invstd, gamma, beta, act, training, count,
                                   residual, dres, reducer)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Standard(Strategy):
    """What PyTorch does: BN keeps x, the activation keeps its output z (and y when not in place)."""

    name = "standard"
    keeps = ("x", "z", "mean", "invstd")
    recomputes = ()


class Checkpoint(Strategy):
    """Naive recompute (torch.utils.checkpoint style): keep x only; recompute statistics, y and z in backward."""

    name = "checkpoint"
    keeps = ("x",)
    recomputes = ("mean", "var", "y", "z")

    def output_recipe(self, training, synced, residual):
        # Eval mode has no batch statistics to recompute.  Synced: recomputing would need an exchange whose timing
        # depends on object lifetimes, which may differ between processes (deadlock): reuse the global ones.
        if not training or synced:
            return OutputRecipe.REUSE_STATISTICS
        return OutputRecipe.RECOMPUTE_STATISTICS

    def _keep(self, backend, x, layout, gamma, beta, act, training, mean, invstd, xmin, xmax, residual,
              residual_range=None):
        # Eval mode has no batch statistics to recompute; the running ones are per-channel, so keep them.
        return (("x",) if training else ("x", "mean", "invstd")), ""


class EfficientCheckpoint(Strategy):
    """Keep x plus per-channel mean and 1/sigma; recompute only the elementwise y and z (paper, section 3)."""

    name = "efficient_checkpoint"
    keeps = ("x", "mean", "invstd")
    recomputes = ("y", "z")

    def output_recipe(self, training, synced, residual):
        return OutputRecipe.REUSE_STATISTICS


class InplaceABN(Strategy):
    """In-Place Activated BatchNorm: keep z (optionally written over x) and 1/sigma; backward inverts phi.

    Precision fallback.  z carries y rounded to the storage dtype (unit roundoff u), so y - beta, and with it
    xhat = (y - beta) / gamma, has an error of about u * (|xhat| + |beta / gamma|): dgamma = S / gamma loses
    log2(1 + |beta / gamma|) bits.  For ELU, y = log1p(z / alpha) amplifies z's rounding by exp(-y).  We accept a
    loss of at most ``MAX_LOST_BITS`` = 5 bits (error <= 32 u, below the accumulation error of an fp32 reduction
    over a few thousand elements); a call where some channel would lose more -- |gamma| < |beta| / 31, gamma = 0,
    or with ELU a pre-activation below -ln(32) = -3.47 -- keeps x too (as efficient_checkpoint does), for that
    call only, and warns with ``PrecisionFallbackWarning``.  At a residual site y = phi^-1(z) - r also carries
    r's rounding, u * |r|: the check uses |beta| + max|r| in place of |beta|, and the ELU bound adds min(r); r's
    range costs one extra read of r per forward (only at residual sites).
    """

    name = "inplace_abn"
    keeps = ("z", "invstd")
    recomputes = ("y = phi^-1(z)",)
    requires_invertible = True
    may_overwrite_input = True
    MAX_LOST_BITS = 5

    def _keep(self, backend, x, layout, gamma, beta, act, training, mean, invstd, xmin, xmax, residual,
              residual_range=None):
        reason = self.fallback_reason(backend, x, layout, gamma, beta, act, mean, invstd, xmin, xmax, residual,
                                      residual_range)
        if reason:
            warn_at_caller(f"ckptnorm: inplace_abn keeps x for this call: {reason}", PrecisionFallbackWarning)
            return ("x", "mean", "invstd"), reason
        return self.keeps, ""

    def needs_input_range(self, act) -> bool:
        return act.name in ("elu", "celu", "selu")

    def needs_residual_range(self, act) -> bool:
        return True

    def fallback_reason(self, backend, x, layout, gamma, beta, act, mean, invstd, xmin, xmax, residual=None,
                        residual_range=None) -> str:
        """Why this call must keep x ("" if z suffices).  Reads per-channel values on the host: on a device backend
        this is one small synchronizing copy per forward, the price of never returning a wrong gradient.
        ``residual_range``: the residual's (min, max) per channel when already known (merged across processes in
        synchronized BN, so that every process decides alike); computed here otherwise."""
        from .precision import first_lossy_channel  # compiled: this check runs at every forward
        host = backend.to_host if backend is not None else np.asarray
        gamma, beta = np.ascontiguousarray(host(gamma), np.float64), np.ascontiguousarray(host(beta), np.float64)
        budget = 2.0 ** self.MAX_LOST_BITS
        rmin = rabs = 0.0
        if residual is not None:
            if residual_range is None:
                residual_range = backend.channel_stats(residual, layout, with_range=True)[2:]
            rmin, rmax = (host(v) for v in residual_range)
            rabs = np.ascontiguousarray(np.maximum(np.abs(rmin), np.abs(rmax)), np.float64).ravel()
        c = first_lossy_channel(gamma, beta, beta if residual is None else rabs, residual is not None, budget)
        if c >= 0:
            what = f"beta={beta[c]:.3g}" + ("" if residual is None else f", max|residual|={rabs[c]:.3g}")
            return (f"channel {c} has gamma={gamma[c]:.3g}, {what}; dgamma = S / gamma would lose more "
                    f"than {self.MAX_LOST_BITS} bits")
        if act.name in ("elu", "celu", "selu"):
            if xmin is None:  # eval mode: the range of x is needed for this check only
                _, _, xmin, xmax = backend.channel_stats(x, layout, with_range=True)
            mean, invstd, xmin, xmax = host(mean), host(invstd), host(xmin), host(xmax)
            lo = np.minimum(gamma * (xmin - mean) * invstd, gamma * (xmax - mean) * invstd) + beta + rmin
            # z's rounding (u |z|, |z| up to the asymptote) reaches y amplified by exp(-y) for elu and selu
            # (y = log1p(z / c): dy = dz / (c exp(y))) and by exp(-y / alpha) for celu (y = alpha log1p(z / alpha)):
            # the floor of the pre-activation is -ln 32, resp. -alpha ln 32.
            floor = -math.log(budget) * (act.param if act.name == "celu" else 1.0)
            if (lo < floor).any():
                c = int(np.argmin(lo))
                return (f"channel {c} reaches pre-activation {lo[c]:.3g} < {floor:.3g}, where "
                        f"{act.name.upper()}'s inverse amplifies rounding by more than 32x")
        return ""


# -- registry -------------------------------------------------------------------------------------------------------
_REGISTRY: dict = {}
_ALIASES: dict = {}


def register_strategy(cls, aliases=()):
    """Register a ``Strategy`` subclass under its ``name`` and ``aliases``; returns the class (usable as decorator)."""
    instance = cls()
    _REGISTRY[cls.name] = instance
    for alias in aliases:
        _ALIASES[alias] = cls.name
    return cls


register_strategy(Standard, aliases=("std", "native", "baseline", "none"))
register_strategy(Checkpoint, aliases=("ckpt", "recompute", "naive_checkpoint"))
register_strategy(EfficientCheckpoint, aliases=("efficient", "eff_ckpt", "efficient_ckpt"))
register_strategy(InplaceABN, aliases=("inplace", "iabn", "in_place_abn", "inplaceabn"))

STRATEGY_NAMES = tuple(_REGISTRY)  # the built-in strategies; strategy_names() also has those registered later


def strategy_names() -> tuple:
    """Every registered strategy's name, the built-in ones first, then those added with ``register_strategy``."""
    return tuple(_REGISTRY)


def get_strategy(spec) -> Strategy:
    """Return the registered strategy for a name or alias, a ``Strategy`` subclass, or an instance."""
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, type) and issubclass(spec, Strategy):
        return _REGISTRY.get(spec.name) or spec()
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in _REGISTRY:
            return _REGISTRY[key]
        raise ValueError(f"ckptnorm: unknown strategy {spec!r}; tip: use one of {', '.join(strategy_names())}")
    raise TypeError(f"ckptnorm: a strategy is a name, a Strategy class or instance, got {type(spec).__name__}; "
                    f"tip: use one of {', '.join(strategy_names())}")
