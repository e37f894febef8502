"""float16 / bfloat16 inputs (float32 parameters and statistics), and torch.autocast.

The bound (issue 6): against a float64 ground truth computed from the same rounded inputs, every output and
gradient of a ckptnorm strategy is within 1.5x the error of PyTorch's native BatchNorm + activation at the same
dtype.  Errors are normwise, max|a - b| / max|b|, floored at the storage format's unit roundoff (below that both
are exact up to the final rounding and the ratio is noise).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptnorm import PrecisionFallbackWarning
from ckptnorm.torch import BatchNormAct2d, SavedTensorsCounter, batch_norm_act, convert, use_backend
from ckptnorm.torch.equivalence import NATIVE_ERROR_BOUNDS, error_bound, max_relative_error

HALF = [torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {dtype: NATIVE_ERROR_BOUNDS[dtype][1] for dtype in HALF}
STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]


def _data(dtype, channels_last, shape=(8, 6, 10, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.5).to(dtype)
    dz = torch.randn(shape, generator=g).to(dtype)
    w = torch.rand(shape[1], generator=g) + 0.5
    b = torch.rand(shape[1], generator=g) * 0.4 - 0.2
    if channels_last:
        x, dz = (t.contiguous(memory_format=torch.channels_last) for t in (x, dz))
    return x, dz, w, b


def _step(strategy, act, param, x, dz, w, b, training=True):
    """(z, dx, dweight, dbias, running_mean, running_var) for one forward+backward."""
    xi = x.clone().requires_grad_()
    wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
    rm = torch.zeros(w.shape, dtype=w.dtype)
    rv = torch.ones(w.shape, dtype=w.dtype)
    z = batch_norm_act(xi, rm, rv, wi, bi, training, 0.1, 1e-5, act, param, strategy)
    z.backward(dz)
    return z.detach(), xi.grad, wi.grad, bi.grad, rm, rv


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("silu", None), ("identity", None)])
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_error_within_1_5x_native(dtype, strategy, act, param, channels_last):
    if strategy == "inplace_abn" and act == "silu":
        pytest.skip("inplace_abn needs an invertible activation")
    x, dz, w, b = _data(dtype, channels_last)
    truth = _step("standard", act, param, x.double(), dz.double(), w.double(), b.double())
    native = _step("standard", act, param, x, dz, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionFallbackWarning)
        ours = _step(strategy, act, param, x, dz, w, b)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype  # output and dx keep the input dtype
    assert ours[2].dtype == torch.float32 and ours[4].dtype == torch.float32  # parameters, statistics: float32
    assert ours[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    assert ours[1].is_contiguous(memory_format=torch.channels_last) == channels_last
    for name, o, n, t in zip(("z", "dx", "dweight", "dbias", "running_mean", "running_var"), ours, native, truth):
        assert max_relative_error(o, t) <= error_bound(max_relative_error(n, t), dtype), \
            f"{name}: ckptnorm error {max_relative_error(o, t):.3g} vs native {max_relative_error(n, t):.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_half_parameters_and_statistics(dtype, strategy, channels_last):
    """``model.half()`` / ``model.bfloat16()``: parameters and running statistics in the input's dtype too (NumPy
    has no bfloat16: such parameters once crashed the forward); errors within the same bound as above, and the
    gradients and statistics in that dtype, as PyTorch's."""
    x, dz, w, b = _data(dtype, channels_last)
    w, b = w.to(dtype), b.to(dtype)
    truth = _step("standard", "leaky_relu", 0.01, x.double(), dz.double(), w.double(), b.double())
    native = _step("standard", "leaky_relu", 0.01, x, dz, w, b)
    ours = _step(strategy, "leaky_relu", 0.01, x, dz, w, b)
    assert all(t.dtype == dtype for t in ours)
    for name, o, n, t in zip(("z", "dx", "dweight", "dbias", "running_mean", "running_var"), ours, native, truth):
        assert max_relative_error(o, t) <= error_bound(max_relative_error(n, t), dtype), \
            f"{name}: ckptnorm error {max_relative_error(o, t):.3g} vs native {max_relative_error(n, t):.3g}"
    for training in (True, False):  # and through the module, as model.to(dtype) leaves it
        layer = BatchNormAct2d(6, strategy=strategy).to(dtype).train(training)
        out = layer(x.clone().requires_grad_())
        out.backward(dz)
        assert out.dtype == dtype and layer.weight.grad.dtype == dtype and layer.running_var.dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_eval_mode_and_residual(dtype):
    x, dz, w, b = _data(dtype, False)
    r = torch.randn(x.shape).to(dtype)
    for strategy in STRATEGIES[1:]:
        z = batch_norm_act(x, torch.zeros(6), torch.ones(6), w, b, False, 0.1, 1e-5, "leaky_relu", 0.01, strategy)
        want = F.leaky_relu(F.batch_norm(x.double(), torch.zeros(6).double(), torch.ones(6).double(), w.double(),
                                         b.double(), False), 0.01)
        assert z.dtype == dtype and max_relative_error(z, want) <= 2 * UNIT_ROUNDOFF[dtype]
        ri = r.clone().requires_grad_()
        z = batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, "leaky_relu", 0.01, strategy, residual=ri)
        z.backward(dz)
        want = F.leaky_relu(F.batch_norm(x.double(), None, None, w.double(), b.double(), True) + r.double(), 0.01)
        assert max_relative_error(z, want) <= 2 * UNIT_ROUNDOFF[dtype] and ri.grad.dtype == dtype


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.LeakyReLU(0.01)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.LeakyReLU(0.01)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))))


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_cpu_autocast_bfloat16_keeps_the_saving(strategy):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(4, 3, 16, 16)
    truth = copy.deepcopy(net).double()  # the float64 gradient the bf16 runs approximate
    truth(x.double()).square().mean().backward()
    saved, grads = {}, {}
    for name in ("standard", strategy):
        model = convert(net, name)
        with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorsCounter(exclude=[model, x]) as counter:
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        saved[name] = counter.saved_bytes
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    # the ckptnorm layers keep one bf16 buffer each instead of two
    buffer = 4 * 8 * 16 * 16 * 2
    assert saved["standard"] - saved[strategy] >= 2 * buffer - 4096
    for n, g in grads["standard"].items():
        assert g.dtype == torch.float32
        if n in ("conv1.bias", "conv2.bias"):
            continue  # a bias right before a BN has a zero gradient in exact arithmetic: only rounding is left
        # the brief's rule: no worse than twice PyTorch's own error in the same precision (bf16 rounds to 2^-9)
        want = truth.get_parameter(n).grad
        assert max_relative_error(grads[strategy][n], want) <= 2 * max(max_relative_error(g, want), 2.0 ** -9), n


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_kernels_half_through_the_adapter(dtype, channels_last):
    """The CUDA kernels with 16-bit storage (simulated on CPU tensors without a GPU) agree with the CPU kernels."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, dz, w, b = (t.to(device) for t in _data(dtype, channels_last, shape=(2, 3, 3, 4)))
    for strategy in ("efficient_checkpoint", "inplace_abn"):
        cpu = _step(strategy, "leaky_relu", 0.01, x.cpu(), dz.cpu(), w.cpu(), b.cpu())
        with use_backend("cuda"):
            cuda = _step(strategy, "leaky_relu", 0.01, x, dz, w, b)
        for got, want in zip(cuda, cpu):  # float64 math in both; sums in another order: one rounding step apart
            torch.testing.assert_close(got.cpu(), want, rtol=2 * UNIT_ROUNDOFF[dtype], atol=1e-5)


def test_module_half_with_float32_parameters():
    layer = BatchNormAct2d(6, strategy="inplace_abn")  # float32 parameters and buffers
    x, dz, _, _ = _data(torch.bfloat16, True)
    z = layer(x)
    z.backward(dz)
    assert z.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    assert layer.running_mean.dtype == torch.float32 and int(layer.num_batches_tracked) == 1
