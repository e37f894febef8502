"""Paths no other test reached (issue on blind spots): the strategy registry, convert's error paths, the planner's
re-fit loop, and each asserted on what it must do, not only that it runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ckptnorm
from ckptnorm.strategies import _ALIASES, _REGISTRY, EfficientCheckpoint, get_strategy, register_strategy
from ckptnorm.torch import BatchNormAct2d, convert


# -- register_strategy --------------------------------------------------------------------------------------------
def test_register_strategy_makes_a_strategy_usable_by_name_and_alias():
    class Recording(EfficientCheckpoint):
        name = "recording_efficient"
        calls = 0

        def backward(self, *args, **kwargs):
            type(self).calls += 1
            return super().backward(*args, **kwargs)

    assert register_strategy(Recording, aliases=("rec_eff",)) is Recording  # usable as a decorator
    try:
        assert type(get_strategy("recording_efficient")) is Recording and get_strategy("REC-EFF").name == Recording.name
        # listed where every strategy is listed (the planner's and compare's defaults, error tips); the constant
        # STRATEGY_NAMES stays the built-in four
        assert ckptnorm.strategy_names() == ckptnorm.STRATEGY_NAMES + ("recording_efficient",)
        with pytest.raises(ValueError, match="tip: use one of .*, recording_efficient$"):
            get_strategy("no_such_strategy")
        from ckptnorm.__main__ import build_parser
        assert build_parser().parse_args(["compare"]).strategies[-1] == "recording_efficient"
        torch.manual_seed(0)
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        grads = {}
        for strategy in ("efficient_checkpoint", "rec_eff"):
            layer = BatchNormAct2d(3, activation="leaky_relu", strategy=strategy, dtype=torch.float64)
            a = x.clone().requires_grad_()
            (layer(a) ** 2).sum().backward()
            grads[strategy] = (a.grad, layer.weight.grad)
        assert Recording.calls == 1  # its own backward ran
        for mine, want in zip(grads["rec_eff"], grads["efficient_checkpoint"]):
            torch.testing.assert_close(mine, want, rtol=0, atol=0)
    finally:
        _REGISTRY.pop(Recording.name, None)
        _ALIASES.pop("rec_eff", None)
    with pytest.raises(ValueError, match="^ckptnorm: unknown strategy 'rec_eff'"):
        get_strategy("rec_eff")


# -- convert's error paths -------------------------------------------------------------------------------------------
class CalledTwice(nn.Module):
    """One BN module applied to two tensors: its two calls have different statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv(x)
        return F.relu(self.bn(a)) + self.bn(a * 2)


def test_convert_rejects_what_is_not_a_model_or_a_strategy():
    with pytest.raises(TypeError, match="^ckptnorm: convert needs an nn.Module, got function; tip:"):
        convert(lambda x: x, "efficient_checkpoint")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(TypeError, match=r"^ckptnorm: strategy dict keys are glob patterns \(str\), got 1; tip:"):
        convert(model, {1: "inplace_abn"})
    with pytest.raises(ValueError, match=r"^ckptnorm: unknown strategy 'fast'.*\(strategy for all sites\)"):
        convert(model, "fast")
    with pytest.raises(ValueError, match=r"\(strategy for site '1' \(returned by the callable\)\)"):
        convert(model, lambda site: "fast")
    with pytest.raises(ValueError, match="^ckptnorm: inplace must be 'auto', True or False, got 'yes'"):
        convert(model, "efficient_checkpoint", inplace="yes")
    with pytest.raises(ValueError, match="^ckptnorm: site '1' cannot take strategy 'inplace_abn': it needs an "
                                         "invertible activation"):
        convert(model, "inplace_abn", strict=True)


def test_a_bn_called_twice_is_converted_without_fusing_and_computes_the_same():
    torch.manual_seed(0)
    model = CalledTwice().double()
    conv = convert(model, "efficient_checkpoint")
    (decision,) = conv.ckptnorm_report
    assert decision.applied == "efficient_checkpoint" and "BN module called 2 times" in decision.reason
    assert isinstance(conv.bn, BatchNormAct2d) and conv.bn.activation == "identity"  # the ReLU stays outside
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    grads = []
    for m in (model, conv):
        (m(x) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert (grads[1] - grads[0]).norm() <= 1e-10 * grads[0].norm()
    torch.testing.assert_close(conv.bn.running_var, model.bn.running_var, rtol=1e-12, atol=1e-14)
    assert int(conv.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 2


def test_convert_strict_refuses_a_strategy_keeping_an_output_modified_in_place():
    class AddInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x
            return out

    with pytest.raises(ValueError, match="^ckptnorm: site 'bn' cannot take strategy 'inplace_abn', which keeps the "
                                         "layer's output"):
        convert(AddInPlace(), "inplace_abn", strict=True)


# -- the planner's re-fit loop ---------------------------------------------------------------------------------------
def test_planner_refits_until_the_measured_plan_fits_and_says_when_it_cannot(monkeypatch):
    """Per-site byte deltas need not add up (sites interact): ``plan`` measures the applied plan and re-solves with
    a tighter target.  Simulated here: the first measurement of an applied plan comes out 1,000 bytes over the
    budget, whatever slack the chosen plan had (which plan is cheapest depends on measured times)."""
    from ckptnorm.torch import planner
    calls = {"n": 0}
    real, real_solve = planner._prepare, planner.planning.solve
    targets = []

    def solve_recording_target(candidates, baseline_bytes, baseline_time, target, *rest):
        targets.append(target)  # the first target is the budget itself
        return real_solve(candidates, baseline_bytes, baseline_time, target, *rest)

    def measured_over_budget(model, strategies, inputs, inplace, over):
        copy, measured = real(model, strategies, inputs, inplace)
        calls["n"] += 1
        return copy, max(measured, targets[0] + over) if over else measured

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(planner.planning, "solve", solve_recording_target)
    monkeypatch.setattr(planner, "_prepare", lambda *a: measured_over_budget(*a, over=1000 if calls["n"] < 1 else 0))
    p = planner.plan(model, x, 0.8, repeats=1)
    assert p.measured_bytes <= p.budget_bytes and calls["n"] >= 2
    calls["n"] = 0
    monkeypatch.setattr(planner, "_prepare", lambda *a: measured_over_budget(*a, over=10 ** 9))
    with pytest.raises(ValueError, match=r"^ckptnorm: the plans chosen for a budget of [\d,]+ bytes measure .* "
                                         r"once applied \(site interactions\); tip: raise the budget a little"):
        planner.plan(model, x, 0.8, repeats=1)
