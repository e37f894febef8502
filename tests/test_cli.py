"""The main job: ``ckptnorm compare`` on the built-in block."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ckptnorm.__main__ import main
from ckptnorm.torch.compare import compare_block


def test_compare_prints_every_strategy(capsys):
    assert main(["compare", "--input", "2x4x8x8", "--channels", "8", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("standard", "checkpoint", "efficient_checkpoint", "inplace_abn"):
        assert f"\n{name} " in out
    assert "saved MiB" in out and "time ratio" in out


def test_compare_saved_bytes_are_one_buffer_less():
    results = {r.strategy: r for r in compare_block((2, 4, 8, 8), 8, repeats=1)}
    buffer = 2 * 8 * 8 * 8 * 4
    assert results["standard"].saved_bytes == 2 * buffer + 2 * 8 * 4  # x, z, fp32 save_mean/invstd
    assert results["checkpoint"].saved_bytes == buffer
    assert results["efficient_checkpoint"].saved_bytes == buffer + 2 * 8 * 8
    assert results["inplace_abn"].saved_bytes == buffer + 8 * 8
    assert all(r.max_grad_error < 1e-5 for r in results.values())


@pytest.mark.parametrize("args,message", [
    (["compare", "--input", "3x3"], "expected NxCxHxW"),
    (["compare", "--strategies", "fast"], "ckptnorm: unknown strategy 'fast'"),
    (["frobnicate"], "invalid choice"),
    (["compare", "--activation", "tanh"], "ckptnorm: unknown activation 'tanh'"),
    (["compare", "--activation", "relu", "--strategies", "inplace_abn"], "needs an invertible activation"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    out = subprocess.run([sys.executable, "-m", "ckptnorm", *args], capture_output=True, text=True)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
