"""Side-by-side report without asv: ``python -m benchmarks.report [--shapes ...] [--repeats N] [--threads T]
[--json FILE]`` from the repository root.

For each shape and layout, one BN + LeakyReLU(0.01) layer: PyTorch's native BatchNorm2d + in-place LeakyReLU vs
every ckptnorm strategy, forward+backward median time, speed-up (native time / strategy time) and effective
bandwidth as a fraction of a plain tensor copy (``dst.copy_(src)``, same size) measured in the same run.  Then the
per-call cost: the same on small layers, where host work (Python, views, kernel dispatch, autograd) sets the time,
as a ratio to native.  Then each CPU kernel alone (``bench_kernels``) as a fraction of the copy's bandwidth, with
its own minimal traffic (``KERNEL_PASSES``).  Then whole training steps of the built-in default model under each
strategy vs ``standard``, and the first call of a fresh process (Numba's disk cache warm).  The issues' targets are
shown as met / not met.

Byte model (design note, "Minimal memory traffic"; N elements of itemsize b): forward+backward of one layer has to
move at least 8 N b -- forward: statistics read x (1 pass), normalize+activation reads x and writes z (2);
backward: the reduction reads two tensors (2), the dx pass reads two and writes dx (3).  Effective bandwidth is
8 N b / time for every variant: extra passes (checkpoint's recomputed statistics, the native path's temporaries)
count against it.  The copy moves 2 N b, so the fraction of copy bandwidth is 4 x copy time / variant time.

Timing: every variant (and the copy) is warmed up once, then each repeat runs every variant once in turn, starting
at a different variant each repeat, so that machine noise spreads evenly over the variants; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numba
import torch

import ckptnorm

from .common import (COMPARE_INPUT, COPY_PASSES, FLOOR, FORWARD_BACKWARD_PASSES, KERNEL_PASSES, LAYOUTS,
                     MODEL_STEP_TARGET, NATIVE, PER_CALL_SHAPES, PER_CALL_TARGET, SLOPE, STRATEGIES, TARGET_SHAPES,
                     activation_inputs, forward_backward, interleaved_medians, make_layer, make_model, model_input,
                     parse_shape, train_step)

SPEEDUP_TARGETS = {"checkpoint": 2.0, "efficient_checkpoint": 3.0, "inplace_abn": 3.0}  # x native, every shape
BANDWIDTH_TARGET = 0.60  # fraction of copy bandwidth, for the strategies that run ckptnorm's kernels
KERNEL_STRATEGIES = ("checkpoint", "efficient_checkpoint", "inplace_abn")  # standard runs PyTorch's native ops
FIRST_CALL_TARGET_SECONDS = 2.0
DEFAULT_MODEL_INPUT = COMPARE_INPUT  # `ckptnorm compare`'s default

# Run in a fresh interpreter: the first forward+backward of every kernel strategy in every layout, timed together
# (an upper bound on any single first call).  Imports of torch and ckptnorm are not timed; loading Numba is.
_FIRST_CALL_SCRIPT = """
import sys, time, torch
from ckptnorm.torch import BatchNormAct2d
dtype, layouts, strategies = getattr(torch, sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
start = time.perf_counter()
for layout in layouts:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for strategy in strategies:
        x = torch.randn(2, 3, 4, 4, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        out = BatchNormAct2d(3, strategy=strategy, dtype=dtype)(x)
        out.backward(torch.ones_like(out))
print(time.perf_counter() - start)
"""


def measure_layer(shape, dtype, layout, strategies, repeats) -> dict:
    """Forward+backward medians of native and each strategy, and of a same-size copy, for one shape and layout."""
    x, dz = activation_inputs(shape, dtype, layout)
    channels = parse_shape(shape)[1]
    calls = {}
    for variant in [NATIVE] + list(strategies):
        layer = make_layer(variant, channels, dtype)
        calls[variant] = lambda layer=layer: forward_backward(layer, x, dz)
    copy_dst = torch.empty_like(x)
    calls["copy"] = lambda: copy_dst.copy_(x)
    seconds = interleaved_medians(calls, repeats)
    copy_seconds = seconds.pop("copy")
    native = seconds[NATIVE]
    nbytes = x.numel() * x.element_size()
    rows = [{"variant": v, "seconds": s, "speedup": native / s,
             "bandwidth_fraction": (FORWARD_BACKWARD_PASSES / s) / (COPY_PASSES / copy_seconds)}
            for v, s in seconds.items()]
    return {"shape": shape, "dtype": dtype, "layout": layout, "elements": x.numel(), "bytes": nbytes,
            "copy_seconds": copy_seconds, "copy_gb_per_s": COPY_PASSES * nbytes / copy_seconds / 1e9, "rows": rows}


def measure_kernels(shape, dtype, layout, repeats) -> dict:
    """Each CPU kernel's effective bandwidth (its minimal passes x bytes / median time) as a fraction of the copy's,
    all timed in turn in one run."""
    from .bench_kernels import kernel_calls
    memory_order = "ncs" if layout == "NCHW" else "nsc"
    seconds = interleaved_medians(kernel_calls(shape, dtype, memory_order), repeats)
    copy_seconds = seconds.pop("copy")
    fractions = {name: (KERNEL_PASSES[name] / s) / (COPY_PASSES / copy_seconds) for name, s in seconds.items()}
    return {"shape": shape, "dtype": dtype, "layout": layout, "fractions": fractions}


def measure_model(input_shape, strategies, repeats) -> dict:
    """Training-step medians of the default model converted to each strategy, as ratios to ``standard``."""
    x = model_input(input_shape)
    names = ["standard"] + [s for s in strategies if s != "standard"]
    models = {name: make_model(name) for name in names}
    seconds = interleaved_medians({name: (lambda m=m: train_step(m, x)) for name, m in models.items()}, repeats)
    rows = [{"strategy": n, "seconds": s, "ratio": s / seconds["standard"]} for n, s in seconds.items()]
    return {"model": "preact_resnet (get_model())", "input": input_shape, "rows": rows}


def measure_first_call(dtype, layouts) -> float | None:
    """Seconds of the first forward+backward calls in a new process (this process filled Numba's disk cache)."""
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL_SCRIPT, dtype, ",".join(layouts),
                           ",".join(KERNEL_STRATEGIES)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"first-call measurement failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(done.stdout.split()[-1])


def evaluate_targets(layers, model, first_call, per_call=()) -> list:
    """[(target text, met, worst value text)] for the issues' targets, over everything measured."""
    targets = []
    if per_call:
        smallest = min(per_call, key=lambda m: m["elements"])
        for r in smallest["rows"]:
            if r["variant"] in KERNEL_STRATEGIES:
                ratio = 1.0 / r["speedup"]
                targets.append((f"per call: {r['variant']} fwd+bwd <= {PER_CALL_TARGET:g}x native at "
                                f"{smallest['shape']}", ratio <= PER_CALL_TARGET, f"{ratio:.2f}x"))
    for strategy, wanted in SPEEDUP_TARGETS.items():
        got = [r["speedup"] for m in layers for r in m["rows"] if r["variant"] == strategy]
        if got:
            targets.append((f"{strategy} fwd+bwd >= {wanted:g}x native, every shape and layout", min(got) >= wanted,
                            f"min {min(got):.2f}x"))
    for strategy in KERNEL_STRATEGIES:
        got = [r["bandwidth_fraction"] for m in layers for r in m["rows"] if r["variant"] == strategy]
        if got:
            targets.append((f"{strategy} bandwidth >= {BANDWIDTH_TARGET:.0%} of copy, every shape and layout",
                            min(got) >= BANDWIDTH_TARGET, f"min {min(got):.0%}"))
    if model is not None:
        for r in model["rows"][1:]:
            targets.append((f"model train step, {r['strategy']} <= {MODEL_STEP_TARGET:g}x standard's",
                            r["ratio"] <= MODEL_STEP_TARGET, f"{r['ratio']:.3f}x"))
    if first_call is not None:
        targets.append((f"first calls of a new process (JIT cache warm) < {FIRST_CALL_TARGET_SECONDS:g} s",
                        first_call < FIRST_CALL_TARGET_SECONDS, f"{first_call:.2f} s"))
    return targets


def _met(ok):
    return "met" if ok else "NOT met"


def format_report(result) -> str:
    meta = result["meta"]
    lines = [f"ckptnorm {meta['ckptnorm']}, torch {meta['torch']}, numba {meta['numba']}: {meta['dtype']}, "
             f"leaky_relu({SLOPE}), {meta['threads']} threads, median of {meta['repeats']} repeats taken in turn",
             f"speed-up = native fwd+bwd time / variant's; bandwidth = {FORWARD_BACKWARD_PASSES} passes x bytes / "
             f"time, as a fraction of dst.copy_(src) ({COPY_PASSES} passes) in the same run"]
    for m in result["layers"]:
        lines += ["", f"{m['shape']} {m['layout']} ({m['elements'] / 1e6:.3g} M elements, "
                      f"{m['bytes'] / 2**20:.1f} MiB; copy {m['copy_seconds'] * 1e3:.2f} ms = "
                      f"{m['copy_gb_per_s']:.1f} GB/s)",
                  f"  {'variant':22s} {'fwd+bwd ms':>10s} {'speed-up':>9s} {'GB/s':>7s} {'of copy':>8s}  targets"]
        for r in m["rows"]:
            marks = []
            if r["variant"] in SPEEDUP_TARGETS:
                wanted = SPEEDUP_TARGETS[r["variant"]]
                marks.append(f">={wanted:g}x {_met(r['speedup'] >= wanted)}")
            if r["variant"] in KERNEL_STRATEGIES:
                marks.append(f">={BANDWIDTH_TARGET:.0%} {_met(r['bandwidth_fraction'] >= BANDWIDTH_TARGET)}")
            gb_per_s = FORWARD_BACKWARD_PASSES * m["bytes"] / r["seconds"] / 1e9
            lines.append(f"  {r['variant']:22s} {r['seconds'] * 1e3:10.2f} {r['speedup']:8.2f}x {gb_per_s:7.1f} "
                         f"{r['bandwidth_fraction']:8.0%}  {', '.join(marks)}".rstrip())
    if result["per_call"]:
        lines += ["", f"per-call cost: small layers, {result['per_call'][0]['layout']}, median of "
                      f"{meta['per_call_repeats']} repeats taken in turn; time / native's; {FLOOR} (float32 only): "
                      "inplace_abn's kernels behind a bare autograd Function (benchmarks/per_call_floor.py), the least "
                      "host work this design can do"]
        for m in result["per_call"]:
            cells = [f"{r['variant']} {r['seconds'] * 1e6:.0f} us"
                     + ("" if r["variant"] == NATIVE else f" ({1 / r['speedup']:.2f}x)") for r in m["rows"]]
            lines.append(f"  {m['shape']:12s} " + "  ".join(cells))
    if result["kernels"]:
        lines += ["", "each CPU kernel alone: effective bandwidth (its minimal passes x bytes / time) as a fraction of "
                      "the copy's, same run"]
        for m in result["kernels"]:
            lines.append(f"  {m['shape']:14s} {m['layout']:13s} " + "  ".join(
                f"{name} {fraction:.0%}" for name, fraction in m["fractions"].items()))
    if result["model"] is not None:
        model = result["model"]
        lines += ["", f"whole training step: {model['model']}, input {model['input']} float32",
                  f"  {'strategy':22s} {'step ms':>10s} {'vs standard':>12s}"]
        lines += [f"  {r['strategy']:22s} {r['seconds'] * 1e3:10.2f} {r['ratio']:11.3f}x" for r in model["rows"]]
    if result["first_call_seconds"] is not None:
        lines += ["", f"first forward+backward of {', '.join(KERNEL_STRATEGIES)} in each layout, new process, "
                      f"Numba cache warm: {result['first_call_seconds']:.2f} s in all"]
    lines += ["", "targets (issue 5: large layers, first call; issue 14: per call, model step):"]
    lines += [f"  [{_met(met):7s}] {text}: {worst}" for text, met, worst in result["targets"]]
    return "\n".join(lines)


def _shape(text):
    try:
        if len(parse_shape(text)) == 4:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NxCxHxW (e.g. 32x64x56x56), got {text!r}")


def _positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=_shape, default=TARGET_SHAPES, help="layer shapes NxCxHxW "
                        f"(default: the issue's {' '.join(TARGET_SHAPES)})")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=LAYOUTS)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=_positive_int, default=7, help="timed runs per variant (default 7)")
    parser.add_argument("--threads", type=_positive_int, default=2, help="PyTorch and Numba threads (default 2, as "
                        "in the issue's targets)")
    parser.add_argument("--model-input", type=_shape, default=DEFAULT_MODEL_INPUT,
                        help=f"input of the whole-model steps (default {DEFAULT_MODEL_INPUT})")
    parser.add_argument("--per-call-shapes", nargs="+", type=_shape, default=PER_CALL_SHAPES,
                        help=f"small layer shapes for the per-call cost (default {' '.join(PER_CALL_SHAPES)})")
    parser.add_argument("--per-call-repeats", type=_positive_int, default=300,
                        help="timed runs per variant on the small layers (default 300)")
    parser.add_argument("--skip-per-call", action="store_true", help="no per-call cost on small layers")
    parser.add_argument("--skip-kernels", action="store_true", help="no per-kernel bandwidth")
    parser.add_argument("--skip-model", action="store_true", help="no whole-model training steps")
    parser.add_argument("--skip-first-call", action="store_true", help="no new-process first-call measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the measurements and targets as JSON")
    args = parser.parse_args(argv)

    previous_threads = torch.get_num_threads(), numba.get_num_threads()  # restored: main() may run in-process
    torch.set_num_threads(args.threads)
    numba_threads = min(args.threads, numba.config.NUMBA_NUM_THREADS)  # Numba cannot start more than at import
    numba.set_num_threads(numba_threads)
    try:
        layers = [measure_layer(shape, args.dtype, layout, STRATEGIES, args.repeats)
                  for shape in args.shapes for layout in args.layouts]
        per_call = [] if args.skip_per_call else [
            measure_layer(shape, args.dtype, "NCHW", STRATEGIES + ([FLOOR] if args.dtype == "float32" else []),
                          args.per_call_repeats)
            for shape in args.per_call_shapes]
        kernels = [] if args.skip_kernels else [measure_kernels(shape, args.dtype, layout, args.repeats)
                                                for shape in args.shapes for layout in args.layouts]
        model = None if args.skip_model else measure_model(args.model_input, STRATEGIES, args.repeats)
        first_call = None if args.skip_first_call else measure_first_call(args.dtype, args.layouts)
    finally:
        torch.set_num_threads(previous_threads[0])
        numba.set_num_threads(previous_threads[1])
    threads = str(args.threads) if numba_threads == args.threads else f"{args.threads} (Numba {numba_threads})"
    result = {"meta": {"ckptnorm": ckptnorm.__version__, "torch": torch.__version__, "numba": numba.__version__,
                       "dtype": args.dtype, "threads": threads, "repeats": args.repeats,
                       "per_call_repeats": args.per_call_repeats},
              "layers": layers, "per_call": per_call, "kernels": kernels, "model": model,
              "first_call_seconds": first_call,
              "targets": evaluate_targets(layers, model, first_call, per_call)}
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "targets": [{"target": t, "met": met, "value": v} for t, met, v in result["targets"]]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
