"""Shared machinery of the zoo suite: the model cases, their preparation and the per-strategy check.

Each case is converted under every strategy and checked with ``check_equivalence`` in float64: eval output, training
output, every parameter gradient and the running statistics within ``TOL`` (normwise relative) of the original's.
Before converting, every BatchNorm layer gets non-trivial affine parameters and running statistics (``perturb_bn``):
freshly initialized models have gamma = 1, beta = 0, mean = 0, var = 1, which would hide a mix-up of gamma and beta
or of the running statistics.  Gammas that a library initializes to zero (timm's ``zero_init_last``) stay zero, so
the ``inplace_abn`` precision fallback is exercised too.

The original's float64 run is recorded once per case (``ckptnorm.torch.equivalence.trace``) and reused by the four
strategies' checks; one prepared case is cached at a time (the parametrization keeps a case's strategies together).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import pytest
import torch

STRATEGIES = ("standard", "checkpoint", "efficient_checkpoint", "inplace_abn")
TOL = 1e-10
REQUIRED = os.environ.get("CKPTNORM_ZOO") == "1"
RECORD = os.environ.get("CKPTNORM_ZOO_RECORD")  # a file: one JSON line per checked conversion (conftest prints them)
MEASURED = ("efficient_checkpoint", "inplace_abn")  # strategies whose saved bytes are measured when recording


def require(module):
    """Import a zoo library: an error with CKPTNORM_ZOO=1 (CI's zoo job), a skip of the test module otherwise."""
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (zoo suite: pip install -e '.[zoo]')")


@dataclass(frozen=True)
class Case:
    """One model: ``spec`` for ``ckptnorm.torch.zoo.build_model``, the input side (input batch x 3 x side x side),
    builder keyword arguments, whether the model has no BatchNorm at all (it must come back unchanged), an optional
    xfail reason (a described limitation), and the batch (2 unless the model needs more, see below)."""

    spec: str
    side: int
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    bn_free: bool = False
    xfail: str | None = None
    batch: int = 2

    @property
    def id(self):
        return self.spec.split(":", 1)[1].replace(":", "-")


def params(cases, strategies=STRATEGIES):
    """pytest params (case, strategy), a case's strategies next to each other."""
    out = []
    for case in cases:
        marks = [pytest.mark.xfail(reason=case.xfail, strict=False)] if case.xfail else []
        out.extend(pytest.param(case, s, id=f"{case.id}-{s}", marks=marks) for s in strategies)
    return out


def case_params(cases):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=False)] if c.xfail else [])
            for c in cases]


def batchnorms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def perturb_bn(model, seed=0):
    """Non-trivial BN state (see the module docstring), in place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batchnorms(model).values():
            n = bn.num_features

            def rand(*shape):
                return torch.rand(*shape, generator=g, dtype=torch.float64)

            def randn(*shape):
                return torch.randn(*shape, generator=g, dtype=torch.float64)
            if bn.weight is not None:
                bn.weight.mul_((0.5 + rand(n)).to(bn.weight.dtype))
            if bn.bias is not None:
                bn.bias.add_((0.1 * randn(n)).to(bn.bias.dtype))
            if bn.running_mean is not None:
                bn.running_mean.copy_(0.1 * randn(n))
                bn.running_var.copy_(0.5 + rand(n))
    return model


_prepared = {}


def prepare(case):
    """(model float64 with perturbed BN, input float64, reference trace); one case cached at a time.

    Why batch 2 needs spatial maps >= 2 x 2 at every BN, and more batch for a BN after global pooling: a BN over n = 2
    values per channel has a backward dx proportional to eps / (var + eps), computed by cancellation, so rounding is
    amplified by about var / eps (1e5): two correct float64 implementations then differ by ~1e-10.  At n >= 4 the
    backward is well conditioned."""
    from ckptnorm.torch.equivalence import trace
    from ckptnorm.torch.zoo import build_model
    if case.spec not in _prepared:
        _prepared.clear()
        model, x = build_model(case.spec, (case.batch, 3, case.side, case.side), **case.kwargs)
        model = perturb_bn(model.double())
        x = x.double()
        _prepared[case.spec] = (model, x, trace(model, x))
    return _prepared[case.spec]


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def check_conversion(case, strategy):
    """Convert ``case``'s model with ``strategy`` and check everything the zoo suite promises about it."""
    from ckptnorm.torch import convert
    from ckptnorm.torch.equivalence import check_equivalence
    model, x, ref = prepare(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert(model, strategy)
    assert type(converted) is type(model), (
        f"convert returned a {_qualname(type(converted))}, not the class of the model, {_qualname(type(model))}")
    report = getattr(converted, "ckptnorm_report", None)
    assert report is not None, "the converted model has no ckptnorm_report"
    keys, new_keys = list(model.state_dict()), list(converted.state_dict())
    assert set(new_keys) == set(keys), (
        f"state_dict keys differ: missing {sorted(set(keys) - set(new_keys))[:5]}, unexpected "
        f"{sorted(set(new_keys) - set(keys))[:5]}")
    converted.load_state_dict(model.state_dict(), strict=True)
    applied = [d for d in report if d.applied is not None]
    if case.bn_free:
        assert not applied, f"a BN-free model had sites converted: {[d.name for d in applied][:5]}"
        state = converted.state_dict()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "state_dict values changed"
    else:
        assert applied, f"no site converted under {strategy}; report:\n{report}"
    result = check_equivalence(model, converted, x, reference=ref)
    if RECORD:
        record(case, strategy, model, converted, x, result)
    assert result.max <= TOL, f"{case.spec} under {strategy}: {result}"
    # the caller's model is untouched by convert and check_equivalence
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the original model was modified"
    return converted, result


def check_batchnorms_reported(case, strategy="efficient_checkpoint"):
    """Every BatchNorm module of the model is a site of the report (converted, or left with a reason)."""
    from ckptnorm.torch import convert
    from ckptnorm.torch.zoo import build_model
    if case.spec in _prepared:
        model = _prepared[case.spec][0]
    else:  # no float64 trace needed here
        model, _ = build_model(case.spec, (case.batch, 3, case.side, case.side), **case.kwargs)
    report = convert(model, strategy).ckptnorm_report
    names = {d.name for d in report}
    missing = sorted(set(batchnorms(model)) - names)
    assert not missing, f"{len(missing)} BatchNorm modules are not in the report, e.g. {missing[:5]}"
    return report


_original_bytes = {}


def _saved_bytes(model, x):
    """Exact bytes kept for backward by one float64 training forward and loss (parameters and input excluded)."""
    import copy

    from ckptnorm.torch import SavedTensorsCounter
    from ckptnorm.torch.zoo import training_loss
    net = copy.deepcopy(model).train()
    with SavedTensorsCounter(exclude=[net, x]) as counter:
        loss = training_loss(net(x))
    loss.backward()
    return counter.saved_bytes


def record(case, strategy, model, converted, x, result):
    """Append what the check found to ``RECORD``: sites, float64 error and (for ``MEASURED``) saved bytes."""
    import json
    report = converted.ckptnorm_report
    entry = {"model": case.spec, "strategy": strategy, "sites": len(report),
             "applied": sum(d.applied is not None for d in report),
             "as_requested": sum(d.applied == strategy for d in report), "rewritten": len(report.rewritten),
             "error": result.max, "saved_original": None, "saved": None}
    if strategy in MEASURED and not case.bn_free:
        if case.spec not in _original_bytes:
            _original_bytes[case.spec] = _saved_bytes(model, x)
        entry.update(saved_original=_original_bytes[case.spec], saved=_saved_bytes(converted, x))
    with open(RECORD, "a") as f:
        f.write(json.dumps(entry) + "\n")


def summary(lines) -> str:
    """A markdown table, one row per model, from ``record``'s JSON lines."""
    import json
    rows = {}
    for line in lines:
        e = json.loads(line)
        rows.setdefault(e["model"], {})[e["strategy"]] = e
    head = ("model", "sites", "converted (efficient_checkpoint / inplace_abn as requested)", "forwards rewritten",
            "saved bytes, efficient_checkpoint", "saved bytes, inplace_abn", "max float64 error (4 strategies)")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, by in rows.items():
        any_entry = next(iter(by.values()))

        def saving(s):
            e = by.get(s)
            if not e or not e["saved_original"]:
                return "-"
            return f"{100 * (e['saved'] / e['saved_original'] - 1):+.1f}%"
        ec, ia = by.get("efficient_checkpoint", {}), by.get("inplace_abn", {})
        out.append("| " + " | ".join((
            model, str(any_entry["sites"]), f"{ec.get('applied', '-')} / {ia.get('as_requested', '-')}",
            str(ec.get("rewritten", "-")), saving("efficient_checkpoint"), saving("inplace_abn"),
            f"{max(e['error'] for e in by.values()):.1e}")) + " |")
    return "\n".join(out)
