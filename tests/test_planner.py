"""``plan``: exact measurement of per-site candidates, exact multiple-choice knapsack, Plan JSON / apply."""
import copy
import itertools
import json
import random

import pytest
import torch
from torch import nn

from ckptnorm.torch.planner import Plan, PlanEntry, choose, plan


class _Block(nn.Module):
    """Pre-activation block: BN -> LeakyReLU -> conv, twice, plus the identity shortcut."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(c), nn.LeakyReLU(0.01)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(c), nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(self.act2(self.bn2(self.conv1(self.act1(self.bn1(x))))))


class _Net(nn.Module):
    def __init__(self, c=8, blocks=2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(blocks)])
        self.bn, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.blocks(self.stem(x)))).mean((2, 3)))


SITES = ["blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", "bn"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = _Net().double()
    with torch.no_grad():  # non-trivial running stats and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    p = plan(model, x, 0.6, repeats=1)
    return model, x, p, before


def _brute(candidates, capacity):
    """(time, bytes, choice) minimizing (time, bytes) over all per-site choices within capacity, or None."""
    sites = list(candidates)
    best = None
    for combo in itertools.product(*[list(candidates[s].items()) for s in sites]):
        b = sum(v[0] for _, v in combo)
        t = sum(v[1] for _, v in combo)
        if b <= capacity and (best is None or (t, b) < best[:2]):
            best = (t, b, {s: n for s, (n, _) in zip(sites, combo)})
    return best


def _saved_bytes(model, x):
    """Bytes kept by the step the planner measures (forward and loss; ``ckptnorm.torch.harness``)."""
    from ckptnorm.torch.harness import saved_bytes
    return saved_bytes(model.train(), (x,), tool="plan")


def _grads(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# -- the exact solver --------------------------------------------------------------------------------------------------
def test_choose_matches_brute_force_on_random_instances_with_ties():
    rng = random.Random(1)
    for trial in range(300):
        groups = [[(rng.randint(-6, 6), rng.randint(-3, 3)) for _ in range(rng.randint(1, 4))]
                  for _ in range(rng.randint(1, 6))]
        lo = sum(min(b for b, _ in g) for g in groups)
        hi = sum(max(b for b, _ in g) for g in groups)
        for capacity in (lo - 1, lo, (lo + hi) // 2, hi, rng.randint(lo - 2, hi + 2)):
            picks = choose(groups, capacity)
            best = None
            for combo in itertools.product(*groups):
                b, t = sum(c[0] for c in combo), sum(c[1] for c in combo)
                if b <= capacity and (best is None or (t, b) < best):
                    best = (t, b)
            if best is None:
                assert picks is None, (groups, capacity)
                continue
            assert picks is not None and len(picks) == len(groups)
            chosen = [g[j] for g, j in zip(groups, picks)]
            # optimal time, and among ties the fewest bytes
            assert (sum(c[1] for c in chosen), sum(c[0] for c in chosen)) == best, (groups, capacity, picks)


def test_choose_float_times_and_many_groups_fast():
    rng = random.Random(2)
    groups = [[(0, 0.0)] + [(-rng.randint(1, 50) * 64, rng.uniform(-1e-4, 1e-3)) for _ in range(3)]
              for _ in range(40)]
    lo = sum(min(b for b, _ in g) for g in groups)
    picks = choose(groups, lo // 2)
    assert picks is not None and sum(g[j][0] for g, j in zip(groups, picks)) <= lo // 2
    assert choose(groups, lo - 1) is None
    assert choose([], 0) == []
    with pytest.raises(ValueError, match="^ckptnorm:"):
        choose([[]], 0)


# -- plan on a small model ---------------------------------------------------------------------------------------------
def test_candidates_are_the_valid_strategies_per_site(setup):
    _, _, p, _ = setup
    assert list(p.candidates) == SITES
    for site in SITES[:-1]:  # leaky_relu sites: all four
        assert set(p.candidates[site]) == {"standard", "checkpoint", "efficient_checkpoint", "inplace_abn"}
    assert set(p.candidates["bn"]) == {"standard", "checkpoint", "efficient_checkpoint"}  # relu: not invertible
    for c in p.candidates.values():
        assert c["standard"] == (0, 0.0)
        for name, (b, _) in c.items():
            assert isinstance(b, int) and (b < 0 or name == "standard")  # every other strategy saves bytes
    assert p.baseline_bytes > 0 and p.baseline_time > 0


@pytest.mark.parametrize("fraction", [1.0, 0.8, 0.6, "min"])
def test_plan_is_optimal_against_brute_force(setup, fraction):
    _, _, p, _ = setup
    q = p if fraction == 0.6 else p.with_budget(p.smallest_bytes if fraction == "min" else fraction)
    assert q.budget_bytes == (p.smallest_bytes if fraction == "min" else int(fraction * p.baseline_bytes))
    t, b, choice = _brute(q.candidates, q.budget_bytes - q.baseline_bytes)
    assert q.predicted_bytes <= q.budget_bytes
    assert q.predicted_time == pytest.approx(q.baseline_time + t, rel=0, abs=1e-12)
    assert q.predicted_bytes == q.baseline_bytes + b or q.predicted_time == pytest.approx(q.baseline_time + t)
    assert [e.site for e in q.entries] == SITES
    for e in q.entries:
        assert (e.bytes_delta, e.time_delta) == q.candidates[e.site][e.strategy]
        assert not (e.site == "bn" and e.strategy == "inplace_abn")


def test_budget_as_bytes_and_as_fraction(setup):
    _, _, p, _ = setup
    by_fraction = p.with_budget(0.75)
    by_bytes = p.with_budget(int(0.75 * p.baseline_bytes))
    assert by_fraction.budget_bytes == by_bytes.budget_bytes == int(0.75 * p.baseline_bytes)
    assert by_fraction.entries == by_bytes.entries
    assert p.with_budget(p.baseline_bytes * 10).predicted_bytes <= p.baseline_bytes
    for bad in (0.0, 1.5, -3, float("nan")):
        with pytest.raises(ValueError, match="^ckptnorm:"):
            p.with_budget(bad)
    for bad in (True, "0.5", None):
        with pytest.raises(TypeError, match="^ckptnorm:"):
            p.with_budget(bad)


def test_infeasible_budget_gives_the_smallest_figure(setup):
    model, x, p, _ = setup
    smallest = p.smallest_bytes
    assert smallest < p.baseline_bytes
    with pytest.raises(ValueError, match="^ckptnorm:") as info:
        p.with_budget(smallest - 1)
    msg = str(info.value)
    assert f"{smallest:,d} bytes" in msg and f"{smallest / p.baseline_bytes:.1%} of standard" in msg
    assert "tip:" in msg.rsplit(";", 1)[1]
    # plan itself raises the same way (int budget of 1 byte)
    with pytest.raises(ValueError, match="smallest achievable"):
        plan(model, x, 1, repeats=1, strategies=["checkpoint"])


def test_min_budget_never_puts_inplace_abn_on_the_relu_site(setup):
    _, _, p, _ = setup
    q = p.with_budget(p.smallest_bytes)
    assert q.predicted_bytes == p.smallest_bytes
    assert q.strategies["bn"] != "inplace_abn"
    assert all(s != "inplace_abn" for s in q.candidates["bn"])


@pytest.mark.parametrize("fraction", [0.6, "min"])
def test_apply_fits_the_budget_and_keeps_gradients(setup, fraction):
    model, x, p, _ = setup
    q = p if fraction == 0.6 else p.with_budget(p.smallest_bytes)
    converted = q.apply(model)
    assert [d.applied for d in converted.ckptnorm_report] == [q.strategies[s] for s in SITES]
    measured = _saved_bytes(converted, x)
    assert measured <= q.budget_bytes
    assert measured == q.predicted_bytes  # per-site deltas add up on this model
    expected = _grads(copy.deepcopy(model), x)
    got = _grads(converted, x)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_json_round_trip(setup):
    _, _, p, _ = setup
    for q in (p, p.with_budget(1.0), p.with_budget(p.smallest_bytes)):
        text = q.to_json()
        data = json.loads(text)
        assert data["predicted_bytes"] == q.predicted_bytes and len(data["entries"]) == len(SITES)
        back = Plan.from_json(text)
        assert back == q
        assert back.to_json() == text
        assert all(isinstance(e, PlanEntry) for e in back.entries)
    with pytest.raises(ValueError, match="^ckptnorm:"):
        Plan.from_json("{}")
    with pytest.raises(ValueError, match="^ckptnorm:"):
        Plan.from_json("not json")


def test_table(setup):
    _, _, p, _ = setup
    text = str(p)
    for site in SITES:
        assert site in text
    assert "budget:" in text and "standard:" in text and "of standard" in text
    assert p.entries[0].strategy in text


def test_callers_model_untouched(setup):
    model, _, _, before = setup
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert int(after["bn.num_batches_tracked"]) == 0
    assert all(type(m) is not None for m in model.modules())
    assert model.training  # mode unchanged (was train)
    assert all(p.grad is None for p in model.parameters())


def test_eval_model_stays_eval_and_tuple_io():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 1)
            self.bn, self.act = nn.BatchNorm1d(4), nn.LeakyReLU(0.2)

        def forward(self, a, b):
            y = self.act(self.bn(self.conv(a + b)))
            return y, y.mean()

    torch.manual_seed(3)
    model = TwoOut().eval()
    before = copy.deepcopy(model.state_dict())
    p = plan(model, (torch.randn(4, 2, 5), torch.randn(4, 2, 5)), 0.7, repeats=1, strategies=("inplace_abn",))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(p.candidates["bn"]) == {"standard", "inplace_abn"}
    assert p.strategies == {"bn": "inplace_abn"}


def test_argument_errors():
    model = _Net()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TypeError, match="^ckptnorm:"):
        plan("model", x, 0.5)
    with pytest.raises(TypeError, match="^ckptnorm:"):
        plan(model, [x, "y"], 0.5)
    with pytest.raises(ValueError, match="^ckptnorm:"):
        plan(model, x, 0.5, repeats=0)
    with pytest.raises(ValueError, match="^ckptnorm: unknown strategy"):
        plan(model, x, 0.5, strategies=["nope"])


def test_apply_matches_site_names_exactly_not_as_glob_patterns():
    """A ModuleDict key may hold glob characters: the plan for site "blocks.b?.1" must not convert "blocks.bx.1"."""
    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({key: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
                                         for key in ("b?", "bx")})

        def forward(self, x):
            return self.blocks["b?"](x) + self.blocks["bx"](x)

    chosen = Plan(entries=[PlanEntry("blocks.b?.1", "checkpoint", 0, 0.0)], candidates={}, baseline_bytes=0,
                  baseline_time=0.0, budget_bytes=0)
    converted = chosen.apply(Twins())
    assert getattr(converted.blocks["b?"][1], "strategy", None) == "checkpoint"
    assert type(converted.blocks["bx"][1]) is nn.BatchNorm2d
