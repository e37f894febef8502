"""The GPU check: ``python -m benchmarks.gpu_check`` verifies the CUDA path on a lent GPU in one run.

Made for a machine lent for minutes that can install nothing: run it from the working tree, ``PYTHONPATH=.
python -m benchmarks.gpu_check`` (``ckptnorm._cuda`` is found in ``src_cuda/`` without an install), with whatever
torch the package imports with.  Each section runs on its own: one that crashes is recorded with its error and the
next one runs, so a short loan always brings back what worked.  One table is printed; ``--json FILE`` writes it all.

Sections
  tests        the CUDA kernel and adapter test files under pytest, on the device: passed / failed / skipped
  equivalence  every strategy x {leaky_relu, relu, silu} x {NCHW, channels_last} x {float32, bfloat16} x
               {train, eval} x residual {off, on} (inplace_abn: invertible activations only) against PyTorch's
               native BN + activation (cuDNN on a GPU): output, gradients of x, weight, bias and residual, running
               statistics, each against a float64 truth from the same rounded inputs, within
               ``ckptnorm.torch.equivalence.error_bound`` of PyTorch's own error (the CPU tests' bound)
  layer_time   one BN + LeakyReLU layer's forward+backward, float32 NCHW, each strategy against PyTorch's native
               BatchNorm2d + in-place LeakyReLU (cuDNN) at the issue's shapes and a small one: device time (CUDA
               events) and wall time with the device synchronized, medians of interleaved repeats; where the wall
               time exceeds the device time, the host (Python, autograd, launches) is what a call waits for
  host_time    the host side of the CUDA path per layer (issue 14's target: <= 60 us forward+backward): each kernel
               strategy's forward+backward on a small layer with every kernel launch stubbed out (counted, not
               run), wall-clock medians of interleaved repeats, beside the launches per call
  bandwidth    each CUDA kernel's effective bandwidth (the bytes it must move / its device time) as a fraction of a
               device-to-device copy of the same tensor, both layouts, ResNet-50 layer shapes at batch 64
  memory       ``ckptnorm.torch.compare`` of the built-in models and torchvision's resnet18 (when installed): per
               strategy the bytes kept for backward and the peak of ``torch.cuda.max_memory_allocated`` during a
               training step, against ``standard``, with the step time and the gradient's error beside them
  cuda_graph   per strategy, one training step of the built-in ResNet captured in a CUDA graph (``torch.cuda.graph``)
               and replayed: the replay's gradient against the eager one, or the exact reason the capture failed
               (last: a failed capture may leave the device unusable for what follows); GPU only

Modes
  (default)    a CUDA GPU; without one it says so and exits 0 with no figures
  --quick      the test files' quick tier, smaller layers and fewer repeats: for a short loan
  --simulate   no GPU: CPU tensors through the CUDA kernels under Numba's CUDA simulator, tiny layers, the quick
               tier of the test files (what CI runs, so that the check cannot rot)
Exit status: 0 when every check passed, 1 when one failed or a section crashed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_FILES = ["tests/test_cuda_kernels.py", "tests/test_cuda_adapter.py"]
TESTS_TIMEOUT_S = {"full": 300, "quick": 120, "simulate": 300}
# (N, C, H, W): several reduction blocks per channel and a partial last block on a GPU; the simulator runs every
# CUDA thread as a Python thread, so it gets a layer of a few warps
LAYER_SHAPES = {"full": (16, 64, 28, 28), "quick": (4, 32, 14, 14), "simulate": (2, 3, 4, 5)}
STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]
ACTIVATIONS = [("leaky_relu", 0.01), ("relu", None), ("silu", None)]
LAYOUTS = ["nchw", "channels_last"]
DTYPES = ["float32", "bfloat16"]
MOMENTUM, EPS = 0.1, 1e-5
INDENT = " " * 14  # a section's table, under its one-line head


def _device(mode):
    return "cpu" if mode == "simulate" else "cuda"


def _cuda_kernels(mode):
    """Under --simulate, CPU tensors through the CUDA kernels (Numba's simulator); CUDA tensors take them anyway."""
    from ckptnorm.torch import use_backend
    return use_backend("cuda") if mode == "simulate" else contextlib.nullcontext()


# -- section: the CUDA test files under pytest -----------------------------------------------------------------------
def run_tests(mode):
    """pytest on TEST_FILES in a subprocess (the device is the GPU, or the simulator with --simulate)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *TEST_FILES]
        if mode != "full":
            command += ["-m", "not slow"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TESTS_TIMEOUT_S[mode])
        if not os.path.exists(report):
            raise RuntimeError(f"pytest wrote no report (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = counts["failures"] + counts["errors"]
    shown = [arg for arg in command[1:] if not arg.startswith("--junitxml")]
    return {"command": "python " + shlex.join(shown), "exit": done.returncode, "passed": counts["tests"] - failed -
            counts["skipped"], "failed": failed, "skipped": counts["skipped"], "ok": done.returncode == 0,
            "tail": done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []}


# -- section: every strategy against PyTorch's native BN + activation -----------------------------------------------
def _native_act(y, name, param):
    import torch.nn.functional as F
    return {"leaky_relu": lambda: F.leaky_relu(y, param), "relu": lambda: F.relu(y), "silu": lambda: F.silu(y)}[name]()


ACTIVATION_SIZED = ("x", "dz", "residual")


def _case_data(shape, seed, dtype):
    """The data of one case as float64 CPU tensors holding values exact in the run's formats: x, dz and residual
    rounded to ``dtype``, weight, bias and running statistics to float32, so that the float64 truth computed from
    them sees the very inputs the ``dtype`` runs see."""
    import torch
    g = torch.Generator().manual_seed(seed)
    channels = shape[1]
    data = dict(x=torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3,
                dz=torch.randn(shape, generator=g, dtype=torch.float64),
                residual=torch.randn(shape, generator=g, dtype=torch.float64),
                weight=torch.rand(channels, generator=g, dtype=torch.float64) + 0.5,
                bias=torch.rand(channels, generator=g, dtype=torch.float64) - 0.5,
                running_mean=torch.randn(channels, generator=g, dtype=torch.float64) * 0.2,
                running_var=torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
    return {name: t.to(dtype if name in ACTIVATION_SIZED else torch.float32).double() for name, t in data.items()}


def _step(data, dtype, device, layout, training, residual, layer):
    """One forward + backward of ``layer(x, running_mean, running_var, weight, bias, residual)`` on copies of
    ``data`` cast to ``dtype`` (x, dz, residual; parameters and statistics in float32 below float64) and moved to
    ``device`` in ``layout``.  Returns the results by name, as float64 CPU tensors."""
    import torch
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def activation(name):  # a copy of its own (``to`` may return data's tensor itself)
        return data[name].to(dtype).to(device, copy=True).contiguous(memory_format=fmt).requires_grad_()

    x = activation("x")
    r = activation("residual") if residual else None
    w, b = (data[n].to(device, param_dtype, copy=True).requires_grad_() for n in ("weight", "bias"))
    rm, rv = (data[n].to(device, param_dtype, copy=True) for n in ("running_mean", "running_var"))
    z = layer(x, rm, rv, w, b, r)
    z.backward(data["dz"].to(dtype).to(device).contiguous(memory_format=fmt))
    out = {"z": z, "dx": x.grad, "dweight": w.grad, "dbias": b.grad}
    if residual:
        out["dresidual"] = r.grad
    if training:
        out.update(running_mean=rm, running_var=rv)
    return {name: t.detach().to("cpu", torch.float64) for name, t in out.items()}


def check_case(strategy, act, param, layout, dtype_name, training, residual, shape, device, seed):
    """One case: ckptnorm and PyTorch's native op at ``dtype``, each against the float64 truth."""
    import torch
    import torch.nn.functional as F

    from ckptnorm.torch import batch_norm_act
    from ckptnorm.torch.equivalence import error_bound, max_relative_error
    dtype = getattr(torch, dtype_name)

    def native(x, rm, rv, w, b, r):
        y = F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
        return _native_act(y if r is None else y + r, act, param)

    def ours(x, rm, rv, w, b, r):
        return batch_norm_act(x, rm, rv, w, b, training, MOMENTUM, EPS, act, param, strategy, residual=r)

    data = _case_data(shape, seed, dtype)
    truth = _step(data, torch.float64, "cpu", "nchw", training, residual, native)
    theirs = _step(data, dtype, device, layout, training, residual, native)
    mine = _step(data, dtype, device, layout, training, residual, ours)
    results = {}
    for name, t in truth.items():
        err, native_err = max_relative_error(mine[name], t), max_relative_error(theirs[name], t)
        results[name] = {"error": err, "native_error": native_err, "bound": error_bound(native_err, dtype)}
    return results


def cases():
    from ckptnorm import get_activation, get_strategy
    for strategy, (act, param), layout, dtype, training, residual in itertools.product(
            STRATEGIES, ACTIVATIONS, LAYOUTS, DTYPES, (True, False), (False, True)):
        if get_strategy(strategy).requires_invertible and not get_activation(act, param).invertible:
            continue
        yield dict(strategy=strategy, act=act, param=param, layout=layout, dtype_name=dtype, training=training,
                   residual=residual)


def run_equivalence(mode):
    import warnings

    from ckptnorm import PrecisionFallbackWarning
    rows = []
    for seed, case in enumerate(cases()):
        with warnings.catch_warnings():
            # inplace_abn's precision rule may keep x for a case: a documented, correct path, not a failure
            warnings.simplefilter("ignore", PrecisionFallbackWarning)
            with _cuda_kernels(mode):
                results = check_case(**case, shape=LAYER_SHAPES[mode], device=_device(mode), seed=seed)
        worst = max(results, key=lambda n: results[n]["error"] / results[n]["bound"])
        rows.append(dict(case, ok=all(r["error"] <= r["bound"] for r in results.values()), worst=worst,
                         worst_ratio=results[worst]["error"] / results[worst]["bound"], results=results))
    failed = [r for r in rows if not r["ok"]]
    return {"shape": list(LAYER_SHAPES[mode]), "cases": len(rows), "passed": len(rows) - len(failed),
            "failed": len(failed), "ok": not failed, "rows": rows}


# -- section: one layer's time against PyTorch's native BN + activation ---------------------------------------------
TIME_SHAPES = {"full": ["32x64x56x56", "16x256x28x28", "8x128x128x128", "2x16x8x8"],
               "quick": ["16x256x28x28", "2x16x8x8"], "simulate": ["2x3x4x5"]}
TIME_REPEATS = {"full": 25, "quick": 10, "simulate": 1}


def _device_and_wall_seconds(call, device):
    """(device seconds, wall seconds) of one ``call()``: CUDA events around it, and the wall clock from a synchronized
    device to a synchronized device.  Without a GPU (the simulator) both are the wall clock."""
    import torch
    if device != "cuda":
        started = time.perf_counter()
        call()
        wall = time.perf_counter() - started
        return wall, wall
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return start.elapsed_time(end) / 1e3, wall


def _interleaved_medians(calls, repeats, device):
    """name -> (median device seconds, median wall seconds) of ``calls[name]()``: one warm-up call each (kernels
    compiled, allocator primed), then every call once per repeat in a rotating order, so that drifts of a shared
    machine cancel in the ratios."""
    import statistics
    names = list(calls)
    for call in calls.values():
        call()
    times = {name: ([], []) for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for series, seconds in zip(times[name], _device_and_wall_seconds(calls[name], device)):
                series.append(seconds)
    return {name: (statistics.median(d), statistics.median(w)) for name, (d, w) in times.items()}


def run_layer_time(mode):
    from .common import NATIVE, STRATEGIES as ALL_STRATEGIES, activation_inputs, forward_backward, make_layer
    device = _device(mode)
    rows = []
    for shape in TIME_SHAPES[mode]:
        x, dz = (t.to(device) for t in activation_inputs(shape))
        layers = {v: make_layer(v, x.shape[1]).to(device) for v in [NATIVE] + ALL_STRATEGIES}
        with _cuda_kernels(mode):
            seconds = _interleaved_medians({v: (lambda layer=layer: forward_backward(layer, x, dz))
                                            for v, layer in layers.items()}, TIME_REPEATS[mode], device)
        for v, (device_s, wall_s) in seconds.items():
            rows.append({"shape": shape, "variant": v, "device_ms": 1e3 * device_s, "wall_ms": 1e3 * wall_s,
                         "vs_native": device_s / seconds[NATIVE][0]})
    return {"repeats": TIME_REPEATS[mode], "simulated": mode == "simulate", "ok": True, "rows": rows}


# -- section: the host side of the CUDA path ---------------------------------------------------------------------
HOST_SHAPE = {"full": "2x16x8x8", "quick": "2x16x8x8", "simulate": "2x3x4x5"}
HOST_REPEATS = {"full": 200, "quick": 100, "simulate": 2}
HOST_TARGET_US = 60.0  # forward+backward of one layer, everything but the kernels (issue 14)


def run_host_time(mode):
    """Everything a layer's call does on the host -- Python, autograd, array views, the backend's allocations and
    its per-channel host copies -- with ``CUDABackend._launch`` replaced by a counter: no kernel runs, so the wall
    time is the host's (the outputs are garbage and are not looked at)."""
    from ckptnorm._cuda.backend import CUDABackend

    from .common import STRATEGIES as ALL_STRATEGIES, activation_inputs, forward_backward, make_layer
    device = _device(mode)
    x, dz = (t.to(device) for t in activation_inputs(HOST_SHAPE[mode]))
    variants = [s for s in ALL_STRATEGIES if s != "standard"]  # standard runs PyTorch's own kernels
    layers = {v: make_layer(v, x.shape[1]).to(device) for v in variants}
    launches = {"count": 0}

    def counted_launch(self, kernel, launch, *args):
        launches["count"] += 1

    real_launch = CUDABackend._launch
    CUDABackend._launch = counted_launch
    try:
        with _cuda_kernels(mode):
            per_call = {}
            for v, layer in layers.items():
                forward_backward(layer, x, dz)  # first call: compiles nothing (no launch), fills caches
                launches["count"] = 0
                forward_backward(layer, x, dz)
                per_call[v] = launches["count"]
            seconds = _interleaved_medians({v: (lambda layer=layer: forward_backward(layer, x, dz))
                                            for v, layer in layers.items()}, HOST_REPEATS[mode], device)
    finally:
        CUDABackend._launch = real_launch
    rows = [{"variant": v, "launches": per_call[v], "host_us": 1e6 * seconds[v][1],
             "target": f"<= {HOST_TARGET_US:g} us " + ("met" if 1e6 * seconds[v][1] <= HOST_TARGET_US else "NOT met")}
            for v in variants]
    return {"shape": HOST_SHAPE[mode], "repeats": HOST_REPEATS[mode], "simulated": mode == "simulate", "ok": True,
            "rows": rows}


# -- section: each kernel's bandwidth against a copy ------------------------------------------------------------------
BANDWIDTH_SHAPES = {"full": ["64x256x56x56", "64x1024x14x14"], "quick": ["32x256x28x28"], "simulate": ["2x3x4x5"]}
BANDWIDTH_REPEATS = {"full": 20, "quick": 10, "simulate": 1}


def run_bandwidth(mode):
    import torch

    from .bench_cuda import KERNELS, kernel_calls
    from .common import parse_shape
    device = _device(mode)
    rows = []
    with _cuda_kernels(mode):
        for shape, layout in itertools.product(BANDWIDTH_SHAPES[mode], ("ncs", "nsc")):
            fmt = torch.channels_last if layout == "nsc" else torch.contiguous_format
            x = torch.randn(parse_shape(shape), device=device).contiguous(memory_format=fmt)
            copy_to = torch.empty_like(x)
            calls = dict(kernel_calls(x, layout), copy=lambda: copy_to.copy_(x))
            seconds = _interleaved_medians(calls, BANDWIDTH_REPEATS[mode], device)
            nbytes = x.numel() * x.element_size()
            copy_rate = 2 * nbytes / seconds.pop("copy")[0]
            for kernel, (device_s, _) in seconds.items():
                rate = KERNELS[kernel] * nbytes / device_s
                rows.append({"shape": shape, "layout": layout, "kernel": kernel, "gb_per_s": rate / 1e9,
                             "copy_gb_per_s": copy_rate / 1e9, "fraction_of_copy": rate / copy_rate})
            del x, copy_to, calls
    return {"repeats": BANDWIDTH_REPEATS[mode], "simulated": mode == "simulate", "ok": True, "rows": rows}


# -- section: memory of training steps, per strategy ----------------------------------------------------------------
MEMORY_MODELS = {  # model name -> input (N x C x H x W) per mode
    "preact_resnet": {"full": "32x3x64x64", "quick": "8x3x64x64", "simulate": "2x3x8x8"},
    "postact_resnet": {"full": "32x3x64x64", "quick": "8x3x64x64", "simulate": "2x3x8x8"},
    "torchvision:resnet18": {"full": "32x3x224x224", "quick": "8x3x224x224", "simulate": "2x3x32x32"},
}
MEMORY_REPEATS = {"full": 5, "quick": 3, "simulate": 1}


def _installed(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run_memory(mode):
    import dataclasses

    import torch

    from ckptnorm.torch.compare import compare
    from ckptnorm.torch.models import get_model

    from .common import model_input
    device = _device(mode)
    models, skipped = [], {}
    for name, inputs in MEMORY_MODELS.items():
        if name.startswith("torchvision:") and not _installed("torchvision"):
            skipped[name] = "torchvision is not installed"
            continue
        torch.manual_seed(0)
        model, x = get_model(name).to(device), model_input(inputs[mode]).to(device)
        # --simulate: CPU tensors on the CPU kernels (a training step of a whole model through the simulator takes
        # minutes); the section's code runs, its figures are CPU ones
        result = compare(model, x, repeats=MEMORY_REPEATS[mode], progress=False, model_name=name)
        models.append({"model": name, "input": inputs[mode], "table": result.table(),
                       "rows": [dataclasses.asdict(r) for r in result.rows]})
    return {"models": models, "skipped": skipped, "simulated": mode == "simulate", "ok": True}


# -- section: a training step captured in a CUDA graph ---------------------------------------------------------------
GRAPH_INPUT = {"full": "32x3x64x64", "quick": "8x3x64x64"}
# the replay computes what the eager step computes, up to cuDNN's nondeterministic weight-gradient sums
GRAPH_GRAD_TOLERANCE = 1e-5


def run_cuda_graph(mode):
    if mode == "simulate":
        return {"ok": True, "rows": [], "note": "CUDA graphs need a real GPU: not run under the simulator"}
    import torch

    from ckptnorm.torch import convert
    from ckptnorm.torch.equivalence import normwise_error
    from ckptnorm.torch.harness import training_step
    from ckptnorm.torch.models import get_model

    from .common import model_input
    x = model_input(GRAPH_INPUT[mode]).cuda()
    rows = []
    for strategy in STRATEGIES:
        torch.manual_seed(0)
        model = convert(get_model("preact_resnet"), strategy).cuda()
        params = [p for p in model.parameters() if p.requires_grad]
        training_step(model, (x,))
        eager = torch.cat([p.grad.reshape(-1) for p in params])
        try:
            side = torch.cuda.Stream()  # warm-up on a side stream, as capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    training_step(model, (x,))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                training_step(model, (x,))
            graph.replay()
            torch.cuda.synchronize()
            replayed = torch.cat([p.grad.reshape(-1) for p in params])
            error = normwise_error([replayed], [eager])
            rows.append({"strategy": strategy, "captured": True, "grad_error": error,
                         "ok": error <= GRAPH_GRAD_TOLERANCE})
        except Exception as exc:  # the finding itself: which strategy cannot be captured, and why
            rows.append({"strategy": strategy, "captured": False, "reason": f"{type(exc).__name__}: {exc}"[:500],
                         "ok": True})
    return {"ok": all(r["ok"] for r in rows), "rows": rows, "input": GRAPH_INPUT[mode]}


# -- the run ----------------------------------------------------------------------------------------------------------
SECTIONS = {"tests": run_tests, "equivalence": run_equivalence, "layer_time": run_layer_time,
            "host_time": run_host_time, "bandwidth": run_bandwidth, "memory": run_memory, "cuda_graph": run_cuda_graph}


def environment(mode):
    import numba
    import torch
    info = {"mode": mode, "torch": torch.__version__, "numba": numba.__version__, "python": sys.version.split()[0]}
    if mode != "simulate":
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def print_header(environment_info, out=None):
    out = out or sys.stdout
    where = environment_info.get("device", "Numba's CUDA simulator (no GPU)")
    print(f"ckptnorm GPU check: {where}; torch {environment_info['torch']}, numba {environment_info['numba']}, "
          f"mode {environment_info['mode']}", file=out, flush=True)


def _print_rows(columns, rows, out):
    """A table of ``rows`` (dicts): ``columns`` are (header, key, format spec); text left-aligned, numbers right."""
    def header(title, spec):
        width = spec.rstrip("sdf").split(".")[0]
        return format(title, ("<" if spec.endswith("s") else ">") + width)

    print(INDENT + " ".join(header(title, spec) for title, _, spec in columns), file=out)
    for row in rows:
        print(INDENT + " ".join(format(row[key], spec) for _, key, spec in columns), file=out)


def print_section(name, section, out=None):
    """The section's lines of the table, printed as soon as it ends (a loan cut short keeps what was printed)."""
    out = out or sys.stdout
    head = f"{name:12s} {section['seconds']:7.1f} s  "
    if "error" in section:
        print(head + f"CRASHED: {section['error']}", file=out)
    elif name == "tests":
        print(head + f"{section['passed']} passed, {section['failed']} failed, {section['skipped']} skipped"
              f" ({section['command']})", file=out)
    elif name == "equivalence":
        print(head + f"{section['passed']} of {section['cases']} cases within the bound, layer "
              f"{'x'.join(map(str, section['shape']))}", file=out)
        summary = []
        by_strategy = sorted(section["rows"], key=lambda r: (STRATEGIES.index(r["strategy"]), r["dtype_name"]))
        for (strategy, dtype), group in itertools.groupby(by_strategy, key=lambda r: (r["strategy"], r["dtype_name"])):
            group = list(group)
            w = max(group, key=lambda r: r["worst_ratio"])
            summary.append({"strategy": strategy, "dtype": dtype, "cases": len(group),
                            "failed": sum(not r["ok"] for r in group),
                            "worst": f"{w['worst_ratio']:.2f} ({w['worst']}, {w['act']}, {w['layout']}, "
                                     f"{'train' if w['training'] else 'eval'}{', residual' if w['residual'] else ''})"})
        _print_rows([("strategy", "strategy", "22s"), ("dtype", "dtype", "9s"), ("cases", "cases", "5d"),
                     ("failed", "failed", "6d"), ("worst error / bound", "worst", "s")], summary, out)
    elif name == "layer_time":
        print(head + f"forward+backward, float32 NCHW, leaky_relu, medians of {section['repeats']} interleaved "
              "repeats" + (" (simulator: CPU wall times, not GPU figures)" if section["simulated"] else ""),
              file=out)
        _print_rows([("shape", "shape", "16s"), ("variant", "variant", "22s"), ("device ms", "device_ms", "10.3f"),
                     ("wall ms", "wall_ms", "9.3f"), ("vs native", "vs_native", "9.2f")], section["rows"], out)
    elif name == "host_time":
        print(head + f"host work per layer forward+backward, kernel launches stubbed out, {section['shape']} float32 "
              f"NCHW, medians of {section['repeats']} interleaved repeats" +
              (" (simulator: its own array wrappers, not the host cost on a GPU)" if section["simulated"] else ""),
              file=out)
        _print_rows([("variant", "variant", "22s"), ("launches", "launches", "8d"), ("host us", "host_us", "8.1f"),
                     ("target", "target", "s")], section["rows"], out)
    elif name == "bandwidth":
        print(head + f"float32, medians of {section['repeats']} interleaved repeats" +
              (" (simulator: CPU wall times, not GPU figures)" if section["simulated"] else ""), file=out)
        _print_rows([("shape", "shape", "16s"), ("layout", "layout", "6s"), ("kernel", "kernel", "20s"),
                     ("GB/s", "gb_per_s", "8.1f"), ("copy GB/s", "copy_gb_per_s", "10.1f"),
                     ("of copy", "fraction_of_copy", "8.2f")], section["rows"], out)
    elif name == "memory":
        print(head + "training steps per strategy (ckptnorm.torch.compare)" +
              (" (simulate: CPU tensors on the CPU kernels, not GPU figures)" if section["simulated"] else ""),
              file=out)
        for model in section["models"]:
            print("\n".join(INDENT + line for line in model["table"].splitlines()), file=out)
        for model, why in section["skipped"].items():
            print(f"{INDENT}{model}: skipped, {why}", file=out)
    elif name == "cuda_graph":
        print(head + section.get("note", f"preact_resnet {section.get('input')}, one training step captured "
                                 "and replayed"), file=out)
        for row in section["rows"]:
            result = (f"replay's gradient vs eager {row['grad_error']:.1e}" if row["captured"]
                      else f"not captured: {row['reason']}")
            print(f"{INDENT}{row['strategy']:22s} {result}", file=out)
    out.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="quick tier of the tests, a smaller layer")
    parser.add_argument("--simulate", action="store_true", help="no GPU: Numba's CUDA simulator, tiny layers")
    parser.add_argument("--json", metavar="FILE", help="write the whole report as JSON")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    mode = "simulate" if args.simulate else "quick" if args.quick else "full"
    if args.simulate:
        # read by Numba when it is first imported: before anything imports it
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    sys.path.insert(0, ROOT)
    import torch
    if not args.simulate and not torch.cuda.is_available():
        print("ckptnorm GPU check: no CUDA GPU here, nothing measured; tip: --simulate runs the same checks under "
              "Numba's CUDA simulator")
        return 0
    report = {"environment": environment(mode), "sections": {}}
    print_header(report["environment"])
    for name in args.sections:
        started = time.perf_counter()
        try:
            section = SECTIONS[name](mode)
        except Exception as exc:  # a crash in one section must not cost the others: recorded, reported, exit 1
            section = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(section["traceback"], file=sys.stderr, flush=True)
        section["seconds"] = time.perf_counter() - started
        report["sections"][name] = section
        report["ok"] = all(s["ok"] for s in report["sections"].values())
        print_section(name, section)
        if args.json:  # after every section: a run cut short still leaves what it measured
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    print("all passed" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
