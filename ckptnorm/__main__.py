"""Command line: ``ckptnorm compare`` (also ``python -m ckptnorm``) -- the strategies side by side on one block."""
from __future__ import annotations

import argparse
import sys

from .strategies import STRATEGY_NAMES, get_strategy


def _shape(text):
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected NxCxHxW (e.g. 16x32x56x56), got {text!r}")
    return dims


def _strategy(text):
    try:
        return get_strategy(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser():
    parser = argparse.ArgumentParser(prog="ckptnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    cmp = sub.add_parser("compare", help="saved bytes, step time and gradient error of each strategy on one block")
    cmp.add_argument("--input", type=_shape, default=(16, 32, 56, 56), help="block input NxCxHxW (default 16x32x56x56)")
    cmp.add_argument("--channels", type=int, default=64, help="channels of the BatchNormAct layer (default 64)")
    cmp.add_argument("--activation", default="leaky_relu", help="activation of the layer (default leaky_relu)")
    cmp.add_argument("--strategies", nargs="+", type=_strategy, default=list(STRATEGY_NAMES))
    cmp.add_argument("--repeats", type=int, default=7, help="timed steps per strategy; the median is shown")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["compare"])
    try:
        import torch
    except ImportError:
        parser.exit(2, "ckptnorm: the comparison needs PyTorch; tip: pip install torch==2.13.0\n")
    from .activations import get_activation
    from .torch.compare import compare_block, format_table
    try:  # argument errors as one line, before any work
        act = get_activation(args.activation)
        for name in args.strategies:
            get_strategy(name).check_activation(act)
    except ValueError as exc:
        parser.exit(2, f"{exc}\n")
    if "standard" not in args.strategies:
        args.strategies.insert(0, "standard")  # the baseline every ratio is against
    results = compare_block(args.input, args.channels, args.strategies, args.repeats, args.activation)
    title = (f"block: conv1x1({args.input[1]}->{args.channels}) -> BatchNormAct2d({args.channels}, {args.activation})"
             f" -> conv1x1({args.channels}->{args.input[1]}), input {'x'.join(map(str, args.input))} float32, "
             f"{torch.get_num_threads()} threads, median of {args.repeats} steps; saved = bytes kept for backward, "
             "block input and parameters excluded")
    print(format_table(results, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
