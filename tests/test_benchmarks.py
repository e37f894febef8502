"""The asv benchmarks and the side-by-side report run (on tiny shapes here), and the CUDA ones skip cleanly without a
GPU.  The full suite runs under asv in CI (quick mode); this keeps a broken benchmark from reaching it."""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_cuda, bench_kernels, bench_layer, bench_model, common, report  # noqa: E402

TINY = "2x4x6x6"
BUFFER = 2 * 4 * 6 * 6  # elements of one activation-sized tensor at TINY


def _benchmark_methods(obj):
    return [name for name in dir(obj) if name.startswith(("time_", "track_", "peakmem_", "mem_"))]


def _run_all(bench, *params):
    bench.setup(*params)
    return {name: getattr(bench, name)(*params) for name in _benchmark_methods(bench)}


def test_every_benchmark_class_is_tested_here():
    found = {f"{module.__name__.split('.')[-1]}.{name}"
             for module in (bench_cuda, bench_kernels, bench_layer, bench_model)
             for name, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module.__name__ and _benchmark_methods(cls)}
    assert found == {"bench_layer.LayerForwardBackward", "bench_layer.BatchNormAct2dLayer", "bench_kernels.CpuKernel",
                     "bench_model.ModelTrainStep", "bench_cuda.CudaKernelBandwidth", "bench_cuda.CudaLayerVsNative"}


def test_shapes_include_the_issue_targets_and_quick_mode_is_small():
    assert {"32x64x56x56", "16x256x28x28", "8x128x128x128"} <= set(common.TARGET_SHAPES)
    assert common.SHAPES == (common.QUICK_SHAPES if common.QUICK else common.TARGET_SHAPES)
    assert all(torch.Size(common.parse_shape(s)).numel() <= 2**16 for s in common.QUICK_SHAPES)


@pytest.mark.parametrize("strategy", bench_layer.STRATEGIES)
def test_layer_benchmark_runs(strategy):
    bench = bench_layer.LayerForwardBackward()
    bench.setup(strategy, TINY)
    bench.time_forward(strategy, TINY)
    bench.time_forward_backward(strategy, TINY)
    saved = bench.track_saved_bytes(strategy, TINY)
    assert (saved >= 2 * BUFFER * 4) == (strategy == "standard")


@pytest.mark.parametrize("layout", common.LAYOUTS)
@pytest.mark.parametrize("dtype", common.DTYPES)
@pytest.mark.parametrize("variant", common.VARIANTS)
def test_layer_grid_benchmark_runs(variant, dtype, layout):
    results = _run_all(bench_layer.BatchNormAct2dLayer(), variant, TINY, dtype, layout)
    assert set(results) == {"time_forward", "time_forward_backward", "peakmem_forward_backward",
                            "track_saved_bytes"}
    buffer_bytes = BUFFER * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    # PyTorch's layer (native, standard) keeps x and z; every other strategy keeps one of them
    assert (results["track_saved_bytes"] >= 2 * buffer_bytes) == (variant in ("native", "standard"))


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("kernel", bench_kernels.KERNEL_NAMES)
def test_cpu_kernel_benchmark_runs(kernel, layout):
    results = _run_all(bench_kernels.CpuKernel(), kernel, TINY, "float32", layout)
    assert results["track_fraction_of_copy_bandwidth"] > 0


def test_model_benchmark_runs():
    saved = {strategy: _run_all(bench_model.ModelTrainStep(), strategy, "2x3x8x8")["track_saved_bytes"]
             for strategy in bench_model.ModelTrainStep.params[0]}
    assert saved["original"] > saved["standard"] > max(saved[s] for s in common.STRATEGIES if s != "standard")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_benchmarks_skip_without_gpu():
    with pytest.raises(NotImplementedError):
        bench_cuda.CudaKernelBandwidth().setup("normalize_act", TINY, "ncs")
    with pytest.raises(NotImplementedError):
        bench_cuda.CudaLayerVsNative().setup("native", TINY)


@pytest.mark.slow  # the whole report; the quick tier has the benchmark classes
def test_report_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert report.main(["--shapes", TINY, "--repeats", "1", "--model-input", "2x3x8x8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets (issue 5):" in text and "channels_last" in text
    data = json.loads(out.read_text())
    assert [(m["shape"], m["layout"]) for m in data["layers"]] == [(TINY, "NCHW"), (TINY, "channels_last")]
    assert [r["variant"] for r in data["layers"][0]["rows"]] == ["native"] + common.STRATEGIES
    assert [r["strategy"] for r in data["model"]["rows"]] == common.STRATEGIES
    assert data["first_call_seconds"] > 0
    assert all(set(t) == {"target", "met", "value"} for t in data["targets"]) and len(data["targets"]) == 10
