"""What ``convert`` decides per site, and what it predicts the conversion saves.

``resolver`` turns the user's ``strategy`` argument (a name, a dict of glob patterns, a callable) into a function
site -> requested strategy; ``decide`` turns a request into what is applied, with the reasons the report shows
(rules 3 and 4 of ``convert``); ``predicted_saving`` counts the activation-sized buffers a site keeps before and
after, from what PyTorch's own ops keep for backward.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from ..strategies import get_strategy

__all__ = ["ConversionReport", "SiteDecision", "FALLBACK", "decide", "predicted_saving", "resolver"]

FALLBACK = "efficient_checkpoint"


@dataclass(frozen=True)
class SiteDecision:
    """What ``convert`` did at one site.  ``applied`` is None when the site was left as it was.
    ``predicted_saved_bytes``: bytes kept for backward that the change saves (needs ``example_inputs``)."""

    name: str
    activation: str
    requested: str | None
    applied: str | None
    inplace: bool
    reason: str = ""
    predicted_saved_bytes: int | None = None


class ConversionReport(list):
    """Per-site ``SiteDecision`` records, printable as a table; ``rewritten`` lists the modules whose forward was
    rewritten (rule 2), ``predicted_saved_bytes`` the predicted saving in bytes kept for backward of one training
    step (None without ``example_inputs``)."""

    rewritten: tuple = ()

    @property
    def predicted_saved_bytes(self):
        values = [d.predicted_saved_bytes for d in self if d.applied is not None]
        if any(v is None for v in values):
            return None
        return sum(values)

    @property
    def converted(self) -> int:
        return sum(d.applied is not None for d in self)

    def __str__(self):
        rows = [("site", "activation", "requested", "applied", "inplace", "reason")]
        for d in self:
            rows.append((d.name, d.activation, d.requested or "-", d.applied or "-", "yes" if d.inplace else "no",
                         d.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else ""))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ------")
        lines.append(f"{self.converted} of {len(self)} sites converted")
        if self.rewritten:
            lines.append("forward rewritten: " + ", ".join(n or "(model)" for n in self.rewritten))
        if self.predicted_saved_bytes is not None:
            lines.append(f"predicted saving: {self.predicted_saved_bytes / 2**20:.2f} MiB kept for backward")
        return "\n".join(lines)

    def __repr__(self):
        return f"ConversionReport({list.__repr__(self)})"


def _strategy_name(value, where):
    if value is None:
        return None
    try:
        return get_strategy(value).name
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{exc} (strategy for {where})") from None


def resolver(strategy):
    """A function site -> requested strategy name (or None: leave the site alone)."""
    if isinstance(strategy, dict):
        patterns = [(p, _strategy_name(v, f"pattern {p!r}")) for p, v in strategy.items() if p != "*"]
        default = _strategy_name(strategy["*"], "pattern '*'") if "*" in strategy else None
        for p, _ in patterns:
            if not isinstance(p, str):
                raise TypeError(f"ckptnorm: strategy dict keys are glob patterns (str), got {p!r}; tip: use e.g. "
                                "{'layer1.*': 'inplace_abn', '*': 'efficient_checkpoint'}")

        def resolve(site):
            for p, name in patterns:
                if fnmatch.fnmatchcase(site.name, p):
                    return name
            return default
        return resolve
    if callable(strategy) and not isinstance(strategy, type):
        return lambda site: _strategy_name(strategy(site), f"site {site.name!r} (returned by the callable)")
    name = _strategy_name(strategy, "all sites")
    return lambda site: name


def decide(site, requested, inplace, strict):
    """(applied, inplace, reason) for one site."""
    act = site.describe_activation()
    notes = []
    if site.note:
        return None, False, site.note
    if site.fused_residual:
        notes.append("residual site: add and activation fused")
    if site.inline_node is not None:
        notes.append(f"{site.inlined} returns the BN output: its code is inlined into {site.owner or 'the model'}'s "
                     "rewritten forward")
    elif site.residual and not site.fused_residual:
        notes.append(f"residual site not fused: {site.rewrite_blocked or 'no ckptnorm kernel for ' + site.unfused}")
    elif site.unfused:
        why = site.rewrite_blocked or "no ckptnorm kernel for it"
        notes.append(f"{site.unfused} after the BN is not fused ({why})")
    if not site.traced and site.rewrite_blocked:
        notes.append(f"no activation fused: {site.rewrite_blocked}")
    if site.calls > 1:
        notes.append(f"BN module called {site.calls} times: converted without fusing an activation")
    if requested is None:
        return None, False, "; ".join(["no strategy requested"] + notes)
    applied = requested
    strat = get_strategy(requested)
    needs_inverse = strat.requires_invertible and (site.activation_module is not None or
                                                   not site.activation.invertible)
    if needs_inverse:
        if strict:
            raise ValueError(
                f"ckptnorm: site {site.name!r} cannot take strategy {requested!r}: it needs an invertible activation "
                f"and this site applies {act}; tip: request 'efficient_checkpoint' for this site (e.g. "
                f"strategy={{{site.name!r}: 'efficient_checkpoint', '*': {requested!r}}}), or pass strict=False to "
                "fall back automatically") from None
        applied = FALLBACK
        notes.insert(0, f"{requested} needs an invertible activation, {act} is not: fell back to {FALLBACK}")
    elif strat.requires_invertible and site.precision_risk:
        # inplace_abn's precision check would keep x (and z) at every call: efficient_checkpoint keeps x alone
        applied = FALLBACK
        notes.insert(0, f"{site.precision_risk}: {requested} would keep x as well (precision fallback), so "
                        f"{FALLBACK} keeps less")
    elif "z" in strat.keeps and strat.name != "standard" and site.in_place_writer:
        if strict:
            raise ValueError(f"ckptnorm: site {site.name!r} cannot take strategy {requested!r}, which keeps the "
                             f"layer's output: {site.in_place_writer}; tip: request 'efficient_checkpoint' for this "
                             "site, or pass strict=False to fall back automatically")
        applied = FALLBACK
        notes.insert(0, f"{site.in_place_writer}: {requested} would keep a modified output, fell back to {FALLBACK}")
    use_inplace = False
    if get_strategy(applied).may_overwrite_input:
        if inplace is False:
            pass
        elif site.input_has_other_readers:
            if inplace is True:
                notes.insert(0, "inplace=True not applied: the BN input may have other readers")
            else:
                notes.insert(0, "out of place: the BN input may have other readers")
        else:
            use_inplace = True
    return applied, use_inplace, "; ".join(notes)


# -- prediction of the saving -------------------------------------------------------------------------------------
# What PyTorch's own activation keeps for backward: its result z (these, out of place), or its input y.  In place,
# the ones whose derivative is a function of z keep z; the others keep a copy of y taken before overwriting it.
_KEEPS_RESULT = {"identity", "relu", "sigmoid", "tanh"}
_KEEPS_RESULT_IN_PLACE = _KEEPS_RESULT | {"leaky_relu", "elu", "celu", "selu"}


def _buffers_kept(site, strategy) -> int:
    """Activation-sized buffers kept for backward at this site (BN input, pre-activation, output)."""
    act = site.activation.name if site.activation is not None else "module"
    identity = act == "identity" and site.activation_module is None
    if strategy is None:  # the original model
        result = act in (_KEEPS_RESULT_IN_PLACE if site.act_in_place else _KEEPS_RESULT)
        keeps_y = not identity and not result
        keeps_z = (not identity and result) or site.output_kept
        return 1 + keeps_y + keeps_z
    strat = get_strategy(strategy)
    if strat.name == "standard":
        keeps_y = not identity and act not in _KEEPS_RESULT | {"leaky_relu", "elu", "celu", "selu"}
        keeps_z = not identity or site.output_kept
        return 1 + keeps_y + keeps_z
    # one buffer: inplace_abn keeps z; checkpoint / efficient_checkpoint keep x and consumers a recipe (at residual
    # sites one that holds r, or r's recipe: assumed within _recompute.MAX_RESIDUAL_CHAIN, beyond which one output in
    # so many is kept)
    return 1


def predicted_saving(site, applied):
    if site.input_shape is None or site.input_dtype is None:
        return None
    nbytes = math.prod(site.input_shape) * site.input_dtype.itemsize
    return (_buffers_kept(site, None) - _buffers_kept(site, applied)) * nbytes
