"""Choosing a strategy per site under a memory budget, from measured per-site deltas (no framework here).

A framework adapter measures, per site and strategy, what choosing that strategy there adds to the baseline's saved
bytes and step time (``ckptnorm.torch.planner``); this module picks exactly one strategy per site, minimizing the
summed time deltas subject to ``baseline bytes + summed byte deltas <= budget`` -- a multiple-choice knapsack,
solved exactly by dynamic programming over Pareto frontiers (``choose``): sites are merged one by one, keeping only
partial solutions not dominated in (bytes, time) and not already unable to fit the budget.  The predicted totals
assume the per-site deltas add up (they do when sites do not interact; the adapter applies the plan and measures).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field

__all__ = ["Plan", "PlanEntry", "budget_bytes", "choose", "solve"]


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
    """A choice of strategy per site under a byte budget.  ``candidates``: site -> strategy -> (bytes delta, time
    delta), as measured by a framework adapter (``ckptnorm.torch.planner.plan``, whose ``Plan`` adds ``apply``)."""

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
        return solve(self.candidates, self.baseline_bytes, self.baseline_time,
                     budget_bytes(budget, self.baseline_bytes), self.inplace, type(self))

    @property
    def smallest_bytes(self) -> int:
        """The fewest saved bytes any choice of the measured candidates reaches (predicted)."""
        return self.baseline_bytes + sum(min(v[0] for v in c.values()) for c in self.candidates.values())

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


def budget_bytes(budget, baseline_bytes) -> int:
    """A budget in bytes: ``budget`` as bytes (int) or as a fraction of ``baseline_bytes`` (float in (0, 1])."""
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


def solve(candidates, baseline_bytes, baseline_time, budget_bytes, inplace="auto", plan_class=None) -> Plan:
    """The optimal plan (a ``plan_class``, default ``Plan``) for measured ``candidates`` (site -> strategy -> (bytes
    delta, time delta))."""
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
    return (plan_class or Plan)(entries=entries, candidates=copy.deepcopy(candidates), baseline_bytes=int(baseline_bytes),
                baseline_time=float(baseline_time), budget_bytes=int(budget_bytes),
        inplace=inplace)
