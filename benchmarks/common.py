"""Shapes and helpers shared by the benchmarks (append-only: benchmark names and parameters must stay stable)."""
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
