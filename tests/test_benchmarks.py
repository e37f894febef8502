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
from benchmarks import bench_cuda, bench_kernels, bench_layer, bench_model, common, gpu_check, report  # noqa: E402

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
                     "bench_model.ModelTrainStep", "bench_cuda.CudaKernelBandwidth", "bench_cuda.CudaLayerVsNative",
                     "bench_layer.PerCallCost", "bench_model.ModelStepRatio"}


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


@pytest.mark.parametrize("variant", common.VARIANTS)
def test_per_call_benchmark_runs(variant):
    bench = bench_layer.PerCallCost()
    bench.repeats = 3
    results = _run_all(bench, variant, TINY)
    assert set(results) == {"time_forward_backward", "track_time_to_native"}
    assert 0 < results["track_time_to_native"] < float("inf")


def test_per_call_floor_computes_what_inplace_abn_computes():
    """The report's floor is a fair one: same output, gradients and running statistics as the layer it undercuts."""
    x, dz = common.activation_inputs("4x3x5x5", seed=3)
    results = []
    for variant in (common.FLOOR, "inplace_abn"):
        torch.manual_seed(0)
        layer = common.make_layer(variant, 3)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        xs = x.clone().requires_grad_()
        z = layer(xs)
        z.backward(dz)
        results.append((z, xs.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var))
    for floor, ours in zip(*results):
        torch.testing.assert_close(floor, ours, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["ncs", "nsc"])
@pytest.mark.parametrize("kernel", bench_kernels.KERNEL_NAMES)
def test_cpu_kernel_benchmark_runs(kernel, layout):
    results = _run_all(bench_kernels.CpuKernel(), kernel, TINY, "float32", layout)
    assert results["track_fraction_of_copy_bandwidth"] > 0


def test_model_benchmark_runs():
    saved = {strategy: _run_all(bench_model.ModelTrainStep(), strategy, "2x3x8x8")["track_saved_bytes"]
             for strategy in bench_model.ModelTrainStep.params[0]}
    assert saved["original"] > saved["standard"] > max(saved[s] for s in common.STRATEGIES if s != "standard")


def test_model_step_ratio_benchmark_runs():
    bench = bench_model.ModelStepRatio()
    assert "standard" not in bench.params[0]
    bench.repeats = 1
    results = _run_all(bench, "inplace_abn", "2x3x8x8")
    assert 0 < results["track_step_to_standard"] < float("inf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_benchmarks_skip_without_gpu():
    with pytest.raises(NotImplementedError):
        bench_cuda.CudaKernelBandwidth().setup("normalize_act", TINY, "ncs")
    with pytest.raises(NotImplementedError):
        bench_cuda.CudaLayerVsNative().setup("native", TINY)


@pytest.mark.slow  # the whole report; the quick tier has the benchmark classes
def test_report_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert report.main(["--shapes", TINY, "--repeats", "1", "--model-input", "2x3x8x8", "--per-call-shapes", TINY,
                        "--per-call-repeats", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets (issue 5" in text and "channels_last" in text and "per-call cost" in text
    data = json.loads(out.read_text())
    assert [(m["shape"], m["layout"]) for m in data["layers"]] == [(TINY, "NCHW"), (TINY, "channels_last")]
    assert [r["variant"] for r in data["layers"][0]["rows"]] == ["native"] + common.STRATEGIES
    assert [r["strategy"] for r in data["model"]["rows"]] == common.STRATEGIES
    assert [(m["shape"], m["layout"]) for m in data["per_call"]] == [(TINY, "NCHW")]
    assert [r["variant"] for r in data["per_call"][0]["rows"]] == ["native"] + common.STRATEGIES + [common.FLOOR]
    assert [(m["shape"], m["layout"]) for m in data["kernels"]] == [(TINY, "NCHW"), (TINY, "channels_last")]
    assert all(set(m["fractions"]) == set(common.KERNEL_PASSES) and min(m["fractions"].values()) > 0
               for m in data["kernels"])
    assert "each CPU kernel alone" in text
    assert data["first_call_seconds"] > 0
    assert all(set(t) == {"target", "met", "value"} for t in data["targets"]) and len(data["targets"]) == 13


# -- the GPU check (benchmarks/gpu_check.py; CI runs it whole with --simulate) ------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_without_a_gpu_says_so_and_measures_nothing(capsys):
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.startswith("ckptnorm GPU check: no CUDA GPU here, nothing measured; tip: --simulate")


def test_gpu_check_grid_is_every_strategy_activation_layout_dtype_mode_and_residual():
    grid = list(gpu_check.cases())
    keys = {tuple(c[k] for k in ("strategy", "act", "layout", "dtype_name", "training", "residual")) for c in grid}
    assert len(keys) == len(grid) == 3 * 3 * 2 * 2 * 2 * 2 + 1 * 2 * 2 * 2 * 2  # inplace_abn: leaky_relu only
    assert {c["strategy"] for c in grid} == {"standard", "checkpoint", "efficient_checkpoint", "inplace_abn"}


def test_gpu_check_case_passes_and_a_wrong_result_fails(monkeypatch):
    case = dict(strategy="efficient_checkpoint", act="leaky_relu", param=0.01, layout="channels_last",
                dtype_name="float32", training=True, residual=True, shape=(2, 3, 4, 5), device="cpu", seed=0)
    results = gpu_check.check_case(**case)
    assert set(results) == {"z", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var"}
    assert all(r["error"] <= r["bound"] for r in results.values()), results
    import ckptnorm.torch
    exact = ckptnorm.torch.batch_norm_act
    monkeypatch.setattr(ckptnorm.torch, "batch_norm_act", lambda *a, **k: exact(*a, **k) * (1 + 1e-5))
    results = gpu_check.check_case(**case)
    assert results["z"]["error"] > results["z"]["bound"] and results["dx"]["error"] > results["dx"]["bound"]


def test_gpu_check_records_a_crashed_section_and_runs_the_next(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")

    def crash(mode):
        raise RuntimeError("no such device")

    empty = {"ok": True, "shape": [2, 3, 4, 5], "cases": 0, "passed": 0, "failed": 0, "rows": []}
    monkeypatch.setattr(gpu_check, "SECTIONS", {"tests": crash, "equivalence": lambda mode: empty})
    out = tmp_path / "check.json"
    assert gpu_check.main(["--simulate", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["sections"]["tests"]["error"] == "RuntimeError: no such device"
    assert report["sections"]["equivalence"]["ok"] and not report["ok"]
    assert "CRASHED: RuntimeError: no such device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulator mode: CPU tensors through the CUDA kernels")
def test_gpu_check_layer_time_rows_every_variant_against_native(monkeypatch):
    monkeypatch.setitem(gpu_check.TIME_SHAPES, "simulate", ["2x3x4x4"])
    section = gpu_check.run_layer_time("simulate")
    assert [r["variant"] for r in section["rows"]] == [common.NATIVE] + common.STRATEGIES
    assert section["rows"][0]["vs_native"] == 1.0 and section["simulated"]
    assert all(r["device_ms"] > 0 and r["wall_ms"] >= r["device_ms"] for r in section["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulator mode: CPU tensors through the CUDA kernels")
def test_gpu_check_host_time_counts_launches_and_restores_them():
    from ckptnorm._cuda.backend import CUDABackend
    launch = CUDABackend._launch
    section = gpu_check.run_host_time("simulate")
    assert CUDABackend._launch is launch
    # training forward+backward: statistics (partials + finalize), running update, normalize, reduction (partials +
    # finalize), dx; checkpoint recomputes the statistics in backward
    assert {r["variant"]: r["launches"] for r in section["rows"]} == {
        "checkpoint": 9, "efficient_checkpoint": 7, "inplace_abn": 7}
    assert all(r["host_us"] > 0 and r["target"].startswith("<= 60 us") for r in section["rows"])


def test_gpu_check_memory_compares_every_strategy_and_says_what_it_skipped(monkeypatch):
    monkeypatch.setattr(gpu_check, "MEMORY_MODELS", {"preact_resnet": {"simulate": "2x3x8x8"},
                                                     "torchvision:no_such_model": {"simulate": "2x3x8x8"}})
    monkeypatch.setattr(gpu_check, "_installed", lambda module: False)
    section = gpu_check.run_memory("simulate")
    assert [m["model"] for m in section["models"]] == ["preact_resnet"]
    assert section["skipped"] == {"torchvision:no_such_model": "torchvision is not installed"}
    rows = {r["name"]: r for r in section["models"][0]["rows"]}
    assert {"standard", "checkpoint", "efficient_checkpoint", "inplace_abn"} <= set(rows)
    assert all(rows[s]["saved_bytes"] < rows["standard"]["saved_bytes"] for s in ("checkpoint", "inplace_abn"))


def test_gpu_check_cuda_graph_says_it_needs_a_gpu_under_the_simulator():
    section = gpu_check.run_cuda_graph("simulate")
    assert section == {"ok": True, "rows": [], "note": "CUDA graphs need a real GPU: not run under the simulator"}
