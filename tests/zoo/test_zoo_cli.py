"""``ckptnorm compare`` / ``ckptnorm plan`` on library models (timm, torchvision segmentation, smp)."""
import json

import pytest

from ckptnorm.__main__ import main
from zoo_cases import require


def _run(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr()


def test_compare_timm_model(capsys, tmp_path):
    require("timm")
    path = tmp_path / "out.json"
    code, out = _run(capsys, "compare", "--model", "timm:mobilenetv3_small_050", "--input", "2x3x32x32",
                     "--repeats", "1", "--no-progress", "--json", str(path))
    assert code == 0
    assert out.out.startswith("model timm:mobilenetv3_small_050, input 2x3x32x32 float32")
    rows = [r["name"] for r in json.loads(path.read_text())["rows"]]
    assert rows[:5] == ["original", "standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]


def test_compare_segmentation_dict_output(capsys, tmp_path):
    """torchvision's segmentation models return {"out", "aux"}; the loss covers both, torch_checkpoint runs."""
    require("torchvision")
    path = tmp_path / "out.json"
    code, out = _run(capsys, "compare", "--model", "torchvision:lraspp_mobilenet_v3_large", "--input", "2x3x32x32",
                     "--repeats", "1", "--no-progress", "--strategies", "efficient_checkpoint", "--json", str(path))
    assert code == 0, out.err
    data = json.loads(path.read_text())
    names = [r["name"] for r in data["rows"]]
    assert "efficient_checkpoint" in names
    assert "torch_checkpoint" in names or "torch_checkpoint" in data["meta"].get("skipped", {})


def test_compare_smp_model_checkpoints_nested_blocks(capsys, tmp_path):
    require("segmentation_models_pytorch")
    path = tmp_path / "out.json"
    code, out = _run(capsys, "compare", "--model", "smp:Unet:resnet18", "--input", "2x3x32x32", "--repeats", "1",
                     "--no-progress", "--strategies", "inplace_abn", "--json", str(path))
    assert code == 0, out.err
    rows = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
    assert "encoder.layer1.0" in rows["torch_checkpoint"]["note"]


def test_compare_skips_torch_checkpoint_without_blocks():
    import torch
    from ckptnorm.torch import compare

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.w).square()

    result = compare(Holder(), torch.randn(2, 3, 8, 8), ["efficient_checkpoint"], repeats=1, progress=False)
    assert "torch_checkpoint" in result.meta["skipped"]
    assert "torch_checkpoint: skipped" in result.table()
    assert [r.name for r in result.rows] == ["original", "standard", "efficient_checkpoint"]


@pytest.mark.parametrize("spec, message", [
    ("timm:resnet5", "ckptnorm: timm has no model 'resnet5'"),
    ("smp:Unet", "is not of the form smp:ARCH:ENCODER"),
    ("keras:resnet50", "unknown model library 'keras'"),
])
def test_bad_model_specs_are_one_line_errors(capsys, spec, message):
    require("timm")
    with pytest.raises(SystemExit) as info:
        main(["compare", "--model", spec, "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "tip:" in err and err.count("\n") == 1, err


def test_plan_timm_model(capsys, tmp_path):
    require("timm")
    path = tmp_path / "plan.json"
    code, out = _run(capsys, "plan", "--model", "timm:resnet10t", "--input", "2x3x32x32", "--budget", "0.8",
                     "--repeats", "1", "--json", str(path))
    assert code == 0, out.err
    from ckptnorm.torch.planner import Plan
    p = Plan.from_json(path.read_text())
    assert p.measured_bytes <= p.budget_bytes
