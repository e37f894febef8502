"""The asv benchmarks run (on tiny shapes here), and the CUDA ones skip cleanly without a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_cuda, bench_layer  # noqa: E402


@pytest.mark.parametrize("strategy", bench_layer.STRATEGIES)
def test_layer_benchmark_runs(strategy):
    bench = bench_layer.LayerForwardBackward()
    bench.setup(strategy, "2x4x6x6")
    bench.time_forward(strategy, "2x4x6x6")
    bench.time_forward_backward(strategy, "2x4x6x6")
    saved = bench.track_saved_bytes(strategy, "2x4x6x6")
    buffer = 2 * 4 * 6 * 6 * 4
    assert (saved >= 2 * buffer) == (strategy == "standard")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_benchmarks_skip_without_gpu():
    with pytest.raises(NotImplementedError):
        bench_cuda.CudaKernelBandwidth().setup("normalize_act", "2x4x6x6", "ncs")
    with pytest.raises(NotImplementedError):
        bench_cuda.CudaLayerVsNative().setup("native", "2x4x6x6")
