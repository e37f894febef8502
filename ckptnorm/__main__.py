"""Command line (also ``python -m ckptnorm``, which is ``ckptnorm compare``).

``ckptnorm compare``: training steps of a model under each strategy, side by side (default: the built-in
pre-activation ResNet; ``--model block`` is the single-block comparison).  ``ckptnorm plan --budget 0.6``: per-site
strategies that minimize step time within a memory budget.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .strategies import get_strategy, strategy_names

_BLOCK_INPUT = (16, 32, 56, 56)
_MODEL_INPUT = (8, 3, 64, 64)
# compare's built-in models train on 128x128 crops: at 64x64 their 13-15 layers are small enough that the per-call
# host work of a kernel strategy (about 0.1 ms per layer on 2 cores) is several percent of a step, which says more
# about the machine's Python than about the strategies; a step still takes a fifth of a second
_COMPARE_INPUT = (8, 3, 128, 128)


def parse_shape(text):
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected NxCxHxW (e.g. 8x3x64x64), got {text!r}")
    return dims


def _strategy(text):
    try:
        return get_strategy(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _budget(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a fraction of standard's saved bytes (e.g. 0.6) or a number of "
                                         f"bytes, got {text!r}")
    return value if value <= 1 else int(value)


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] (e.g. 0.5), got {text!r}")
    return value


_ZOO_LIBRARIES = ("torchvision", "timm", "smp")
_MODEL_FORMS = "preact_resnet, postact_resnet, torchvision:NAME, timm:NAME or smp:ARCH:ENCODER"


def _is_zoo(name):
    return name.partition(":")[0] in _ZOO_LIBRARIES


def _model_name(text):
    if text == "block":
        return text
    try:
        if ":" in text:
            if importlib.util.find_spec("torch") is None:
                return text  # main() says that PyTorch is needed
            from .torch.zoo import check_spec
            check_spec(text)
        elif text not in ("preact_resnet", "postact_resnet"):
            raise ValueError(f"ckptnorm: unknown model {text!r}; tip: use {_MODEL_FORMS} (e.g. timm:efficientnet_b0)")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        tip = "" if "tip:" in message else f"; tip: {self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message}{tip}\n")


def build_parser():
    parser = _Parser(prog="ckptnorm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    cmp = sub.add_parser("compare", help="saved bytes, peak memory, step time and gradient error of each strategy")
    cmp.add_argument("--model", type=_model_name, default="preact_resnet",
                     help="preact_resnet (default, built in), postact_resnet (built in, with residual sites), "
                          "torchvision:NAME, timm:NAME, smp:ARCH:ENCODER (random weights; need torchvision, timm, "
                          "segmentation-models-pytorch), or block (one conv -> BatchNormAct2d -> conv block)")
    cmp.add_argument("--input", type=parse_shape, default=None,
                     help="input NxCxHxW (default 8x3x128x128 for the built-in models, 8x3xSxS with the smallest "
                          "S >= 64 that a library model accepts, 16x32x56x56 for --model block)")
    cmp.add_argument("--strategies", nargs="+", type=_strategy, default=list(strategy_names()))
    cmp.add_argument("--repeats", type=_positive_int, default=None,
                     help="timed steps per row; the median is shown (default 5; 7 for --model block)")
    cmp.add_argument("--compile", action="store_true",
                     help="also torch.compile rows: the model as given (default settings) and each strategy's "
                          "converted model (with ckptnorm.torch.COMPILE_OPTIONS, which keep the saving); compile "
                          "time in a column of its own")
    cmp.add_argument("--compile-budgets", nargs="+", type=_fraction, default=[], metavar="B",
                     help="also one row per budget: the model as given compiled with torch's "
                          "activation_memory_budget=B (0 < B <= 1; e.g. 1.0 0.5 0.2)")
    cmp.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    cmp.add_argument("--plot", metavar="FILE", help="also write a PNG of memory vs time (needs matplotlib)")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar (shown when tqdm is installed)")
    cmp.add_argument("--channels", type=_positive_int, default=64, help="--model block: channels of the layer")
    cmp.add_argument("--activation", default="leaky_relu", help="--model block: activation of the layer")
    pln = sub.add_parser("plan", help="per-site strategies minimizing step time within a memory budget")
    pln.add_argument("--budget", type=_budget, required=True,
                     help="fraction of standard's saved-activation bytes (e.g. 0.6), or bytes if > 1")
    pln.add_argument("--model", type=_model_name, default="preact_resnet",
                     help="preact_resnet (default), postact_resnet, torchvision:NAME, timm:NAME or smp:ARCH:ENCODER")
    pln.add_argument("--input", type=parse_shape, default=None,
                     help="input NxCxHxW (default 8x3x64x64, or the smallest 8x3xSxS a library model accepts)")
    pln.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per site and strategy")
    pln.add_argument("--json", metavar="FILE", help="also write the plan as JSON (Plan.from_json reads it)")
    return parser


def _write(parser, path, text):
    try:
        with open(path, "w") as f:
            f.write(text + "\n")
    except OSError as exc:
        parser.exit(2, f"ckptnorm: cannot write {path!r}: {exc.strerror}\n")


def _build_model(parser, name, shape, default=_MODEL_INPUT):
    import torch
    if _is_zoo(name):
        from .torch.zoo import build_model
        try:
            model, x = build_model(name, shape, batch=_MODEL_INPUT[0])
        except ValueError as exc:
            parser.exit(2, f"{str(exc).splitlines()[0]}\n")
        return model.train(), x
    shape = shape or default
    from .torch.models import get_model
    try:
        torch.manual_seed(0)
        model = get_model(name)
        x = torch.randn(shape)
        with torch.no_grad():
            model.eval()(x)  # the input fits the model: checked before any measurement
    except ValueError as exc:
        parser.exit(2, f"{exc}\n" if str(exc).startswith("ckptnorm:") else
                    f"ckptnorm: input {'x'.join(map(str, shape))} does not fit model {name!r}: "
                    f"{str(exc).splitlines()[0]}\n")
    except RuntimeError as exc:
        parser.exit(2, f"ckptnorm: input {'x'.join(map(str, shape))} does not fit model {name!r}: "
                       f"{str(exc).splitlines()[0]}; tip: use --input 8x3x64x64\n")
    return model.train(), x


def _compare_block(parser, args):
    import torch
    from .activations import get_activation
    from .torch.compare import compare, make_block
    shape, repeats = args.input or _BLOCK_INPUT, args.repeats or 7
    try:  # argument errors as one line, before any work
        act = get_activation(args.activation)
        for name in args.strategies:
            get_strategy(name).check_activation(act)
    except ValueError as exc:
        parser.exit(2, f"{exc}\n")
    torch.manual_seed(0)
    block = make_block(shape[1], args.channels, args.activation).train()
    result = compare(block, torch.randn(shape), args.strategies, repeats=repeats, progress=not args.no_progress,
                     include_torch_checkpoint=False, compile=args.compile, compile_budgets=args.compile_budgets,
                     model_name=f"block conv1x1({shape[1]}->{args.channels}) -> "
                     f"BN({args.channels}) -> {act.describe()} -> conv1x1({args.channels}->{shape[1]})")
    return _report(parser, args, result)


def _report(parser, args, result):
    print(result.table())
    if args.json:
        _write(parser, args.json, result.to_json())
    if args.plot:
        result.plot(args.plot)
    return 0


def _check_outputs(parser, args):
    """Before measuring for a minute: the output files can be written, and --plot has matplotlib."""
    for path in (getattr(args, "json", None), getattr(args, "plot", None)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            parser.exit(2, f"ckptnorm: cannot write {path!r}: No such file or directory\n")
        if folder is not None and not os.access(folder, os.W_OK):
            parser.exit(2, f"ckptnorm: cannot write {path!r}: Permission denied\n")
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        parser.exit(2, "ckptnorm: --plot needs matplotlib, which is not installed; tip: pip install matplotlib, or "
                       "use --json\n")


def _compare(parser, args):
    _check_outputs(parser, args)
    if args.model == "block":
        return _compare_block(parser, args)
    from .torch.compare import compare
    model, x = _build_model(parser, args.model, args.input, _COMPARE_INPUT)
    result = compare(model, x, args.strategies, repeats=args.repeats or 5, progress=not args.no_progress,
                     compile=args.compile, compile_budgets=args.compile_budgets, model_name=args.model)
    return _report(parser, args, result)


def _plan(parser, args):
    _check_outputs(parser, args)
    if args.model == "block":
        parser.exit(2, f"ckptnorm: plan does not take --model block; tip: use {_MODEL_FORMS}\n")
    try:
        from .torch.planner import plan
    except ImportError:
        parser.exit(2, "ckptnorm: the planner (ckptnorm.torch.planner) is not available in this version\n")
    model, x = _build_model(parser, args.model, args.input)
    try:
        result = plan(model, x, args.budget, repeats=args.repeats)
    except ValueError as exc:
        parser.exit(2, f"{str(exc).splitlines()[0]}\n")
    print(result)
    if args.json:
        _write(parser, args.json, result.to_json())
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["compare"])
    try:
        import torch  # noqa: F401
    except ImportError:
        parser.exit(2, "ckptnorm: this command needs PyTorch; tip: pip install torch==2.13.0\n")
    if args.command == "plan":
        return _plan(parser, args)
    return _compare(parser, args)


if __name__ == "__main__":
    sys.exit(main())
