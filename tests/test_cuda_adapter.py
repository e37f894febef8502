"""The PyTorch adapter on the CUDA backend.

Without a GPU, CPU tensors are routed through the CUDA kernels with ``use_backend("cuda")`` and run under Numba's
CUDA simulator (tests/conftest.py enables it): this checks the adapter's device-neutral path (per-channel math on
backend arrays, allocation through the adapter, recompute of z) on small shapes.  With a GPU, the same checks run
on CUDA tensors, plus the equivalence suite's cases, memory, and the absence of host synchronization.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ckptnorm import PrecisionFallbackWarning, get_activation, get_strategy, reference
from ckptnorm.torch import BatchNormAct1d, BatchNormAct2d, SavedTensorsCounter, use_backend

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (the simulator tests above cover the kernels)")
STRATEGIES = ["checkpoint", "efficient_checkpoint", "inplace_abn"]
ACTS = [("identity", None), ("leaky_relu", 0.1), ("elu", 1.0), ("relu", None), ("silu", None), ("gelu", None)]


def device_and_backend():
    """(device, context) for this machine: real CUDA tensors, or CPU tensors through the simulated CUDA kernels."""
    return ("cuda", use_backend("cuda")) if GPU else ("cpu", use_backend("cuda"))


def rel(a, b):
    a, b = a.detach().double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def run_case(strategy, act, param, shape, channels_last, training, dtype=torch.float64, seed=0):
    device, ctx = device_and_backend()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    dz = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    channels = shape[1]
    gamma = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    beta = torch.rand(channels, generator=g, dtype=torch.float64) * 0.6 - 0.3
    cls = BatchNormAct2d if len(shape) == 4 else BatchNormAct1d
    layer = cls(channels, activation=act, activation_param=param, strategy=strategy, dtype=dtype, device=device)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
        layer.running_mean.uniform_(-0.2, 0.2)
        layer.running_var.uniform_(0.5, 1.5)
    rm, rv = layer.running_mean.double().cpu().numpy().copy(), layer.running_var.double().cpu().numpy().copy()
    layer.train(training)
    xd = x.to(device, copy=True)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    xd.requires_grad_()
    with ctx:
        z = layer(xd)
        z.backward(dz.to(device))
    fwd = reference.forward(x.double().numpy(), rm, rv, gamma.numpy(), beta.numpy(), training=training,
                            activation=act, activation_param=param, num_batches_tracked=0)
    dx, dgamma, dbeta = reference.backward(dz.double().numpy(), fwd, gamma.numpy(), beta.numpy(), training=training,
                                           activation=act, activation_param=param)
    return layer, z, xd, fwd, (dx, dgamma, dbeta)


CASES = [(s, a, p) for s, (a, p) in itertools.product(STRATEGIES, ACTS)
         if get_activation(a, p).invertible or not get_strategy(s).requires_invertible]


@pytest.mark.filterwarnings("ignore::ckptnorm.PrecisionFallbackWarning")
@pytest.mark.parametrize("strategy,act,param", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_on_cuda_backend_matches_float64_reference(strategy, act, param, channels_last, training):
    layer, z, x, fwd, (dx, dgamma, dbeta) = run_case(strategy, act, param, (2, 3, 4, 5), channels_last, training)
    tol = 1e-10
    assert rel(z, fwd.z) < tol and rel(x.grad, dx) < tol
    assert rel(layer.weight.grad, dgamma) < tol and rel(layer.bias.grad, dbeta) < tol
    if training:
        assert rel(layer.running_mean, fwd.running_mean) < tol and rel(layer.running_var, fwd.running_var) < tol
    if channels_last:
        assert z.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_block_on_cuda_backend_saves_one_buffer_and_matches_cpu(strategy):
    device, ctx = device_and_backend()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), BatchNormAct2d(4, strategy=strategy),
                              torch.nn.Conv2d(4, 2, 1)).double()
    a = torch.randn(2, 2, 3, 5, dtype=torch.float64)
    ref_net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), BatchNormAct2d(4, strategy="standard"),
                                  torch.nn.Conv2d(4, 2, 1)).double()
    ref_net.load_state_dict(net.state_dict())
    ref_net(a).square().sum().backward()
    net.to(device)
    with ctx:
        with SavedTensorsCounter(exclude=net) as counter:
            out = net(a.to(device))
        out.square().sum().backward()
    buffer = 2 * 4 * 3 * 5 * 8
    per_channel = {"checkpoint": 0, "efficient_checkpoint": 2 * 4 * 8, "inplace_abn": 4 * 8}[strategy]
    assert counter.saved_bytes == a.numel() * 8 + buffer + per_channel
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-10, atol=1e-12)


def test_inplace_abn_on_cuda_backend_overwrites_x_and_falls_back():
    device, ctx = device_and_backend()
    layer = BatchNormAct2d(2, strategy="inplace_abn", inplace=True, dtype=torch.float64, device=device)
    leaf = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    with ctx:
        inp = leaf * 1
        z = layer(inp)
        assert z.data_ptr() == inp.data_ptr()
        z.sum().backward()
        with torch.no_grad():
            layer.weight[0] = 0.0
        layer.weight.grad = layer.bias.grad = leaf.grad = None
        with pytest.warns(PrecisionFallbackWarning):
            z = layer(leaf * 1)
        z.square().sum().backward()
    # the fallback's gradient is PyTorch's (float64): gamma = 0 in channel 0 makes z alone useless there
    ref = BatchNormAct2d(2, strategy="standard", dtype=torch.float64, device=device)
    ref.load_state_dict(layer.state_dict())
    with torch.no_grad():
        ref.running_mean.copy_(layer.running_mean), ref.running_var.copy_(layer.running_var)
    ref_leaf = leaf.detach().clone().requires_grad_()
    ref(ref_leaf * 1).square().sum().backward()
    for mine, want in ((layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad),
                       (leaf.grad, ref_leaf.grad)):
        torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12)


@needs_gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_native_cuda_batchnorm(strategy, dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 32, 17, 19, device="cuda", dtype=dtype)
    dz = torch.randn_like(x)
    ours = BatchNormAct2d(32, strategy=strategy, device="cuda", dtype=dtype)
    bn = torch.nn.BatchNorm2d(32, device="cuda", dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    za = ours(xa)
    zb = F.leaky_relu(bn(xb), 0.01)
    za.backward(dz)
    zb.backward(dz)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in ((za, zb), (xa.grad, xb.grad), (ours.weight.grad, bn.weight.grad), (ours.bias.grad, bn.bias.grad),
                 (ours.running_var, bn.running_var)):
        assert rel(a, b) < tol


@needs_gpu
@pytest.mark.parametrize("strategy", ["efficient_checkpoint", "inplace_abn"])
def test_gpu_forward_backward_never_synchronize(strategy):
    layer = BatchNormAct2d(16, strategy=strategy, activation="leaky_relu", device="cuda")
    x = torch.randn(4, 16, 8, 8, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if strategy == "inplace_abn":
            # known: inplace_abn reads gamma/beta on the host to decide its precision fallback (one small copy)
            with pytest.raises(RuntimeError):
                layer(x)
        else:
            layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpu_peak_memory_drops_by_one_buffer(strategy):
    def peak(strat):
        net = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 1), BatchNormAct2d(64, strategy=strat),
                                  torch.nn.Conv2d(64, 16, 1)).cuda()
        a = torch.randn(16, 16, 64, 64, device="cuda")
        net(a).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = net(a)
        held = torch.cuda.memory_allocated() - base
        out.sum().backward()
        return held
    buffer = 16 * 64 * 64 * 64 * 4
    saved = peak("standard") - peak(strategy)
    assert 0.8 * buffer < saved < 1.2 * buffer, (saved, buffer)


def test_cpu_tensors_use_cpu_backend_by_default():
    from ckptnorm.torch import _arrays
    assert _arrays.backend_for(torch.zeros(1)).name == "cpu"
    with use_backend("cuda"):
        assert _arrays.backend_for(torch.zeros(1)).name == "cuda"
    with pytest.raises(ValueError, match="^ckptnorm: unknown backend 'tpu'; tip:"):
        use_backend("tpu")
