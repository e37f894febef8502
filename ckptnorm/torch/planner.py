"""``plan``: choose a strategy per BatchNorm + activation site so that a model fits a memory budget at least cost.

Measurement (``harness``: the very step ``compare`` and the benchmarks measure; on deep copies, through
``convert``; the caller's model, its running statistics included, is never run): a full training step -- forward
and ``ckptnorm.torch.zoo.training_loss`` of the outputs inside ``SavedTensorsCounter`` (parameters, buffers and the
example inputs excluded), then ``backward`` -- on

* the baseline: every site ``standard``;
* for every site and every strategy valid there (``inplace_abn`` only where the site's activation is invertible):
  that site alone set to the strategy, the others ``standard``.

Saved bytes are exact (one counted run per configuration); a candidate's byte delta is its count minus the
baseline's.  Time: for each site, the baseline and that site's candidates run round-robin (one warm-up each, then
``repeats`` rounds); a candidate's time delta is its median minus the baseline's median from the same loop, so slow
drifts of the machine cancel.  At most ``1 + number of strategies`` model copies are alive at once.

The copies are made once: ``convert(model, {"*": name})`` for the baseline and each strategy, and a candidate is
the baseline with that site's layer swapped for the same site's layer of the strategy's copy (and swapped back
after), so a model with S sites costs 1 + number of strategies conversions instead of about S x strategies.  Where
the copies' module trees differ (a conversion that depends on the strategy), each candidate is converted on its own
as ``{site: name, "*": "standard"}``.

Choice: ``ckptnorm.planning`` (framework-free): exactly one strategy per site, least summed time delta within the
budget, solved exactly; ``Plan.apply`` and a fresh measurement tell whether the per-site deltas added up.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from .. import planning
from ..planning import PlanEntry, choose  # noqa: F401  (public names of this module since before the split)
from ..strategies import get_strategy, strategy_names
from ._recompute import SavedTensorsCounter
from .convert import convert
from .sites import find_sites
from .harness import median_times, training_step

__all__ = ["Plan", "PlanEntry", "plan", "choose"]

BASELINE = "standard"


class Plan(planning.Plan):
    """The result of ``plan`` (``ckptnorm.planning.Plan``), which ``apply`` turns into a converted model."""

    def apply(self, model: nn.Module, *, inplace=None):
        """``convert`` with each planned site's strategy, matched by exact name: sites not in the plan are left as
        they are."""
        return convert(model, _by_name(self.strategies), inplace=self.inplace if inplace is None else inplace)


def _by_name(strategies, default=None):
    """``convert``'s strategy argument choosing by exact site name, ``default`` elsewhere.  Not the dict itself:
    its keys would be read as glob patterns, and a site's name may hold ``*``, ``?`` or ``[`` (a ``ModuleDict``
    key), matching other sites too."""
    return lambda site: strategies.get(site.name, default)


# -- measurement -------------------------------------------------------------------------------------------------------
def _as_tuple(inputs):
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(f"ckptnorm: example_inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}; "
                    "tip: pass e.g. torch.randn(8, 3, 224, 224)")


def _prepare(model, strategy, inputs, inplace):
    """A converted training copy and its exact saved bytes (the counted run is also its warm-up)."""
    m = convert(model, strategy, inplace=inplace)
    m.train()
    counter = SavedTensorsCounter(exclude=[m, *inputs])
    training_step(m, inputs, counter=counter, tool="plan")
    return m, counter.saved_bytes


def _set_module(root, qualname, module):
    parent, _, leaf = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _NotSwappable(Exception):
    """A swapped-in layer did not run: the converted forward does not look its layers up by name."""


def _swap_copies(model, names, site_names, inplace):
    """``{name: convert(model, {"*": name})}`` for the baseline and each strategy, or None where their module trees
    differ or a site is not a module of every copy (then candidates are converted one by one).  A site where
    ``convert`` falls back from a strategy gets, in that strategy's copy, the layer ``Plan.apply`` would give it."""
    copies = {n: convert(model, {"*": n}, inplace=inplace).train() for n in names}
    tree = [q for q, _ in copies[BASELINE].named_modules()]
    for c in copies.values():
        if [q for q, _ in c.named_modules()] != tree:
            return None
        for site in site_names:
            try:
                c.get_submodule(site)
            except AttributeError:
                return None
    return copies


def _measure_swapping(copies, sites, alts_of, inputs, repeats):
    """Per-site candidates ``{site: {strategy: (bytes delta, time delta)}}``, the baseline's bytes and its per-site
    median times, measured on the baseline copy with one site's layer swapped at a time."""
    base = copies[BASELINE]

    def counted(m, layer=None):
        ran = []
        handle = None if layer is None else layer.register_forward_pre_hook(lambda *_: ran.append(True))
        try:
            counter = SavedTensorsCounter(exclude=[m, *inputs])
            training_step(m, inputs, counter=counter, tool="plan")
        finally:
            if handle is not None:
                handle.remove()
        if layer is not None and not ran:
            raise _NotSwappable()
        return counter.saved_bytes

    baseline_bytes = counted(base)
    candidates, baseline_times = {}, []
    for site in sites:
        own = base.get_submodule(site.name)
        alts = alts_of(site)
        layers = [own] + [copies[n].get_submodule(site.name) for n in alts]

        def setter(layer):
            def setup():
                _set_module(base, site.name, layer)
                return base
            return setup
        setups = [setter(layer) for layer in layers]
        nbytes = []
        try:
            for setup, layer in zip(setups[1:], layers[1:]):
                nbytes.append(counted(setup(), layer))  # also the candidate's warm-up
        finally:
            _set_module(base, site.name, own)
        medians = median_times([base] * len(layers), inputs, repeats, setups=setups, tool="plan")
        _set_module(base, site.name, own)
        baseline_times.append(medians[0])
        cand = {BASELINE: (0, 0.0)}
        for n, b, med in zip(alts, nbytes, medians[1:]):
            cand[n] = (b - baseline_bytes, med - medians[0])
        candidates[site.name] = cand
    return candidates, baseline_bytes, baseline_times


def plan(model: nn.Module, example_inputs, budget, *, strategies=None, repeats=5, inplace="auto") -> Plan:
    """Measure every valid strategy at every site of ``model`` and choose, per site, the one that minimizes the
    step time while the saved-activation bytes stay within ``budget``.

    ``budget``: bytes (int) or a fraction (float in (0, 1]) of the bytes saved by the all-``standard`` model.
    ``example_inputs``: a tensor or a tuple of tensors.  ``strategies``: the candidate names (default: all); the
    baseline ``standard`` is always a candidate.  ``repeats``: timed rounds per site (median).  ``inplace``: passed
    to ``convert`` when measuring and by ``Plan.apply``.  Sites ``convert`` cannot replace (a BN module called more
    than once) are left out.  Raises ``ValueError`` when no choice fits the budget, giving the smallest figure.
    The chosen plan is applied and measured once (``Plan.measured_bytes``): it is within ``budget`` as measured,
    not only as predicted from the per-site deltas.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckptnorm: plan needs an nn.Module, got {type(model).__name__}; tip: pass the model")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"ckptnorm: repeats must be a positive int, got {repeats!r}; tip: use repeats=5")
    inputs = _as_tuple(example_inputs)
    names = list(strategy_names()) if strategies is None else [get_strategy(s).name for s in
                                                              ([strategies] if isinstance(strategies, str)
                                                               else strategies)]
    names = list(dict.fromkeys([BASELINE] + names))
    sites = [s for s in find_sites(model) if s.calls == 1]

    def valid(site, name):
        """Whether ``name`` may apply at ``site`` (the activation check; ``convert``'s report has the last word)."""
        strat = get_strategy(name)
        act = getattr(site, "activation", None)
        if act is None:  # an activation module without a kernel: not invertible
            return not getattr(strat, "requires_invertible", False)
        try:
            strat.check_activation(act)
        except ValueError:
            return False
        return True

    def alts_of(site):
        return [n for n in names if n != BASELINE and valid(site, n)]

    copies = _swap_copies(model, names, [s.name for s in sites], inplace) if sites else None
    candidates = None
    if copies is not None:
        baseline = copies[BASELINE]
        try:
            candidates, baseline_bytes, baseline_times = _measure_swapping(copies, sites, alts_of, inputs, repeats)
        except _NotSwappable:
            candidates = None
        del copies
    if candidates is None:
        baseline, baseline_bytes = _prepare(model, {"*": BASELINE}, inputs, inplace)
        baseline_times = []
        candidates = {}
        for site in sites:
            alts = alts_of(site)
            prepared = [_prepare(model, _by_name({site.name: n}, BASELINE), inputs, inplace) for n in alts]
            medians = median_times([baseline] + [m for m, _ in prepared], inputs, repeats, tool="plan")
            baseline_times.append(medians[0])
            cand = {BASELINE: (0, 0.0)}
            for n, (_, nbytes), med in zip(alts, prepared, medians[1:]):
                cand[n] = (nbytes - baseline_bytes, med - medians[0])
            candidates[site.name] = cand
            del prepared
    if not baseline_times:
        baseline_times = median_times([baseline], inputs, repeats, tool="plan")
    del baseline
    baseline_time = statistics.median(baseline_times)
    budget_bytes = planning.budget_bytes(budget, baseline_bytes)
    return _verified(model, inputs, candidates, baseline_bytes, baseline_time, budget_bytes, inplace)


# Per-site deltas are measured one site at a time; sites interact a little (a recomputed output read by a residual
# site, an input written over in place), so the sum may miss the applied plan's bytes by a few buffers.  The plan
# is therefore applied and measured, and re-solved with a budget tightened by the excess until it fits.
MAX_REFITS = 4


def _verified(model, inputs, candidates, baseline_bytes, baseline_time, budget_bytes, inplace):
    target = budget_bytes
    for attempt in range(MAX_REFITS + 1):
        try:
            result = planning.solve(candidates, baseline_bytes, baseline_time, target, inplace, Plan)
        except ValueError:
            if attempt == 0:  # the user's budget itself is out of reach: the solver's message says by how much
                raise
            break  # a tightened target out of reach: the measured plans did not fit (below)
        _, measured = _prepare(model, _by_name(result.strategies), inputs, inplace)
        if measured <= budget_bytes:
            break
        target -= measured - budget_bytes
    if measured > budget_bytes:
        raise ValueError(f"ckptnorm: the plans chosen for a budget of {budget_bytes:,d} bytes measure "
                         f"{measured:,d} bytes once applied (site interactions); tip: raise the budget a little")
    result.budget_bytes, result.measured_bytes = int(budget_bytes), int(measured)
    return result


