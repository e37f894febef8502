"""``ckptnorm.torch.zoo`` (model specs, output flattening, the training loss) and ``check_equivalence`` itself."""
import collections
import copy

import pytest
import torch
from torch import nn

from ckptnorm.torch import Equivalence, check_equivalence
from ckptnorm.torch.equivalence import trace
from ckptnorm.torch.zoo import build_model, check_spec, flatten_outputs, parse_spec, training_loss
from zoo_cases import require


def _one_line_error(exc):
    text = str(exc)
    assert text.startswith("ckptnorm:") and "tip:" in text and "\n" not in text, text


# -- specs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["foo:bar", "resnet50", "torchvision:", "timm:a:b", "smp:Unet", "smp::resnet18",
                                  "smp:Unet:"])
def test_malformed_specs(spec):
    with pytest.raises(ValueError) as info:
        parse_spec(spec)
    _one_line_error(info.value)
    assert "torchvision:NAME" in str(info.value) and "smp:ARCH:ENCODER" in str(info.value)


def test_parse_spec():
    assert parse_spec("torchvision:resnet18") == ("torchvision", "resnet18")
    assert parse_spec("timm:efficientnet_b0") == ("timm", "efficientnet_b0")
    assert parse_spec("smp:FPN:efficientnet-b0") == ("smp", "FPN", "efficientnet-b0")
    with pytest.raises(TypeError):
        parse_spec(3)


@pytest.mark.parametrize("spec, library, fragment", [
    ("torchvision:resnet51", "torchvision", "resnet50"),
    ("timm:efficientnet_b00", "timm", "efficientnet_b0"),
    ("smp:Unett:resnet18", "segmentation_models_pytorch", "Unet"),
    ("smp:Unet:resnet19", "segmentation_models_pytorch", "resnet18"),
])
def test_unknown_names(spec, library, fragment):
    require(library)
    with pytest.raises(ValueError) as info:
        build_model(spec)
    _one_line_error(info.value)
    assert fragment in str(info.value)


def test_check_spec_names_the_missing_library(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    with pytest.raises(ValueError) as info:
        check_spec("timm:resnet18")
    _one_line_error(info.value)
    assert "needs timm" in str(info.value)


def test_default_input_is_the_smallest_that_fits():
    require("torchvision")
    require("timm")
    model, x = build_model("torchvision:resnet18")
    assert tuple(x.shape) == (2, 3, 64, 64) and model.training
    _, x = build_model("timm:vit_tiny_patch16_224", batch=1)  # a fixed-size ViT: only 224 fits
    assert tuple(x.shape) == (1, 3, 224, 224)


def test_build_model_is_deterministic_and_never_downloads(monkeypatch):
    require("torchvision")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    a, xa = build_model("torchvision:lraspp_mobilenet_v3_large", (2, 3, 32, 32))
    b, xb = build_model("torchvision:lraspp_mobilenet_v3_large", (2, 3, 32, 32))
    assert torch.equal(xa, xb)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_input_that_does_not_fit():
    require("timm")
    with pytest.raises(ValueError) as info:
        build_model("timm:vit_tiny_patch16_224", (1, 3, 64, 64))
    _one_line_error(info.value)


# -- outputs and loss ----------------------------------------------------------------------------------------------
def test_flatten_outputs():
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    Named = collections.namedtuple("Named", "logits aux")

    class WithLogits:
        logits = d

    assert flatten_outputs(a)[0] is a
    assert [t is x for t, x in zip(flatten_outputs((a, None, [b, {"k": c}])), (a, b, c))] == [True] * 3
    assert len(flatten_outputs({"out": a, "aux": b, "n": 3})) == 2
    assert flatten_outputs(Named(a, None)) == [a]
    assert flatten_outputs(WithLogits())[0] is d
    assert flatten_outputs(None) == [] and flatten_outputs("text") == []


def test_training_loss():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, dtype=torch.float64)
    target = torch.arange(4) * 7919 % 10
    assert torch.equal(training_loss(logits), nn.functional.cross_entropy(logits, target))
    seg = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    both = training_loss({"out": seg, "aux": logits})
    assert both.dtype == torch.float64
    torch.testing.assert_close(both, seg.square().mean() + nn.functional.cross_entropy(logits, target))
    assert training_loss(seg.half()).dtype == torch.float32
    assert training_loss(torch.arange(3)) is None and training_loss(None) is None
    assert torch.equal(training_loss(torch.ones(5, 1)), torch.tensor(1.0))  # N x 1: not logits


# -- check_equivalence ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, act=None, dropout=0.0, twice=False, coef=0.0):
        super().__init__()
        self.p = nn.Parameter(torch.ones(3))
        self.coef = coef
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = act or nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, 5)
        self.twice = twice

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.twice:
            y = self.bn(y)
        y = self.drop(self.act(y))
        return {"out": y, "logits": self.head(y.mean((2, 3))) + self.coef * self.p.sum()}


def _x():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_identical_models_are_equivalent_dropout_included():
    torch.manual_seed(0)
    model = Net(dropout=0.5)
    result = check_equivalence(model, copy.deepcopy(model), _x(), steps=2)
    assert isinstance(result, Equivalence) and result.max == 0.0 and result.ok() and result.steps == 2


def test_a_different_model_is_caught():
    torch.manual_seed(0)
    model = Net()
    other = copy.deepcopy(model)
    other.act = nn.LeakyReLU(0.01)
    result = check_equivalence(model, other, _x())
    assert result.eval_output > 1e-6 and result.train_output > 1e-6 and result.grad > 1e-6
    assert result.max == max(result.eval_output, result.train_output, result.grad, result.running_stats)
    assert not result.ok()


def test_num_batches_tracked_must_match():
    torch.manual_seed(0)
    model = Net()
    result = check_equivalence(model, Net(twice=True), _x())
    assert result.running_stats == float("inf")
    assert any("num_batches_tracked" in n for n in result.notes)


def test_state_dict_keys_must_match():
    torch.manual_seed(0)
    model = Net()
    other = copy.deepcopy(model)
    other.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError) as info:
        check_equivalence(model, other, _x())
    _one_line_error(info.value)


def test_callers_models_and_rng_untouched():
    torch.manual_seed(0)
    model = Net(dropout=0.5).float()
    other = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    check_equivalence(model, other, _x(), steps=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    for m in (model, other):
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        assert next(m.parameters()).dtype == torch.float32 and m.conv.weight.grad is None


def test_gradient_error_is_over_the_whole_vector():
    """A parameter whose true gradient is ~0 does not dominate: the error is relative to the whole gradient."""
    torch.manual_seed(0)
    model = Net()                       # the gradient of p is exactly 0
    other = copy.deepcopy(model)
    other.coef = 1e-20                  # ... and 1e-20 here: relative to p's own gradient, an infinite error
    result = check_equivalence(model, other, _x())
    assert 0 < result.grad <= 1e-15 and result.max <= 1e-15


def test_reference_trace_is_reused():
    torch.manual_seed(0)
    model = Net()
    ref = trace(model, _x())
    assert check_equivalence(model, copy.deepcopy(model), _x(), reference=ref).max == 0.0
    with pytest.raises(ValueError):
        check_equivalence(model, copy.deepcopy(model), _x(), steps=2, reference=ref)


# -- the savings benchmark (README's table) -------------------------------------------------------------------------
def test_zoo_savings_benchmark_measures_and_predicts(tmp_path, capsys):
    """``python -m benchmarks.zoo_savings`` on one small model, RSS subprocesses included: the exact saving, the
    prediction within 5% of it, the RSS held in fresh processes, and the markdown table."""
    import json
    import os
    import sys
    require("timm")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    try:
        from benchmarks import zoo_savings
    finally:
        sys.path.remove(root)
    out = tmp_path / "savings.json"
    assert zoo_savings.main(["--models", "timm:resnet10t=efficient_checkpoint", "--input", "2x3x64x64",
                             "--repeats", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["sites_applied"] == r["sites"] > 0
    assert 0 < r["saved_bytes_converted"] < r["saved_bytes_original"]
    assert abs(r["prediction_deviation"]) <= 0.05
    assert r["rss_held_original"] > 0 and r["rss_held_converted"] > 0
    # RSS sees what the exact count sees, within allocator slack
    assert abs(r["rss_saving"] - r["saving"]) <= 0.1, (r["rss_saving"], r["saving"])
    assert "| timm:resnet10t | efficient_checkpoint |" in capsys.readouterr().out
