"""``compare`` on a whole model and the built-in models (issue 4, point 4)."""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

torch = pytest.importorskip("torch")

from ckptnorm.torch.models import check_model_name, get_model, preact_resnet  # noqa: E402
from ckptnorm.torch.compare import Comparison, Row, checkpoint_blocks, compare, make_block  # noqa: E402

ROWS = ("original", "standard", "checkpoint", "efficient_checkpoint", "inplace_abn", "torch_checkpoint")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = preact_resnet(depth=8, width=4)
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compare(model, x, repeats=1, progress=False, model_name="tiny")
    return model, before, result


def test_every_row_with_its_measurements(tiny):
    _, _, result = tiny
    assert [r.name for r in result.rows] == list(ROWS)
    std = result["standard"]
    assert std.reduction == 0.0 and std.time_ratio == 1.0 and 0.0 < std.grad_error < 1e-5
    assert result.meta["grad_reference"] == "the float64 truth"
    for r in result.rows:
        assert r.saved_bytes > 0 and r.step_seconds > 0
        assert r.peak_bytes is not None  # CPU: the RSS high-water mark of one step (its value is noise at this size)
        assert r.reduction == pytest.approx(1 - r.saved_bytes / std.saved_bytes)


def test_memory_strategies_save_and_gradients_agree(tiny):
    _, _, result = tiny
    std = result["standard"].saved_bytes
    for name in ("checkpoint", "efficient_checkpoint", "inplace_abn", "torch_checkpoint"):
        assert result[name].saved_bytes < 0.75 * std, name
    for r in result.rows:
        assert r.grad_error < 1e-4, r.name
    assert "7 of 7 sites converted" in result["inplace_abn"].note
    assert "around 3 blocks (layer1.0, layer2.0, layer3.0)" in result["torch_checkpoint"].note


def test_callers_model_is_untouched(tiny):
    model, before, _ = tiny
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__name__ != "BatchNormAct2d" for m in model.modules())


def test_table_and_json_round_trip(tiny):
    _, _, result = tiny
    table = result.table()
    assert str(result) == table and "saved MiB" in table and "time ratio" in table and "model tiny" in table
    for name in ROWS:
        assert re.search(rf"\n[* ] {name} ", table), name
    data = json.loads(result.to_json())
    assert [r["name"] for r in data["rows"]] == list(ROWS)
    assert data["meta"]["input"] == "2x3x8x8 float32" and data["meta"]["repeats"] == 1
    back = Comparison.from_json(result.to_json())
    assert back.rows == result.rows and back.meta == result.meta


def test_plot_png_and_one_line_error_without_matplotlib(tiny, tmp_path, monkeypatch):
    _, _, result = tiny
    path = tmp_path / "c.png"
    if importlib.util.find_spec("matplotlib") is not None:  # installed by the test extra
        result.plot(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"^ckptnorm: plot needs matplotlib.*tip: pip install matplotlib") as e:
        result.plot(tmp_path / "d.png")
    assert "\n" not in str(e.value)


def test_plan_row_and_subset_of_strategies():
    class FakePlan:  # the Plan protocol compare uses: apply(model) -> model
        def apply(self, model):
            from ckptnorm.torch import convert
            return convert(model, {"layer1.*": "inplace_abn", "*": "efficient_checkpoint"})

    torch.manual_seed(0)
    model = preact_resnet(depth=8, width=4)
    result = compare(model, torch.randn(2, 3, 8, 8), ["inplace_abn"], plan=FakePlan(), repeats=1, progress=False,
                     include_original=False, include_torch_checkpoint=False)
    assert [r.name for r in result.rows] == ["standard", "inplace_abn", "plan"]
    assert result["plan"].saved_bytes < result["standard"].saved_bytes and result["plan"].grad_error < 1e-4


def test_fallback_is_noted():
    torch.manual_seed(0)
    result = compare(preact_resnet(depth=8, width=2, activation="relu"), torch.randn(2, 3, 8, 8), ["inplace_abn"],
                     repeats=1, progress=False, include_original=False, include_torch_checkpoint=False)
    assert result["inplace_abn"].note == "7 of 7 sites converted, 7 fell back to efficient_checkpoint"
    assert result["inplace_abn"].grad_error < 1e-4


def test_checkpoint_blocks_keeps_names_and_wraps_top_level_children_without_stages():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    keys = list(model.state_dict())
    assert checkpoint_blocks(model) == ["0", "2"]
    assert list(model.state_dict()) == keys
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="^ckptnorm: unknown strategy"):
        compare(preact_resnet(depth=8, width=2), torch.randn(1, 3, 4, 4), ["fast"], progress=False)
    with pytest.raises(ValueError, match="^ckptnorm: repeats"):
        compare(preact_resnet(depth=8, width=2), torch.randn(1, 3, 4, 4), repeats=0, progress=False)


def test_models():
    model = get_model()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.LeakyReLU in kinds
    assert get_model("preact_resnet", depth=20, num_classes=3)(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    for bad in ({"depth": 10}, {"width": 0}, {"activation": "tanh"}):
        with pytest.raises(ValueError, match="^ckptnorm: preact_resnet"):
            preact_resnet(**bad)
    with pytest.raises(ValueError, match="^ckptnorm: unknown model 'resnet50'; tip: .*torchvision:resnet50"):
        check_model_name("resnet50")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ValueError, match="^ckptnorm: model 'torchvision:resnet18' needs torchvision.*tip: pip"):
            get_model("torchvision:resnet18")
    else:
        assert get_model("torchvision:resnet18") is not None


@pytest.mark.skipif(importlib.util.find_spec("tqdm") is None, reason="tqdm is not installed")
def test_progress_bar_on_stderr(capsys):
    torch.manual_seed(0)
    compare(preact_resnet(depth=8, width=2), torch.randn(2, 3, 4, 4), ["inplace_abn"], repeats=1, progress=True,
            include_original=False, include_torch_checkpoint=False)
    err = capsys.readouterr().err
    assert "ckptnorm compare" in err and "step" in err


def test_grad_error_sees_a_wrong_gradient():
    """grad_error is the normwise error of the whole gradient against standard's: a strategy whose dgamma is 1e-3
    off shows an error of that order (the other rows of the table are rounding only)."""
    from ckptnorm.strategies import _REGISTRY, EfficientCheckpoint, register_strategy

    class Off(EfficientCheckpoint):
        name = "off_by_a_little"

        def backward(self, *args, **kwargs):
            dgamma, dbeta = super().backward(*args, **kwargs)
            return dgamma * (1 + 1e-3), dbeta

    register_strategy(Off)
    try:
        torch.manual_seed(0)
        model, x = preact_resnet(depth=8, width=4).double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
        result = compare(model, x, ["efficient_checkpoint", "off_by_a_little"], repeats=1, progress=False,
                         include_torch_checkpoint=False)
    finally:
        _REGISTRY.pop(Off.name)
    assert result["efficient_checkpoint"].grad_error < 1e-12  # float64: rounding only
    assert 1e-6 < result["off_by_a_little"].grad_error < 1e-3


def test_gradient_truth_is_float64_or_standard_where_float64_does_not_run():
    """The truth is the model as given in float64 (PyTorch's own float32 error then shows in ``original``); a model
    that refuses float64 is compared with standard's gradient, and the table says so."""
    class Float32Only(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_block(4, 8)

        def forward(self, x):
            if x.dtype != torch.float32:
                raise TypeError("float32 only")
            return self.body(x)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    result = compare(Float32Only(), x, ["inplace_abn"], repeats=1, progress=False, include_torch_checkpoint=False)
    assert result.meta["grad_reference"] == "standard (the model does not run in float64: TypeError: float32 only)"
    assert result["standard"].grad_error == 0.0 and 0 < result["inplace_abn"].grad_error < 1e-5
    assert "gradient vs standard (the model does not run in float64" in result.table()
    result = compare(make_block(4, 8), x, ["inplace_abn"], repeats=1, progress=False, include_torch_checkpoint=False)
    assert all(0 < r.grad_error < 1e-5 for r in result.rows)
    assert "gradient vs the float64 truth" in result.table()


def test_dropout_draws_the_same_masks_in_every_row_and_in_the_truth():
    """Each compared step is seeded (and the caller's RNG state restored), so that a model with dropout shows
    rounding in every row, and a row whose backward used other masks than its forward would stand out."""
    torch.manual_seed(0)
    block = make_block(4, 8)
    model = torch.nn.Sequential(block[0], block[1], block[2], torch.nn.Dropout(0.5), block[3])
    x = torch.randn(2, 4, 8, 8)
    state = torch.get_rng_state()
    result = compare(model, x, ["checkpoint", "inplace_abn"], repeats=1, progress=False,
                     include_torch_checkpoint=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert result.meta["grad_reference"] == "the float64 truth"
    for r in result.rows:
        assert r.grad_error < 1e-5, r.name


def test_each_row_gets_its_own_measured_time(monkeypatch):
    """Which measurement lands in which row: the timed steps are stubbed with a distinct time per variant, in the
    order compare measures them, and every row's step time and ratio to standard must be that variant's.  The eager
    rows are timed in one round-robin call (their steps in turn), not one row after another."""
    import importlib
    cmp = importlib.import_module("ckptnorm.torch.compare")
    seconds = iter([0.010, 0.020, 0.030, 0.045, 0.050])
    calls = []

    def median_times(models, inputs, repeats):
        calls.append(len(models))
        return [next(seconds) for _ in models]

    monkeypatch.setattr(cmp, "median_times", median_times)
    torch.manual_seed(0)
    result = compare(preact_resnet(depth=8, width=4), torch.randn(2, 3, 8, 8), repeats=1, progress=False,
                     include_torch_checkpoint=False)
    assert calls == [5]
    want = dict(zip(("original", "standard", "checkpoint", "efficient_checkpoint", "inplace_abn"),
                    (0.010, 0.020, 0.030, 0.045, 0.050)))
    assert {r.name: r.step_seconds for r in result.rows} == want
    assert {r.name: round(r.time_ratio, 12) for r in result.rows} == {k: round(v / 0.020, 12) for k, v in want.items()}


def test_pareto_frontier_is_marked_in_the_table():
    rows = [Row("fast_big", 100, None, 0.010, 0.0), Row("slow_small", 10, None, 0.030, 0.0),
            Row("dominated", 100, None, 0.020, 0.0), Row("middle", 50, None, 0.020, 0.0),
            Row("tie", 50, None, 0.020, 0.0)]
    result = Comparison(rows, {})
    assert result.pareto() == ["fast_big", "slow_small", "middle", "tie"]
    lines = result.table().splitlines()
    assert any(line.startswith("* fast_big ") for line in lines)
    assert any(line.startswith("  dominated ") for line in lines)
    assert "compile s" not in result.table()  # no compiled row, no compile column


# -- torch.compile rows (ckptnorm.torch.compiled) -------------------------------------------------------------------
COMPILED_ROWS = ("compile:original", "compile:standard", "compile:inplace_abn", "compile:budget=0.5")


@pytest.fixture(scope="module")
def compiled_block():
    """A small block compared eagerly and compiled (four compilations of a tiny graph: a few seconds)."""
    torch.manual_seed(0)
    budget_before = torch._functorch.config.activation_memory_budget
    result = compare(make_block(4, 8), torch.randn(2, 4, 4, 4), ["inplace_abn"], repeats=1, progress=False,
                     include_torch_checkpoint=False, compile=True, compile_budgets=[0.5], model_name="block")
    return result, budget_before


def test_compile_rows_beside_the_eager_rows(compiled_block):
    result, budget_before = compiled_block
    assert [r.name for r in result.rows] == ["original", "standard", "inplace_abn", *COMPILED_ROWS]
    assert torch._functorch.config.activation_memory_budget == budget_before  # restored after each row
    for r in result.rows:
        assert r.compiled == r.name.startswith("compile:")
        assert (r.compile_seconds is None) == (not r.compiled)
        assert r.saved_bytes > 0 and r.step_seconds > 0 and r.grad_error < 1e-4, r.name
    assert result["compile:inplace_abn"].settings == {"compile": True, "strategy": "inplace_abn", "budget": None,
                                                      "options": {"layout_optimization": False}}
    assert result["compile:budget=0.5"].settings == {"compile": True, "strategy": None, "budget": 0.5}
    # PyTorch's partitioner already recomputes the pointwise ops; the budget recomputes more.
    assert result["compile:original"].saved_bytes < result["original"].saved_bytes
    assert result["compile:budget=0.5"].saved_bytes < result["compile:original"].saved_bytes
    # ckptnorm's layers are left to eager (graph breaks, counted in the note); PyTorch's block is one graph.
    assert "default settings): 1 graph, no graph break" in result["compile:original"].note
    assert re.search(r"\d+ graph breaks \(\d+x .*torch.compiler.disable", result["compile:inplace_abn"].note)
    assert "(layout_optimization=False): " in result["compile:inplace_abn"].note
    assert "activation_memory_budget=0.5" in result["compile:budget=0.5"].note


def test_compile_rows_table_json_and_plot(compiled_block, tmp_path):
    result, _ = compiled_block
    table = result.table()
    assert "compile s" in table and "compile:* rows = torch.compile" in table
    line = next(x for x in table.splitlines() if x[2:].startswith("compile:budget=0.5 "))
    assert re.search(r" \d+\.\d$", line)  # compile seconds shown for a compiled row
    line = next(x for x in table.splitlines() if x[2:].startswith("standard "))
    assert line.endswith(" -")
    back = Comparison.from_json(result.to_json())
    assert back.rows == result.rows and back["compile:budget=0.5"].settings["budget"] == 0.5
    if importlib.util.find_spec("matplotlib") is not None:
        result.plot(tmp_path / "c.png")
        assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_settings_are_restored_on_error():
    from ckptnorm.torch import compiled
    before = torch._functorch.config.activation_memory_budget
    with pytest.raises(RuntimeError, match="inside"):
        with compiled.compile_settings(0.25):
            assert torch._functorch.config.activation_memory_budget == 0.25
            raise RuntimeError("inside")
    assert torch._functorch.config.activation_memory_budget == before
    for bad in ([0.0], [1.5]):
        with pytest.raises(ValueError, match=r"^ckptnorm: compile budgets are fractions in \(0, 1\].*tip:"):
            compare(make_block(4, 8), torch.randn(2, 4, 4, 4), progress=False, compile_budgets=bad)


@pytest.mark.slow  # a real compile of the built-in model: ~10-40 s, by the Inductor cache
def test_compiled_preact_resnet_smoke():
    torch.manual_seed(0)
    result = compare(preact_resnet(depth=8, width=4), torch.randn(2, 3, 8, 8), ["efficient_checkpoint"], repeats=1,
                     progress=False, include_original=False, include_torch_checkpoint=False, compile=True)
    assert [r.name for r in result.rows] == ["standard", "efficient_checkpoint", "compile:original",
                                             "compile:standard", "compile:efficient_checkpoint"]
    for r in result.rows:
        assert r.grad_error < 1e-4, r.name
    assert result["compile:efficient_checkpoint"].saved_bytes < result["compile:standard"].saved_bytes
    # COMPILE_OPTIONS: the compiled converted model keeps what the eager one keeps, not Inductor's layout copies.
    assert result["compile:efficient_checkpoint"].saved_bytes == result["efficient_checkpoint"].saved_bytes
