"""Numerical equivalence: every strategy against PyTorch's native BN + activation and the float64 reference.

Parametrized over strategy x valid activation x dtype x layout x training/eval x affine x track_running_stats x
momentum.  Errors are normwise: max|a - b| / max|b|.

Tolerance table (relative, normwise)                       reason
  float64 vs native, vs float64 reference     1e-10         same math in float64; only summation order differs
  float32 vs native                           1e-4          two fp32 implementations, different summation order
  float32 vs float64 reference                2x PyTorch    the acceptance bound: ckptnorm's fp32 error may be at
                                                            most twice PyTorch's own fp32 error on the same inputs,
                                                            floored at one fp32 unit roundoff (2^-24) since no fp32
                                                            result can be more exact than its rounding
  num_batches_tracked                         exact         an integer count
"""
from __future__ import annotations

import itertools
import math
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ckptnorm import PrecisionFallbackWarning, get_activation, get_strategy, reference
from ckptnorm.torch import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ckptnorm.torch.equivalence import NATIVE_ERROR_BOUNDS, error_bound

STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]
ACTIVATIONS = [("identity", None), ("leaky_relu", 0.01), ("elu", 1.0), ("relu", None), ("silu", None), ("gelu", None)]
# The activations of real models beyond those: every strategy they admit, on a smaller grid (the kernels' options --
# layouts, modes, affine, running statistics -- do not depend on the activation, and the full grid has 160 cases per
# (strategy, activation)).  celu also at alpha 0.5 (its exponential runs in units of alpha).
MORE_ACTIVATIONS = [("relu6", None), ("hardswish", None), ("hardsigmoid", None), ("mish", None), ("gelu_tanh", None),
                    ("selu", None), ("celu", 1.0), ("celu", 0.5), ("tanh", None), ("sigmoid", None)]
LAYOUTS = {  # name: (shape, module class, memory format)
    "nchw": ((2, 5, 6, 7), BatchNormAct2d, torch.contiguous_format),
    "channels_last": ((4, 5, 12, 12), BatchNormAct2d, torch.channels_last),  # 576 rows: several reduction chunks
    "2d": ((13, 5), BatchNormAct1d, torch.contiguous_format),
    "3d": ((3, 5, 11), BatchNormAct1d, torch.contiguous_format),
    "5d": ((2, 5, 3, 4, 5), BatchNormAct3d, torch.contiguous_format),
}
# CUDA tensors too when a GPU is present (the CUDA kernels also run under the simulator in test_cuda_adapter.py).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL_F64 = 1e-10
TOL_F32_VS_NATIVE = 1e-4
FP32_UNIT_ROUNDOFF = NATIVE_ERROR_BOUNDS[torch.float32][1]


def rel_err(a, ref):
    a = np.asarray(a.detach().double().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    ref = np.asarray(ref.detach().double().cpu() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    scale = np.abs(ref).max() if ref.size else 0.0
    return float(np.abs(a - ref).max() / scale) if scale > 0 else float(np.abs(a - ref).max())


def native_activation(y, name, param):
    """PyTorch's own op, out of place (what the standard strategy's in-place variants must equal)."""
    return {"identity": lambda: y, "leaky_relu": lambda: F.leaky_relu(y, param), "elu": lambda: F.elu(y, param),
            "relu": lambda: F.relu(y), "silu": lambda: F.silu(y), "gelu": lambda: F.gelu(y),
            "relu6": lambda: F.relu6(y), "hardswish": lambda: F.hardswish(y), "hardsigmoid": lambda: F.hardsigmoid(y),
            "mish": lambda: F.mish(y), "gelu_tanh": lambda: F.gelu(y, approximate="tanh"), "selu": lambda: F.selu(y),
            "celu": lambda: F.celu(y, param), "tanh": lambda: torch.tanh(y),
            "sigmoid": lambda: torch.sigmoid(y)}[name]()


def valid_cases(activations=ACTIVATIONS):
    for strategy, (act, param) in itertools.product(STRATEGIES, activations):
        if get_strategy(strategy).requires_invertible and not get_activation(act, param).invertible:
            continue
        yield strategy, act, param


def make_case(layout, dtype, affine, seed):
    shape, cls, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3
    x = x.to(dtype).contiguous(memory_format=fmt) if len(shape) == 4 else x.to(dtype)
    channels = shape[1]
    sign = torch.where(torch.rand(channels, generator=g) < 0.2, -1.0, 1.0).double()
    gamma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5) * sign
    beta = torch.rand(channels, generator=g, dtype=torch.float64) - 0.5
    running_mean = torch.randn(channels, generator=g, dtype=torch.float64) * 0.2
    running_var = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    dz = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return cls, x, gamma, beta, running_mean, running_var, dz


def run_module(module, x, dz, inplace=False):
    x_in = x.clone().requires_grad_()
    z = module(x_in * 1 if inplace else x_in)  # in place needs a non-leaf input
    z.backward(dz)
    return z, x_in.grad


def native_module(cls, channels, kwargs, act, param):
    bn_cls = {BatchNormAct1d: torch.nn.BatchNorm1d, BatchNormAct2d: torch.nn.BatchNorm2d,
              BatchNormAct3d: torch.nn.BatchNorm3d}[cls]
    bn = bn_cls(channels, **kwargs)
    return bn, lambda x: native_activation(bn(x), act, param)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("strategy,act,param", list(valid_cases()))
@pytest.mark.parametrize("device", DEVICES)
def test_equivalence(strategy, act, param, dtype, layout, training, affine, track, momentum, device):
    check_equivalence(strategy, act, param, dtype, layout, training, affine, track, momentum, device)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("strategy,act,param", list(valid_cases(MORE_ACTIVATIONS)))
@pytest.mark.parametrize("device", DEVICES)
def test_equivalence_more_activations(strategy, act, param, dtype, layout, training, device):
    check_equivalence(strategy, act, param, dtype, layout, training, True, True, 0.1, device)


_EXP_FAMILY = ("elu", "celu", "selu")  # inverses through log1p: the pre-activation floor of the precision rule


def expected_fallback(strategy, act, param, x, fwd, gamma, beta):
    """Whether inplace_abn must keep x for this call (the precision rule of docs/design.md, section 3), computed here
    from the float64 reference's statistics: so each case states which backward path it tests."""
    if strategy != "inplace_abn":
        return False
    if ((beta.abs() + 1e-300) / gamma.abs() + 1 > 32).any():
        return True
    if act not in _EXP_FAMILY:
        return False
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (gamma.view(shape) * (x.double() - torch.as_tensor(fwd.mean).view(shape))
         * torch.as_tensor(fwd.invstd).view(shape) + beta.view(shape))
    return bool(y.min() < -math.log(32) * (param if act == "celu" else 1.0))


def check_equivalence(strategy, act, param, dtype, layout, training, affine, track, momentum, device):
    seed = zlib.crc32(f"{strategy}{act}{layout}{training}{affine}{track}".encode())
    cls, x, gamma, beta, rmean, rvar, dz = make_case(layout, dtype, affine, seed)
    if strategy == "inplace_abn" and act in _EXP_FAMILY:
        # pre-activations mostly above the inverse's floor, so that most cases run the z-only backward; the others
        # test the fallback (which path each case takes is asserted below)
        gamma = gamma * 0.4
    channels = x.shape[1]
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype, device=device)
    ours = cls(channels, activation=act, activation_param=param, strategy=strategy, **kwargs)
    bn, native = native_module(cls, channels, kwargs, act, param)
    with torch.no_grad():
        for m in (ours, bn):
            if affine:
                m.weight.copy_(gamma)
                m.bias.copy_(beta)
            if track:
                m.running_mean.copy_(rmean)
                m.running_var.copy_(rvar)
                m.num_batches_tracked.fill_(3)
    ours.train(training)
    bn.train(training)

    x_dev, dz_dev = x.to(device), dz.to(device)  # same strides (memory format) on the device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionFallbackWarning)
        z, dx = run_module(ours, x_dev, dz_dev)
    fell_back = any(issubclass(w.category, PrecisionFallbackWarning) for w in caught)
    x_nat = x_dev.clone().requires_grad_()
    z_nat = native(x_nat)
    z_nat.backward(dz_dev)

    # float64 reference on the same (rounded) inputs
    use_batch = training or not track
    fwd = reference.forward(x.double().numpy(), rmean.numpy() if track else None, rvar.numpy() if track else None,
                            gamma.numpy() if affine else None, beta.numpy() if affine else None,
                            training=use_batch, momentum=momentum, eps=ours.eps, activation=act,
                            activation_param=param, num_batches_tracked=3, strategy="standard")
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(
        dz.double().numpy(), fwd, gamma.numpy() if affine else None, beta.numpy() if affine else None,
        training=use_batch, eps=ours.eps, activation=act, activation_param=param)
    ones = torch.ones(channels, dtype=torch.float64)
    assert fell_back == expected_fallback(strategy, act, param, x, fwd, gamma if affine else ones,
                                          beta if affine else ones * 0), "backward path not the one expected"
    pairs = {"z": (z, z_nat, fwd.z), "dx": (dx, x_nat.grad, ref_dx)}
    if affine:
        pairs["dgamma"] = (ours.weight.grad, bn.weight.grad, ref_dgamma)
        pairs["dbeta"] = (ours.bias.grad, bn.bias.grad, ref_dbeta)
    if track:
        pairs["running_mean"] = (ours.running_mean, bn.running_mean, fwd.running_mean)
        pairs["running_var"] = (ours.running_var, bn.running_var, fwd.running_var)
        assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == fwd.num_batches_tracked

    assert z.dtype == dtype and dx.dtype == dtype
    if x.dim() == 4:  # memory format is preserved for the output and the gradient
        fmt = LAYOUTS[layout][2]
        assert z.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    for name, (mine, nat, ref) in pairs.items():
        err_nat = rel_err(mine, nat)
        err_ref, err_torch = rel_err(mine, ref), rel_err(nat, ref)
        if dtype == torch.float64:
            assert err_nat < TOL_F64, f"{name}: vs native {err_nat:.2e}"
            assert err_ref < TOL_F64, f"{name}: vs reference {err_ref:.2e}"
        else:
            assert err_nat < TOL_F32_VS_NATIVE, f"{name}: vs native {err_nat:.2e}"
            bound = error_bound(err_torch, dtype)
            assert err_ref <= bound, f"{name}: error {err_ref:.2e} > 2x PyTorch's {err_torch:.2e}"


@pytest.mark.filterwarnings("ignore::ckptnorm.PrecisionFallbackWarning")
@pytest.mark.parametrize("strategy,act,param", list(valid_cases()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(strategy, act, param, training):
    from ckptnorm.torch import batch_norm_act
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.rand(4, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    rm = torch.randn(4, generator=g, dtype=torch.float64) * 0.1
    rv = torch.rand(4, generator=g, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        # training: running stats omitted so repeated evaluations see the same state
        return batch_norm_act(x, None if training else rm, None if training else rv, w, b, training, 0.1, 1e-5,
                              act, param, strategy)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


# gradcheck costs ~4 s a case and checks the autograd wiring, which the activation does not change (the float64
# equivalence above checks each one's derivative to 1e-10): the new inverse paths (selu, celu with inplace_abn) and
# one kinked activation.
@pytest.mark.filterwarnings("ignore::ckptnorm.PrecisionFallbackWarning")
@pytest.mark.parametrize("act,param", [("hardswish", None), ("selu", None), ("celu", 0.5)])
def test_gradcheck_float64_more_activations(act, param):
    strategy = "inplace_abn" if get_activation(act, param).invertible else "efficient_checkpoint"
    test_gradcheck_float64(strategy, act, param, training=True)


def test_fp32_error_ratios_table(capsys):
    """Print the fp32 error ratio ckptnorm / PyTorch per strategy (leaky_relu, NCHW, training): the note's table."""
    rows = []
    for strategy in STRATEGIES:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(16, 32, 24, 24, generator=g) * 2 + 1
        dz = torch.randn(x.shape, generator=g)
        gamma = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
        beta = torch.rand(32, generator=g, dtype=torch.float64) - 0.5
        ours = BatchNormAct2d(32, strategy=strategy)
        bn = torch.nn.BatchNorm2d(32)
        with torch.no_grad():
            for m in (ours, bn):
                m.weight.copy_(gamma)
                m.bias.copy_(beta)
        z, dx = run_module(ours, x, dz)
        x_nat = x.clone().requires_grad_()
        z_nat = F.leaky_relu(bn(x_nat), 0.01)
        z_nat.backward(dz)
        fwd = reference.forward(x.double().numpy(), np.zeros(32), np.ones(32), gamma.numpy(), beta.numpy(),
                                activation="leaky_relu")
        rdx, rdg, rdb = reference.backward(dz.double().numpy(), fwd, gamma.numpy(), beta.numpy(),
                                           activation="leaky_relu")
        ratios = {}
        for name, mine, nat, ref in (("z", z, z_nat, fwd.z), ("dx", dx, x_nat.grad, rdx),
                                     ("dgamma", ours.weight.grad, bn.weight.grad, rdg),
                                     ("dbeta", ours.bias.grad, bn.bias.grad, rdb)):
            ratios[name] = rel_err(mine, ref) / max(rel_err(nat, ref), FP32_UNIT_ROUNDOFF)
            assert ratios[name] <= 2.0, (strategy, name, ratios[name])
        rows.append((strategy, ratios))
    with capsys.disabled():
        print("\nfp32 error ratio ckptnorm/PyTorch vs float64 truth (16x32x24x24, leaky_relu, training):")
        for strategy, ratios in rows:
            print(f"  {strategy:22s} " + "  ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


def test_error_measures_and_a_nan_never_passes():
    from ckptnorm.torch.equivalence import max_relative_error, normwise_error
    truth = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    assert max_relative_error(truth + torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64), truth) == 0.125
    assert max_relative_error(torch.tensor([0.25]), torch.tensor([0.0])) == 0.25  # absolute where the truth is 0
    assert normwise_error([torch.tensor([3.0]), torch.tensor([4.0])], [torch.zeros(1), torch.zeros(1)]) == 5.0
    assert normwise_error([truth * 1.5], [truth]) == pytest.approx(0.5)
    nan = torch.tensor([float("nan"), 1.0])
    assert max_relative_error(nan, torch.ones(2)) == normwise_error([nan], [torch.ones(2)]) == float("inf")
