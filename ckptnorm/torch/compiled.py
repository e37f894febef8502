"""``torch.compile`` as the comparison runs it: one compiled row at a time, its settings restored afterwards.

PyTorch's own answer to activation memory is compiling: AOTAutograd's min-cut partitioner recomputes cheap pointwise
ops in backward instead of saving them, and ``torch._functorch.config.activation_memory_budget`` (1.0: the default
partition; lower: a knapsack that recomputes more to save less) trades further.  ``compare(..., compile=True,
compile_budgets=...)`` puts those rows beside ckptnorm's, and the ckptnorm strategies compiled too.

A converted model is compiled with ``COMPILE_OPTIONS`` (``torch.compile(model, options=COMPILE_OPTIONS)``, per
call: Inductor's global configuration is not touched), which turns off Inductor's layout optimization: it converts
each convolution's input to channels_last and keeps that copy for backward: beside ckptnorm's layers, which Dynamo
leaves to eager, that copy is the tensor ckptnorm did not keep, and the saving is lost (preact_resnet, 8x3x64x64, CPU:
32.5 MiB kept with it, 16.0 MiB without, the eager figure; step time within noise, README).

Rules for a compiled row:
 1. Dynamo's caches are reset before the row is built (``torch._dynamo.reset``), so that no row reuses another's
    graphs or guards, and its counters cleared, so that the row's graph breaks are its own.
 2. Configuration changes only inside ``compile_settings``, entered around every step of the row (the first step
    compiles; a later recompilation must see the same settings), and restored on exit: nothing global at import.
 3. Dynamo's warnings about functions it cannot trace are silenced inside the row: they are the graph breaks, which
    the row's note counts instead (``graph_breaks``).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import torch

COMPILE_OPTIONS = {"layout_optimization": False}

# Dynamo's messages for a call it leaves to eager (each becomes a graph break that ``graph_breaks`` reports).
_GRAPH_BREAK_WARNINGS = ".*Dynamo does not know how to trace"


def prepare() -> None:
    """Rule 1: a clean Dynamo state before a compiled row is built."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


@contextlib.contextmanager
def compile_settings(budget: float | None = None):
    """Rules 2 and 3: ``activation_memory_budget`` set to ``budget`` (None: PyTorch's default, untouched) and
    graph-break warnings silenced, both restored on exit."""
    patch = {} if budget is None else {"activation_memory_budget": float(budget)}
    with torch._functorch.config.patch(patch), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GRAPH_BREAK_WARNINGS, category=UserWarning)
        yield


def graph_breaks() -> Counter:
    """The graph breaks since ``prepare``: the first line of each reason -> how many times it broke a graph."""
    found = Counter()
    for reason, count in torch._dynamo.utils.counters.get("graph_break", {}).items():
        found[reason.strip().splitlines()[0]] += count
    return found


def describe(budget: float | None, options: dict | None = None) -> str:
    """The row note's account of the compilation: settings, graphs, graph breaks (call after the row's steps)."""
    settings = [] if budget is None else [f"activation_memory_budget={budget:g}"]
    settings += [f"{key}={value}" for key, value in (options or {}).items()]
    settings = ", ".join(settings) or "default settings"
    graphs = torch._dynamo.utils.counters.get("stats", {}).get("unique_graphs", 0)
    breaks = graph_breaks()
    text = f"torch.compile ({settings}): {graphs} graph{'s' if graphs != 1 else ''}"
    if not breaks:
        return text + ", no graph break"
    listed = "; ".join(f"{n}x {reason}" for reason, n in breaks.most_common())
    return text + f", {sum(breaks.values())} graph breaks ({listed})"
