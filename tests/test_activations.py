"""Every activation against PyTorch's own op, in float64: the NumPy oracle, the CPU kernels and the CUDA kernels.

PyTorch defines what "the activation" is here, derivative conventions at the kinks included, so the probe points
are a wide grid, the kinks themselves (relu/leaky/elu/celu/selu at 0, relu6 at 0 and 6, hardswish/hardsigmoid at
-3 and 3, -0.0 and the smallest subnormals) and large |y| where the exponentials overflow (mish, silu, sigmoid).
Derivatives come from ``torch.autograd.grad`` of the out-of-place op; the derivative from the output z (the
inverse path of ``inplace_abn``) from PyTorch's in-place op, whose backward reads its result.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import cuda

from ckptnorm import ACTIVATION_NAMES, Activation, get_activation, get_strategy
from ckptnorm.backends import get_backend
from ckptnorm.torch import BatchNormAct1d, BatchNormAct2d, SyncBatchNormAct2d, batch_norm_act

# (name, param, PyTorch op, its in-place variant or None)
TORCH_OPS = [
    ("identity", None, lambda y: y * 1.0, None),
    ("leaky_relu", 0.01, lambda y: F.leaky_relu(y), lambda y: F.leaky_relu(y, inplace=True)),
    ("leaky_relu", 0.2, lambda y: F.leaky_relu(y, 0.2), lambda y: F.leaky_relu(y, 0.2, inplace=True)),
    ("elu", 1.0, lambda y: F.elu(y), lambda y: F.elu(y, inplace=True)),
    ("elu", 0.5, lambda y: F.elu(y, 0.5), lambda y: F.elu(y, 0.5, inplace=True)),
    ("celu", 1.0, lambda y: F.celu(y), lambda y: F.celu(y, inplace=True)),
    ("celu", 0.5, lambda y: F.celu(y, 0.5), lambda y: F.celu(y, 0.5, inplace=True)),
    # not a float32 value: PyTorch's backward uses 1 / float32(alpha) as its inner scale
    ("celu", 0.7, lambda y: F.celu(y, 0.7), lambda y: F.celu(y, 0.7, inplace=True)),
    ("selu", None, F.selu, lambda y: F.selu(y, inplace=True)),
    ("relu", None, F.relu, None),
    ("relu6", None, F.relu6, None),
    ("hardswish", None, F.hardswish, None),
    ("hardsigmoid", None, F.hardsigmoid, None),
    ("silu", None, F.silu, None),
    ("mish", None, F.mish, None),
    ("gelu", None, F.gelu, None),
    ("gelu_tanh", None, lambda y: F.gelu(y, approximate="tanh"), None),
    ("tanh", None, torch.tanh, None),
    ("sigmoid", None, torch.sigmoid, None),
]
IDS = [f"{n}{'' if p is None else p}" for n, p, _, _ in TORCH_OPS]
KINKS = np.array([-3.0, 0.0, -0.0, 3.0, 6.0, 5e-324, -5e-324, 1e-300, -1e-300])
LARGE = np.array([-1000.0, -710.0, -100.0, -40.0, -20.5, -20.0, 20.0, 20.5, 40.0, 100.0, 710.0, 1000.0])
# PyTorch's in-place backward reads z; the inverse is only well conditioned above the exponential's floor
INVERSE_RANGE = (-12.0, 12.0)


def probe_points(n):
    """n grid points over [-12, 12] (none of them a kink), the kinks and the large values."""
    grid = np.linspace(-12.0, 12.0, n) + 1e-3
    return np.concatenate([grid, KINKS, LARGE])


def torch_forward_and_grad(op, y):
    t = torch.tensor(y, dtype=torch.float64, requires_grad=True)
    z = op(t)
    (g,) = torch.autograd.grad(z.sum(), t)
    return z.detach().numpy(), g.numpy()


def torch_inplace_grad_from_output(op, y):
    """(z, phi'(y)) as PyTorch's in-place op computes them: its backward reads only z."""
    leaf = torch.tensor(y, dtype=torch.float64, requires_grad=True)
    z = op(leaf * 1.0)
    (g,) = torch.autograd.grad(z.sum(), leaf)
    return z.detach().numpy(), g.numpy()


# Where phi and phi' are branch constants or linear pieces, the values must be PyTorch's bit for bit: the kinks of the
# piecewise activations, and 0 (and the subnormals around it) for the exponential ones.
PIECEWISE = ("identity", "relu", "leaky_relu", "relu6", "hardswish", "hardsigmoid")
EXPONENTIAL = ("elu", "celu", "selu")


def assert_matches_torch(got, want, y, name):
    """Close everywhere, and bit for bit at the kinks.  Elsewhere libm's tanh, exp, ... may differ from
    PyTorch's by an ulp, which the cancellation in 1 + tanh, 1 - tanh^2 turns into an absolute ~1e-15 (gelu_tanh,
    tanh and mish where they saturate); values are O(1), so that is still a relative 1e-14 normwise."""
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    exact = np.isin(y, KINKS) if name in PIECEWISE else np.isin(y, KINKS[1:]) if name in EXPONENTIAL else None
    if exact is not None:
        np.testing.assert_array_equal(got[exact], want[exact])


def backend_primitives(backend, to_device, to_host, act, y):
    """phi(y) and phi'(y) from the backend's kernels, with y fed through BN as x (mean 0, scale 1, beta 0)."""
    x = to_device(y.reshape(1, 1, -1))
    zero, one = to_device(np.zeros(1)), to_device(np.ones(1))
    out = to_device(np.empty((1, 1, y.size)))
    backend.normalize_act(x, out, "ncs", zero, one, zero, act)
    dx = to_device(np.empty((1, 1, y.size)))
    ones = to_device(np.ones((1, 1, y.size)))
    # dx = 1 * (dz * phi'(y)) + 0 * u + 0, dz = 1
    backend.dx_from_input(x, ones, dx, "ncs", zero, one, zero, act, one, zero, zero)
    return to_host(out).ravel(), to_host(dx).ravel()


def backend_from_output(backend, to_device, to_host, act, z):
    """(phi^-1(z), phi'(y) from z) from the backend's dx_from_output kernel (beta 0)."""
    zd = to_device(z.reshape(1, 1, -1))
    zero, one = to_device(np.zeros(1)), to_device(np.ones(1))
    ones = to_device(np.ones((1, 1, z.size)))
    dx = to_device(np.empty((1, 1, z.size)))
    backend.dx_from_output(zd, ones, dx, "ncs", zero, act, zero, one, zero)  # dx = y - beta
    y = to_host(dx).ravel().copy()
    backend.dx_from_output(zd, ones, dx, "ncs", zero, act, one, zero, zero)  # dx = dz * phi'
    return y, to_host(dx).ravel()


def _cpu():
    return get_backend("cpu"), np.ascontiguousarray, np.asarray


def _cuda():
    from ckptnorm._cuda.backend import CUDABackend
    return CUDABackend(), lambda a: cuda.to_device(np.ascontiguousarray(a)), lambda a: a.copy_to_host()


# The CUDA kernels run under Numba's CUDA simulator without a GPU (one Python thread per CUDA thread): fewer points.
TARGETS = {"reference": None, "cpu": (_cpu, 2001), "cuda": (_cuda, 161)}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name,param,op,inplace_op", TORCH_OPS, ids=IDS)
def test_forward_and_derivative_match_torch(name, param, op, inplace_op, target):
    act = get_activation(name, param)
    y = probe_points(2001 if TARGETS[target] is None else TARGETS[target][1])
    z_want, g_want = torch_forward_and_grad(op, y)
    if TARGETS[target] is None:
        z, g = act.forward(y), act.derivative(y)
    else:
        z, g = backend_primitives(*TARGETS[target][0](), act, y)
    assert_matches_torch(z, z_want, y, name)
    assert_matches_torch(g, g_want, y, name)


INVERTIBLE_OPS = [case for case in TORCH_OPS if get_activation(case[0], case[1]).invertible]


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name,param,op,inplace_op", INVERTIBLE_OPS, ids=[f"{n}{p}" for n, p, _, _ in INVERTIBLE_OPS])
def test_inverse_and_derivative_from_output_match_torch_inplace(name, param, op, inplace_op, target):
    act = get_activation(name, param)
    y = probe_points(2001 if TARGETS[target] is None else TARGETS[target][1])
    unit = param if name == "celu" else 1.0  # celu's exponential runs in units of alpha
    y = y[(y >= INVERSE_RANGE[0] * unit) & (y <= INVERSE_RANGE[1])]
    if inplace_op is None:  # identity
        z, g_want = y.copy(), np.ones_like(y)
    else:
        z, g_want = torch_inplace_grad_from_output(inplace_op, y)
    if TARGETS[target] is None:
        y_got, g = act.inverse(z), act.derivative_from_output(z)
    else:
        y_got, g = backend_from_output(*TARGETS[target][0](), act, z)
    assert_matches_torch(g, g_want, y, name)
    # z carries y with an error of an ulp of z, which the inverse amplifies by exp(-y) near the asymptote
    np.testing.assert_allclose(y_got, y, rtol=1e-12, atol=1e-15 * np.exp(-INVERSE_RANGE[0]))
    np.testing.assert_array_equal(y_got[y == 0], 0.0)


def test_kink_conventions_are_pytorchs():
    """The derivative at each kink, spelled out (the probe above compares them with torch bit for bit)."""
    d = {n: get_activation(n, p).derivative for n, p in [("relu", None), ("relu6", None), ("hardswish", None),
                                                          ("hardsigmoid", None), ("leaky_relu", 0.1),
                                                          ("elu", 0.5), ("celu", 0.5), ("selu", None)]}
    assert d["relu"](np.array([0.0])).tolist() == [0.0]
    assert d["relu6"](np.array([0.0, 6.0, 3.0])).tolist() == [0.0, 0.0, 1.0]
    assert d["hardswish"](np.array([-3.0, 3.0, 0.0])).tolist() == [0.0, 1.0, 0.5]
    sixth = float(np.float32(1.0) / np.float32(6.0))  # PyTorch's float literal 1.0f / 6.0f
    assert d["hardsigmoid"](np.array([-3.0, 3.0, 0.0])).tolist() == [0.0, 0.0, sixth]
    assert d["leaky_relu"](np.array([0.0])).tolist() == [0.1]
    assert d["elu"](np.array([0.0])).tolist() == [0.5]
    assert d["celu"](np.array([0.0])).tolist() == [1.0]
    assert d["selu"](np.array([0.0])).tolist() == [1.6732632423543772 * 1.0507009873554805]
    assert get_activation("leaky_relu", 0.1).derivative_at_zero == 0.1
    assert get_activation("relu").derivative_at_zero == 0.0


def test_inverse_clamp_keeps_y_finite():
    """z rounded onto the asymptote (-alpha, -scale*alpha): a finite y, phi' ~ 0, in the oracle and the kernels."""
    cpu = get_backend("cpu")
    for act, floor in ((get_activation("elu", 0.5), -0.5), (get_activation("celu", 0.5), -0.5),
                       (get_activation("selu"), -1.6732632423543772 * 1.0507009873554805)):
        z = np.array([floor, floor * (1 + 1e-16), floor * 0.999])
        y, g = backend_from_output(cpu, np.ascontiguousarray, np.asarray, act, z)
        assert np.isfinite(y).all() and np.isfinite(act.inverse(z)).all(), act
        np.testing.assert_allclose(y, act.inverse(z), rtol=1e-12)
        np.testing.assert_allclose(g, act.derivative_from_output(z), rtol=1e-12, atol=1e-15)


# -- names, parameters, invertibility -------------------------------------------------------------------------------
def test_names_and_aliases():
    assert ACTIVATION_NAMES == ("identity", "leaky_relu", "elu", "relu", "silu", "gelu", "relu6", "hardswish",
                                "hardsigmoid", "mish", "gelu_tanh", "selu", "celu", "tanh", "sigmoid")
    assert [get_activation(n).kernel_code for n in ACTIVATION_NAMES] == list(range(len(ACTIVATION_NAMES)))
    aliases = {"hardswish": ["Hardswish", "hard_swish", "hard-swish", "hswish", "h_swish"],
               "hardsigmoid": ["Hardsigmoid", "hard_sigmoid", "hsigmoid", "h-sigmoid"],
               "gelu_tanh": ["gelu_approx_tanh", "GELU-approximate-tanh", "gelu_pytorch_tanh"],
               "gelu": ["gelu_erf", "gelu_exact", "gelu_none"], "relu6": ["ReLU6", "relu_6"], "mish": ["Mish"],
               "selu": ["SELU"], "celu": ["CELU"], "tanh": ["Tanh"], "sigmoid": ["Sigmoid", "logistic"],
               "silu": ["SiLU", "swish"]}
    for name, spellings in aliases.items():
        for spelling in spellings:
            assert get_activation(spelling).name == name, spelling


def test_parameters_default_to_pytorchs():
    assert get_activation("leaky_relu") == Activation("leaky_relu", 0.01)
    assert get_activation("elu") == Activation("elu", 1.0)
    assert get_activation("celu") == Activation("celu", 1.0)
    assert get_activation("celu", 0.5).describe() == "celu(0.5)"
    # parameterless activations ignore a parameter
    for name in ("relu", "relu6", "hardswish", "hardsigmoid", "mish", "gelu_tanh", "selu", "tanh", "sigmoid"):
        assert get_activation(name, 0.3) == Activation(name, 0.0)
        assert get_activation(name).describe() == name
    assert get_activation(Activation("celu", 2.0), 0.5) == Activation("celu", 0.5)
    with pytest.raises(ValueError, match=r"^ckptnorm: celu alpha must not be 0.*tip:"):
        get_activation("celu", 0.0)
    with pytest.raises(ValueError, match=r"^ckptnorm: celu alpha must be finite.*tip:"):
        get_activation("celu", float("inf"))


def test_invertible_activations():
    invertible = {n for n in ACTIVATION_NAMES if get_activation(n).invertible}
    assert invertible == {"identity", "leaky_relu", "elu", "celu", "selu"}
    assert not get_activation("celu", -1.0).invertible
    for name in sorted(set(ACTIVATION_NAMES) - invertible):
        with pytest.raises(ValueError, match=r"^ckptnorm: activation .* is not invertible.*tip:"):
            get_activation(name).inverse(np.zeros(2))
        with pytest.raises(ValueError, match=r"needs an invertible activation"):
            get_strategy("inplace_abn").check_activation(get_activation(name))


def test_module_parameter_defaults_are_pytorchs():
    """The modules default activation_param to None: the activation's PyTorch default, not a leaky slope."""
    assert BatchNormAct2d(4, activation="elu").activation_param == 1.0
    assert BatchNormAct2d(4, activation="celu").activation_param == 1.0
    assert BatchNormAct2d(4).activation_param == 0.01  # leaky_relu
    assert BatchNormAct1d(4, activation="selu").activation_param == 0.0
    assert SyncBatchNormAct2d(4, activation="elu").activation_param == 1.0
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    layer = BatchNormAct2d(4, activation="elu", dtype=torch.float64)
    want = F.elu(F.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch_norm_act(x, None, None, training=True, activation="celu"),
                               F.celu(F.batch_norm(x, None, None, training=True)), rtol=1e-12, atol=1e-12)
