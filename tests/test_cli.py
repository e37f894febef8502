"""The main job: ``ckptnorm compare`` (built-in pre-activation ResNet, or ``--model block``) and ``ckptnorm plan``."""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from ckptnorm.__main__ import main
from ckptnorm.torch.compare import compare, make_block

ROWS = ("original", "standard", "checkpoint", "efficient_checkpoint", "inplace_abn", "torch_checkpoint")


def test_compare_block_prints_every_strategy(capsys):
    assert main(["compare", "--model", "block", "--input", "2x4x8x8", "--channels", "8", "--repeats", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model block conv1x1(4->8) -> BN(8) -> leaky_relu")
    for name in ("original", "standard", "checkpoint", "efficient_checkpoint", "inplace_abn"):
        assert re.search(rf"\n[* ] {name} ", out), name
    assert "torch_checkpoint" not in out


def test_compare_saved_bytes_are_one_buffer_less():
    torch.manual_seed(0)
    rows = {r.name: r for r in compare(make_block(4, 8).train(), torch.randn(2, 4, 8, 8), repeats=1,
                                       progress=False, include_torch_checkpoint=False).rows}
    buffer = 2 * 8 * 8 * 8 * 4   # one BN-sized float32 activation
    loss = 2 * 4 * 8 * 8 * 4     # the loss (mean of squares) keeps the block's output
    assert rows["original"].saved_bytes == 3 * buffer + 2 * 8 * 4 + loss  # x, y (out-of-place leaky), z
    assert rows["standard"].saved_bytes == 2 * buffer + 2 * 8 * 4 + loss  # x, z, fp32 save_mean/invstd
    assert rows["checkpoint"].saved_bytes == buffer + loss
    assert rows["efficient_checkpoint"].saved_bytes == buffer + 2 * 8 * 8 + loss  # + float64 mean, invstd
    assert rows["inplace_abn"].saved_bytes == buffer + 8 * 8 + loss               # z + float64 invstd
    assert all(r.grad_error < 1e-5 for r in rows.values())


def test_compare_default_model_with_json(capsys, tmp_path):
    path = tmp_path / "out.json"
    assert main(["compare", "--input", "2x3x8x8", "--repeats", "1", "--json", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model preact_resnet, input 2x3x8x8 float32")
    for name in ROWS:
        assert re.search(rf"\n[* ] {name} ", out), name
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["rows"]] == list(ROWS)


def test_compare_compile_budget_row(capsys, tmp_path):
    """--compile-budgets adds compiled rows (one compilation of the small block here; --compile is covered by
    test_compare's compiled block, which compiles four times)."""
    path = tmp_path / "out.json"
    assert main(["compare", "--model", "block", "--input", "2x4x4x4", "--channels", "8", "--repeats", "1",
                 "--no-progress", "--strategies", "inplace_abn", "--compile-budgets", "0.5", "--json",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n[* ] compile:budget=0.5 ", out) and "compile s" in out
    rows = json.loads(path.read_text())["rows"]
    assert [r["name"] for r in rows] == ["original", "standard", "inplace_abn", "compile:budget=0.5"]
    assert rows[-1]["settings"] == {"compile": True, "strategy": None, "budget": 0.5}
    assert rows[-1]["compile_seconds"] is not None and rows[0]["compile_seconds"] is None


def test_compare_postact_model(capsys, tmp_path):
    """The built-in post-activation ResNet: inplace_abn saves more than efficient_checkpoint (residual sites)."""
    path = tmp_path / "out.json"
    assert main(["compare", "--model", "postact_resnet", "--input", "2x3x8x8", "--repeats", "1", "--no-progress",
                 "--strategies", "efficient_checkpoint", "inplace_abn", "--json", str(path)]) == 0
    assert capsys.readouterr().out.startswith("model postact_resnet")
    saved = {r["name"]: r["saved_bytes"] for r in json.loads(path.read_text())["rows"]}
    assert saved["inplace_abn"] < saved["efficient_checkpoint"] < saved["standard"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ckptnorm", *args], capture_output=True, text=True)


NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
NO_MATPLOTLIB = importlib.util.find_spec("matplotlib") is None


@pytest.mark.parametrize("args,message", [
    (["compare", "--input", "3x3"], "expected NxCxHxW"),
    (["compare", "--strategies", "fast"], "ckptnorm: unknown strategy 'fast'"),
    (["frobnicate"], "invalid choice"),
    (["compare", "--model", "block", "--activation", "softsign"], "ckptnorm: unknown activation 'softsign'"),
    (["compare", "--model", "block", "--activation", "relu", "--strategies", "inplace_abn"],
     "needs an invertible activation"),
    (["compare", "--model", "resnet9000"], "ckptnorm: unknown model 'resnet9000'; tip:"),
    (["compare", "--input", "2x1x8x8"], "ckptnorm: input 2x1x8x8 does not fit model 'preact_resnet'"),
    (["compare", "--repeats", "0"], "expected a positive integer"),
    (["compare", "--compile-budgets", "0.5", "2"], "expected a fraction in (0, 1]"),
    (["plan"], "--budget"),
    (["plan", "--budget", "-1"], "expected a fraction"),
    pytest.param(["compare", "--model", "torchvision:resnet50"], "needs torchvision, which is not installed; tip:",
                 marks=pytest.mark.skipif(not NO_TORCHVISION, reason="torchvision is installed")),
    pytest.param(["compare", "--plot", "x.png"], "ckptnorm: --plot needs matplotlib",
                 marks=pytest.mark.skipif(not NO_MATPLOTLIB, reason="matplotlib is installed")),
])
def test_bad_arguments_are_one_line_errors(args, message):
    out = _run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr


@pytest.mark.slow  # measures every site; the quick tier has test_planner
@pytest.mark.skipif(importlib.util.find_spec("ckptnorm.torch.planner") is None, reason="planner not available")
def test_plan_prints_a_plan_and_writes_json(tmp_path):
    path = tmp_path / "plan.json"
    out = _run("plan", "--budget", "0.6", "--input", "2x3x8x8", "--repeats", "1", "--json", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and path.read_text().strip()
    from ckptnorm.torch.planner import Plan
    assert str(Plan.from_json(path.read_text())).strip()
    bad = _run("plan", "--budget", "0.0001", "--input", "2x3x8x8", "--repeats", "1")
    assert bad.returncode == 2 and bad.stderr.startswith("ckptnorm: ") and "Traceback" not in bad.stderr


def test_no_subcommand_is_compare(monkeypatch):
    import ckptnorm.__main__ as cli
    seen = {}
    monkeypatch.setattr(cli, "_compare", lambda parser, args: seen.setdefault("args", args) and 0)
    monkeypatch.setattr(cli, "_plan", lambda parser, args: pytest.fail("plan ran"))
    main([])
    defaults = cli.build_parser().parse_args(["compare"])
    assert vars(seen["args"]) == vars(defaults)


def test_unwritable_json_path_is_a_one_line_error(tmp_path):
    path = tmp_path / "missing-dir" / "out.json"
    out = _run("compare", "--model", "block", "--input", "2x4x8x8", "--repeats", "1", "--json", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "ckptnorm compare:" not in out.stderr  # early
    assert out.stderr.startswith(f"ckptnorm: cannot write {str(path)!r}: No such file or directory")
    assert out.stderr.count("\n") == 1


@pytest.mark.skipif(NO_MATPLOTLIB, reason="needs matplotlib (the error without it is tested above)")
def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "cmp.png"
    assert main(["compare", "--model", "block", "--input", "2x4x8x8", "--repeats", "1", "--plot", str(path),
                 "--no-progress"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plan_refuses_the_block_model():
    out = _run("plan", "--model", "block", "--budget", "0.9")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("ckptnorm: plan does not take --model block; tip: use preact_resnet")


@pytest.mark.parametrize("argv, shape", [(["compare"], (8, 3, 128, 128)),
                                         (["compare", "--model", "postact_resnet"], (8, 3, 128, 128)),
                                         (["compare", "--input", "2x3x8x8"], (2, 3, 8, 8))])
def test_compare_default_input_of_the_built_in_models(monkeypatch, argv, shape):
    """128x128 crops by default (the step ratios are those of layers larger than their host work)."""
    cmp = importlib.import_module("ckptnorm.torch.compare")  # the module (ckptnorm.torch.compare is the function)
    seen = {}

    def record(model, x, *args, **kwargs):
        seen["shape"] = tuple(x.shape)
        raise SystemExit(0)

    monkeypatch.setattr(cmp, "compare", record)
    with pytest.raises(SystemExit):
        main(argv + ["--no-progress"])
    assert seen["shape"] == shape
