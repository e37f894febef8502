"""Memory saved by ``convert`` on library models: ``python -m benchmarks.zoo_savings [--models ...] [--json FILE]``
from the repository root, in an environment with torchvision and timm (``pip install -e ".[zoo]"``; see README).

Per model (default: the issue's six, each with its strategy and target; random weights; input 4x3x128x128
float32; train mode), the original model (PyTorch's BN and activation modules) against ``convert(model, strategy,
example_inputs=x)``:

* ``sites``: decisions of ``ckptnorm_report`` with a strategy applied, of all sites;
* ``saved``: exact bytes kept for backward by one training step's forward and loss (``SavedTensorsCounter``,
  parameters, buffers and the input excluded), original and converted, and the saving ``1 - converted/original``
  against the issue's target;
* ``predicted``: ``ckptnorm_report.predicted_saved_bytes`` (what ``convert`` predicts the conversion saves, when it
  says; ``n/a`` otherwise) and its deviation from the measured saving in bytes;
* ``RSS``: growth of the process's resident set between the end of the loss and the start of backward -- what the
  step holds at its peak, seen from outside PyTorch -- in a fresh interpreter per (model, variant) with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (so that freed activation buffers go back to the OS), after two warm-up steps,
  the smallest of three steps;
* ``time ratio``: median step time (forward + loss + backward) converted / original over ``--repeats``
  interleaved (round-robin) steps, after one warm-up step each; every step is ``ckptnorm.torch.harness``'s, the one
  ``ckptnorm compare`` and ``ckptnorm plan`` measure.

This module imports neither torchvision nor timm at import time (asv imports every module of benchmarks/), and
defines no asv benchmark.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from ckptnorm.__main__ import parse_shape

# (spec, strategy, target saving of the exact saved bytes)
DEFAULT_MODELS = (
    ("torchvision:resnet50", "efficient_checkpoint", 0.15),
    ("torchvision:densenet121", "efficient_checkpoint", 0.40),
    ("torchvision:mobilenet_v2", "efficient_checkpoint", 0.30),
    ("timm:efficientnet_b0", "efficient_checkpoint", 0.25),
    ("timm:mobilenetv3_large_100", "efficient_checkpoint", 0.25),
    ("timm:tresnet_m", "inplace_abn", 0.35),
)
DEFAULT_INPUT = (4, 3, 128, 128)
MIB = 2 ** 20


def _model_arg(text):
    """``SPEC`` or ``SPEC=STRATEGY``; a default model's strategy and target when SPEC is one of them."""
    spec, _, strategy = text.partition("=")
    known = {s: (st, t) for s, st, t in DEFAULT_MODELS}
    default_strategy, target = known.get(spec, ("efficient_checkpoint", None))
    return spec, strategy or default_strategy, target


def _build(spec, shape, strategy=None):
    """(model, input, report) -- the original when ``strategy`` is None -- in train mode, seeded."""
    from ckptnorm.torch import convert
    from ckptnorm.torch.zoo import build_model
    model, x = build_model(spec, shape, seed=0)
    if strategy is None:
        return model.train(), x, None
    converted = convert(model, strategy, example_inputs=x)
    return converted.train(), x, getattr(converted, "ckptnorm_report", None)


def _saved_bytes(model, x):
    from ckptnorm.torch.harness import saved_bytes, training_step
    training_step(model, (x,))  # warm-up: kernels, allocator, gradient buffers
    return saved_bytes(model, (x,))


def _time_ratio(original, converted, x, repeats):
    from ckptnorm.torch.harness import median_times, training_step
    for m in (original, converted):
        training_step(m, (x,))  # warm-up
    medians = dict(zip(("original", "converted"), median_times([original, converted], (x,), repeats)))
    return medians["converted"] / medians["original"], medians


# -- RSS, in a fresh interpreter per (model, variant) ---------------------------------------------------------------
def _rss_child(spec, variant, shape):
    """Runs in the child: print {"held": bytes} for the original (variant "original") or the converted model."""
    from ckptnorm.torch.harness import release_free_memory, rss, training_step
    model, x, _ = _build(spec, shape, None if variant == "original" else variant)
    for _ in range(2):
        training_step(model, (x,))
    held = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        gc.collect()
        release_free_memory()
        before = rss()
        # what the step holds between the loss and backward: the graph and everything it keeps
        training_step(model, (x,), probe=lambda: held.append(rss() - before))
    print(json.dumps({"held": min(held)}))


def _rss_held(spec, variant, shape, timeout=900):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.zoo_savings", "--rss-child", spec, variant, "x".join(map(str, shape))]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ckptnorm: the RSS subprocess for {spec} ({variant}) failed: "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}; "
                           "tip: run it by hand: " + " ".join(cmd))
    return json.loads(proc.stdout.strip().splitlines()[-1])["held"]


# -- one model --------------------------------------------------------------------------------------------------
def measure(spec, strategy, target=None, shape=DEFAULT_INPUT, repeats=5, rss=True) -> dict:
    torch.manual_seed(0)
    original, x, _ = _build(spec, shape)
    converted, _, report = _build(spec, shape, strategy)
    applied = sum(d.applied is not None for d in report) if report is not None else None
    sites = len(report) if report is not None else None
    saved_orig = _saved_bytes(original, x)
    saved_conv = _saved_bytes(converted, x)
    saving_bytes = saved_orig - saved_conv
    predicted = getattr(report, "predicted_saved_bytes", None)
    deviation = None
    if isinstance(predicted, int) and saving_bytes:
        deviation = (predicted - saving_bytes) / saving_bytes
    ratio, medians = _time_ratio(original, converted, x, repeats)
    del original, converted
    gc.collect()
    held = {"original": None, "converted": None}
    if rss:
        held = {"original": _rss_held(spec, "original", shape), "converted": _rss_held(spec, strategy, shape)}
    saving = saving_bytes / saved_orig if saved_orig else 0.0
    rss_saving = (1 - held["converted"] / held["original"]) if rss and held["original"] else None
    return {"model": spec, "strategy": strategy, "input": "x".join(map(str, shape)), "sites_applied": applied,
            "sites": sites, "saved_bytes_original": saved_orig, "saved_bytes_converted": saved_conv,
            "saving": saving, "target": target, "target_met": None if target is None else saving >= target,
            "predicted_saved_bytes": predicted, "measured_saved_bytes": saving_bytes,
            "prediction_deviation": deviation, "rss_held_original": held["original"],
            "rss_held_converted": held["converted"], "rss_saving": rss_saving, "time_ratio": ratio,
            "step_seconds_original": medians["original"], "step_seconds_converted": medians["converted"]}


def _mib(v):
    return "n/a" if v is None else f"{v / MIB:.1f}"


def _pct(v):
    return "n/a" if v is None else f"{-100 * v:+.1f}%"


def table(results) -> str:
    head = ("model", "strategy", "sites", "saved MiB orig", "saved MiB conv", "saving", "target", "predicted MiB",
            "pred. deviation", "RSS MiB orig", "RSS MiB conv", "RSS saving", "time ratio")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        sites = "n/a" if r["sites"] is None else f"{r['sites_applied']}/{r['sites']}"
        target = "-" if r["target"] is None else (f"{-100 * r['target']:.0f}% "
                                                  f"{'met' if r['target_met'] else 'NOT met'}")
        dev = "n/a" if r["prediction_deviation"] is None else f"{100 * r['prediction_deviation']:+.1f}%"
        lines.append("| " + " | ".join((
            r["model"], r["strategy"], sites, _mib(r["saved_bytes_original"]), _mib(r["saved_bytes_converted"]),
            _pct(r["saving"]), target, _mib(r["predicted_saved_bytes"]), dev, _mib(r["rss_held_original"]),
            _mib(r["rss_held_converted"]), _pct(r["rss_saving"]), f"{r['time_ratio']:.2f}x")) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rss-child"]:
        _rss_child(argv[1], argv[2], parse_shape(argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo_savings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=_model_arg, default=None, metavar="SPEC[=STRATEGY]",
                        help="models as torchvision:NAME, timm:NAME or smp:ARCH:ENCODER, optionally =STRATEGY "
                             "(default: the issue's six with their strategies)")
    parser.add_argument("--input", type=parse_shape, default=DEFAULT_INPUT,
                        help="input NxCxHxW (default 4x3x128x128)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed steps per variant (median)")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocesses (faster)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    models = args.models or list(DEFAULT_MODELS)
    print(f"input {'x'.join(map(str, args.input))} float32, train mode, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats} interleaved steps", flush=True)
    results = []
    for spec, strategy, target in models:
        start = time.perf_counter()
        results.append(measure(spec, strategy, target, args.input, args.repeats, rss=not args.no_rss))
        print(f"  {spec} ({strategy}): {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    print("saved = bytes kept for backward by forward + loss (exact; parameters, buffers and input excluded); "
          "saving and targets vs the original model; predicted = ckptnorm_report.predicted_saved_bytes, deviation "
          "vs the measured saving in bytes; RSS = resident-set growth from before the forward to the end of the "
          "loss, fresh process per variant; time ratio = converted / original, median step time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"input": "x".join(map(str, args.input)), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
