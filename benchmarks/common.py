"""Shapes and helpers shared by the benchmarks (append-only: benchmark names and parameters must stay stable)."""
import os
import statistics
import time

import torch

from ckptnorm import STRATEGY_NAMES

STRATEGIES = list(STRATEGY_NAMES)
# (N, C, H, W) of ResNet-like layers, small enough for a 2-core CPU
LAYER_SHAPES = ["8x64x56x56", "16x256x14x14"]


def parse_shape(text):
    return tuple(int(v) for v in text.split("x"))


def layer_inputs(shape_text, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = parse_shape(shape_text)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --------------------------------------------------------------------------------------------- full suite (issue 5)
# The target shapes make a quick run slow on a small CPU: CKPTNORM_BENCH_QUICK=1 (what CI sets) swaps them
# for tiny shapes, so `asv run --python=same --quick` checks that every benchmark runs, in a few minutes.
QUICK = os.environ.get("CKPTNORM_BENCH_QUICK", "0") not in ("", "0")
TARGET_SHAPES = ["32x64x56x56", "16x256x28x28", "8x128x128x128"]  # (N, C, H, W) of the targets
QUICK_SHAPES = ["4x16x16x16"]
SHAPES = QUICK_SHAPES if QUICK else TARGET_SHAPES
DTYPES = ["float32", "float64"]
LAYOUTS = ["NCHW", "channels_last"]
NATIVE = "native"  # PyTorch's BatchNorm2d + in-place LeakyReLU(0.01): the baseline the ratios are read against
FLOOR = "floor"  # inplace_abn's kernels behind a bare autograd Function (per_call_floor): the per-call floor
VARIANTS = [NATIVE] + STRATEGIES
MODEL_INPUT = "2x3x32x32" if QUICK else "8x3x64x64"  # input of the built-in model's step benchmarks
COMPARE_INPUT = "8x3x128x128"  # `ckptnorm compare`'s default input of the built-in models
MODEL_RATIO_INPUTS = [MODEL_INPUT] if QUICK else [MODEL_INPUT, COMPARE_INPUT]
# Layers small enough that host work (Python, views, kernel dispatch, autograd), not memory traffic, sets the time.
PER_CALL_SHAPES = ["2x16x8x8"] if QUICK else ["2x16x8x8", "8x64x32x32"]
PER_CALL_TARGET = 1.25  # fwd+bwd time / native's, at the smallest shape (issue 14)
MODEL_STEP_TARGET = 1.03  # training step of the default model / standard's (issue 14)
SLOPE = 0.01  # leaky_relu slope everywhere


def memory_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def activation_inputs(shape_text, dtype="float32", layout="NCHW", seed=0):
    """x and the incoming gradient dz, same dtype and memory layout (N, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    shape = parse_shape(shape_text)
    return tuple(torch.randn(shape, generator=g, dtype=getattr(torch, dtype)).contiguous(
        memory_format=memory_format(layout)) for _ in range(2))


def make_layer(variant, channels, dtype="float32"):
    """A BN + LeakyReLU layer: ``native`` PyTorch modules, ``floor`` (``per_call_floor``: float32 training only),
    or ckptnorm's BatchNormAct2d with that strategy."""
    from ckptnorm.torch import BatchNormAct2d
    dtype = getattr(torch, dtype)
    if variant == FLOOR:
        from .per_call_floor import FloorLayer
        return FloorLayer(channels, dtype=dtype)
    if variant == NATIVE:
        return torch.nn.Sequential(torch.nn.BatchNorm2d(channels, dtype=dtype), torch.nn.LeakyReLU(SLOPE, inplace=True))
    return BatchNormAct2d(channels, activation="leaky_relu", activation_param=SLOPE, strategy=variant, dtype=dtype)


def forward_backward(layer, x, dz):
    """One training forward and backward of ``layer`` on a fresh leaf view of x."""
    layer(x.detach().requires_grad_()).backward(dz)


def warm_layer(variant, dtype, layout):
    """Compile (or load from Numba's disk cache) the kernels ``variant`` uses for this dtype and layout, on a tiny
    input: kernels are compiled per dtype/layout, not per shape, and a tiny input keeps setup out of peakmem."""
    x, dz = activation_inputs("2x3x4x4", dtype, layout)
    forward_backward(make_layer(variant, 3, dtype), x, dz)


def layer_saved_bytes(layer, x):
    """Bytes kept for backward by ``conv1x1(layer(x))``: the 1x1 conv keeps the layer's output like a real network
    would, so strategies that recompute z instead of keeping it show their saving."""
    from ckptnorm.torch import SavedTensorsCounter
    x = x.detach().requires_grad_()
    weight = torch.ones(1, x.shape[1], 1, 1, dtype=x.dtype, requires_grad=True)
    with SavedTensorsCounter(exclude=[layer, weight]) as counter:
        out = torch.nn.functional.conv2d(layer(x), weight)
    out.sum().backward()
    return counter.saved_bytes


def make_model(variant, seed=0):
    """The built-in default model (``ckptnorm.torch.models.get_model()``): as written (``original``) or converted to a
    ckptnorm strategy with ``ckptnorm.torch.convert``, as ``ckptnorm compare`` builds its rows."""
    from ckptnorm.torch.models import get_model
    from ckptnorm.torch import convert
    torch.manual_seed(seed)
    model = get_model()
    return (model if variant == "original" else convert(model, variant)).train()


def train_step(model, x):
    """The training step ``ckptnorm compare`` and ``ckptnorm plan`` measure (``ckptnorm.torch.harness``)."""
    from ckptnorm.torch.harness import training_step
    training_step(model, (x,), tool="benchmarks")


def model_input(shape_text=MODEL_INPUT, seed=0):
    return torch.randn(parse_shape(shape_text), generator=torch.Generator().manual_seed(seed))


# Minimal memory traffic of each backend primitive, in passes over the activation (design note, "Minimal memory
# traffic": one read or one write of an activation-sized array = 1).  Forward+backward of a fused layer is
# channel_stats + normalize_act + one reduce + one dx = 8 passes; a copy reads and writes once = 2.
KERNEL_PASSES = {
    "channel_stats": 1, "normalize_act": 2, "reduce_from_input": 2, "reduce_from_output": 2,
    "dx_from_input": 3, "dx_from_output": 3,
}
COPY_PASSES = 2
FORWARD_BACKWARD_PASSES = 8


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """name -> median seconds of ``calls[name]()``; one warm-up each, then every call once per repeat, in turn,
    starting at a different call each repeat, so that machine noise spreads evenly over the calls."""
    names = list(calls)
    for name in names:
        calls[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
