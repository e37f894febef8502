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

Choice: exactly one strategy per site, minimizing the summed time deltas subject to
``baseline bytes + summed byte deltas <= budget`` -- a multiple-choice knapsack, solved exactly by dynamic
programming over Pareto frontiers (``choose``): sites are merged one by one, keeping only partial solutions not
dominated in (bytes, time) and not already unable to fit the budget.  The predicted totals assume the per-site
deltas add up (they do when sites do not interact; ``Plan.apply`` and a fresh measurement tell).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..strategies import STRATEGY_NAMES, get_strategy
from ._recompute import SavedTensorsCounter
from .convert import convert
from .sites import find_sites
from .harness import median_times, training_step

__all__ = ["Plan", "PlanEntry", "plan", "choose"]

BASELINE = "standard"


# -- the exact solver --------------------------------------------------------------------------------------------------
def choose(options, capacity):
    """Exact multiple-choice knapsack: pick one ``(bytes, time)`` option per group, minimizing total time subject to
    total bytes <= ``capacity``.  Returns the chosen option index per group, or ``None`` when nothing fits.

    Values may be negative (deltas).  Among equal-time solutions the one with fewer bytes is returned.
    """
    groups = [list(g) for g in options]
    if any(not g for g in groups):
        raise ValueError("ckptnorm: every site needs at least one option; tip: check the candidate strategies")
    # suffix_min[k]: the fewest bytes groups k.. can add; a partial solution that cannot fit even so is dropped
    suffix_min = [0] * (len(groups) + 1)
    for k in range(len(groups) - 1, -1, -1):
        suffix_min[k] = suffix_min[k + 1] + min(b for b, _ in groups[k])
    if suffix_min[0] > capacity:
        return None
    frontier = [(0, 0.0)]  # (bytes, time), bytes increasing and time strictly decreasing
    back = []  # per group: for each frontier entry, (index in the previous frontier, option index)
    for k, group in enumerate(groups):
        limit = capacity - suffix_min[k + 1]
        merged = [(b + ob, t + ot, i, j) for i, (b, t) in enumerate(frontier) for j, (ob, ot) in enumerate(group)
                  if b + ob <= limit]
        merged.sort(key=lambda e: (e[0], e[1]))
        new_frontier, pointers = [], []
        for b, t, i, j in merged:
            if not new_frontier or t < new_frontier[-1][1]:
                new_frontier.append((b, t))
                pointers.append((i, j))
        frontier = new_frontier
        back.append(pointers)
    # the last entry has the least time (times decrease along the frontier)
    picks = []
    idx = len(frontier) - 1
    for pointers in reversed(back):
        i, j = pointers[idx]
        picks.append(j)
        idx = i
    return picks[::-1]


# -- the plan ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanEntry:
    """One site's choice: its predicted saved-bytes and time deltas vs ``standard`` (seconds per step)."""

    site: str
    strategy: str
    bytes_delta: int
    time_delta: float


@dataclass
class Plan:
    """The result of ``plan``.  ``candidates``: site -> strategy -> (bytes delta, time delta), everything measured."""

    entries: list
    candidates: dict
    baseline_bytes: int
    baseline_time: float
    budget_bytes: int
    inplace: object = "auto"
    measured_bytes: "int | None" = None  # saved bytes of the applied plan, measured by ``plan`` (None: not measured)
    predicted_bytes: int = field(init=False)
    predicted_time: float = field(init=False)

    def __post_init__(self):
        self.predicted_bytes = self.baseline_bytes + sum(e.bytes_delta for e in self.entries)
        self.predicted_time = self.baseline_time + sum(e.time_delta for e in self.entries)

    @property
    def strategies(self) -> dict:
        """site -> chosen strategy, the dict ``apply`` passes to ``convert``."""
        return {e.site: e.strategy for e in self.entries}

    def with_budget(self, budget) -> "Plan":
        """The optimal plan for another ``budget`` (bytes or fraction of standard) from the same measurements."""
        return _solve(self.candidates, self.baseline_bytes, self.baseline_time,
                      _budget_bytes(budget, self.baseline_bytes), self.inplace)

    @property
    def smallest_bytes(self) -> int:
        """The fewest saved bytes any choice of the measured candidates reaches (predicted)."""
        return self.baseline_bytes + sum(min(v[0] for v in c.values()) for c in self.candidates.values())

    def apply(self, model: nn.Module, *, inplace=None):
        """``convert(model, self.strategies, inplace=...)``: sites not in the plan are left as they are."""
        return convert(model, self.strategies, inplace=self.inplace if inplace is None else inplace)

    # -- printing and serialization
    def __str__(self):
        base = self.baseline_bytes or 1
        rows = [("site", "strategy", "saved bytes delta", "time delta (ms)")]
        for e in self.entries:
            rows.append((e.site, e.strategy, f"{e.bytes_delta:+,d}", f"{e.time_delta * 1e3:+.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"standard: {self.baseline_bytes:,d} bytes saved for backward, "
                     f"{self.baseline_time * 1e3:.3f} ms per step")
        lines.append(f"plan (predicted): {self.predicted_bytes:,d} bytes "
                     f"({self.predicted_bytes / base:.1%} of standard), {self.predicted_time * 1e3:.3f} ms per step "
                     f"({self.predicted_time / self.baseline_time:.2f}x)" if self.baseline_time > 0 else
                     f"plan (predicted): {self.predicted_bytes:,d} bytes ({self.predicted_bytes / base:.1%} of "
                     "standard)")
        if self.measured_bytes is not None:
            lines.append(f"plan (measured): {self.measured_bytes:,d} bytes ({self.measured_bytes / base:.1%} of "
                         "standard)")
        lines.append(f"budget: {self.budget_bytes:,d} bytes ({self.budget_bytes / base:.1%} of standard)")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = {"format": "ckptnorm.plan/1", "entries": [asdict(e) for e in self.entries],
                "candidates": {s: {k: list(v) for k, v in c.items()} for s, c in self.candidates.items()},
                "baseline_bytes": self.baseline_bytes, "baseline_time": self.baseline_time,
                "budget_bytes": self.budget_bytes, "inplace": self.inplace,
                "predicted_bytes": self.predicted_bytes, "predicted_time": self.predicted_time,
                "measured_bytes": self.measured_bytes}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
            if data.get("format") != "ckptnorm.plan/1":
                raise ValueError(f"format {data.get('format')!r}")
            return cls(entries=[PlanEntry(**e) for e in data["entries"]],
                       candidates={s: {k: (int(v[0]), float(v[1])) for k, v in c.items()}
                                   for s, c in data["candidates"].items()},
                       baseline_bytes=int(data["baseline_bytes"]), baseline_time=float(data["baseline_time"]),
                       budget_bytes=int(data["budget_bytes"]), inplace=data["inplace"],
                       measured_bytes=data.get("measured_bytes"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"ckptnorm: not a plan in JSON ({type(exc).__name__}: {exc}); tip: pass the text "
                             "written by Plan.to_json()") from None


# -- measurement -------------------------------------------------------------------------------------------------------
def _as_tuple(inputs):
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(f"ckptnorm: example_inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}; "
                    "tip: pass e.g. torch.randn(8, 3, 224, 224)")


def _prepare(model, strategy_dict, inputs, inplace):
    """A converted training copy and its exact saved bytes (the counted run is also its warm-up)."""
    m = convert(model, strategy_dict, inplace=inplace)
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


def _budget_bytes(budget, baseline_bytes):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"ckptnorm: budget must be bytes (int) or a fraction of standard (float in (0, 1]), got "
                        f"{type(budget).__name__}; tip: use e.g. budget=0.6")
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(f"ckptnorm: a float budget is a fraction of the standard saved bytes, in (0, 1]; got "
                             f"{budget}; tip: pass bytes as an int, e.g. budget={int(budget)}" if budget > 1 else
                             f"ckptnorm: a float budget is a fraction of the standard saved bytes, in (0, 1]; got "
                             f"{budget}; tip: use e.g. budget=0.6")
        return int(math.floor(budget * baseline_bytes))
    if budget < 0:
        raise ValueError(f"ckptnorm: budget must be >= 0 bytes, got {budget}; tip: use e.g. budget=0.6")
    return int(budget)


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
    names = list(STRATEGY_NAMES) if strategies is None else [get_strategy(s).name for s in
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
            prepared = [_prepare(model, {site.name: n, "*": BASELINE}, inputs, inplace) for n in alts]
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
    budget_bytes = _budget_bytes(budget, baseline_bytes)
    return _verified(model, inputs, candidates, baseline_bytes, baseline_time, budget_bytes, inplace)


# Per-site deltas are measured one site at a time; sites interact a little (a recomputed output read by a residual
# site, an input written over in place), so the sum may miss the applied plan's bytes by a few buffers.  The plan
# is therefore applied and measured, and re-solved with a budget tightened by the excess until it fits.
MAX_REFITS = 4


def _verified(model, inputs, candidates, baseline_bytes, baseline_time, budget_bytes, inplace):
    target = budget_bytes
    for _ in range(MAX_REFITS + 1):
        result = _solve(candidates, baseline_bytes, baseline_time, target, inplace)
        _, measured = _prepare(model, result.strategies, inputs, inplace)
        if measured <= budget_bytes:
            break
        target -= measured - budget_bytes
    else:
        raise ValueError(f"ckptnorm: the plans chosen for a budget of {budget_bytes:,d} bytes measure "
                         f"{measured:,d} bytes once applied (site interactions); tip: raise the budget a little")
    result.budget_bytes, result.measured_bytes = int(budget_bytes), int(measured)
    return result


def _solve(candidates, baseline_bytes, baseline_time, budget_bytes, inplace="auto") -> Plan:
    """The optimal ``Plan`` for measured ``candidates`` (site -> strategy -> (bytes delta, time delta))."""
    site_names = list(candidates)
    options = [list(candidates[s].items()) for s in site_names]
    picks = choose([[v for _, v in opts] for opts in options], budget_bytes - baseline_bytes)
    if picks is None:
        smallest = baseline_bytes + sum(min(v[0] for _, v in opts) for opts in options)
        base = baseline_bytes or 1
        raise ValueError(
            f"ckptnorm: no choice of strategies fits a budget of {budget_bytes:,d} bytes "
            f"({budget_bytes / base:.1%} of standard); the smallest achievable is {smallest:,d} bytes "
            f"({smallest / base:.1%} of standard, fraction {smallest / base:.4f}); tip: raise the budget to at least "
            f"{smallest} bytes, or allow more strategies (inplace_abn needs invertible activations such as "
            "leaky_relu)")
    entries = [PlanEntry(s, opts[j][0], int(opts[j][1][0]), float(opts[j][1][1]))
               for s, opts, j in zip(site_names, options, picks)]
    return Plan(entries=entries, candidates=copy.deepcopy(candidates), baseline_bytes=int(baseline_bytes),
                baseline_time=float(baseline_time), budget_bytes=int(budget_bytes), inplace=inplace)
