"""Side-by-side comparison of the strategies on one block: saved bytes, step time, gradient error.

The block is ``conv1x1 -> BatchNormAct2d -> conv1x1`` used as is (no wrapper), the unit the design note counts
buffers for.  Saved bytes come from ``SavedTensorsCounter`` (exact, each storage once, parameters excluded);
time is the median of repeated forward+backward steps, as a ratio to ``standard`` measured in the same run.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from ..strategies import STRATEGY_NAMES
from ._recompute import SavedTensorsCounter
from .modules import BatchNormAct2d


@dataclass
class StrategyResult:
    strategy: str
    saved_bytes: int
    step_seconds: float
    max_grad_error: float   # normwise relative error of every gradient vs standard's, the largest


def make_block(in_channels=32, channels=64, activation="leaky_relu", strategy="standard"):
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, channels, 1, bias=False),
        BatchNormAct2d(channels, activation=activation, strategy=strategy),
        torch.nn.Conv2d(channels, in_channels, 1, bias=False),
    )


def _set_strategy(model, strategy):
    for m in model.modules():
        if isinstance(m, BatchNormAct2d):
            m.strategy = strategy
            m.inplace = False


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def compare_block(input_shape=(16, 32, 56, 56), channels=64, strategies=STRATEGY_NAMES, repeats=7,
                  activation="leaky_relu", seed=0):
    """Run every strategy on the same block and input; return a list of ``StrategyResult``."""
    torch.manual_seed(seed)
    base = make_block(input_shape[1], channels, activation)
    x = torch.randn(input_shape)
    results, reference = [], None
    for strategy in strategies:
        model = copy.deepcopy(base)
        _set_strategy(model, strategy)
        grads = _grads(model, x)  # warm-up: JIT, allocator
        if reference is None:
            reference = grads
        error = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference))
        model.zero_grad(set_to_none=True)
        with SavedTensorsCounter(exclude=[model, x]) as counter:
            out = model(x)
        out.square().mean().backward()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _grads(model, x)
            times.append(time.perf_counter() - start)
        results.append(StrategyResult(strategy, counter.saved_bytes, statistics.median(times), error))
    return results


def format_table(results, title="") -> str:
    base = next((r for r in results if r.strategy == "standard"), results[0])
    lines = [title] if title else []
    lines.append(f"{'strategy':22s} {'saved MiB':>10s} {'vs standard':>12s} {'step ms':>9s} {'time ratio':>11s} "
                 f"{'grad err':>9s}")
    for r in results:
        lines.append(f"{r.strategy:22s} {r.saved_bytes / 2**20:10.2f} {r.saved_bytes / base.saved_bytes:11.1%} "
                     f"{r.step_seconds * 1e3:9.1f} {r.step_seconds / base.step_seconds:10.2f}x "
                     f"{r.max_grad_error:9.1e}")
    return "\n".join(lines)
