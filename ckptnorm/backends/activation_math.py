"""The activations as scalar float64 functions, written once for the CPU kernels and the CUDA kernels.

Each activation has ``<name>(y[, a])`` = phi(y) and ``<name>_grad(y[, a])`` = phi'(y); the invertible ones also
``<name>_inverse(z[, a])`` = y and ``<name>_grad_from_output(z[, a])`` = phi'(y) from z.  ``a`` is the activation's
parameter (``Activation.param``).  The formulas are PyTorch's, as ``ckptnorm.activations`` documents (kinks,
float32 constants); that module's NumPy versions are the independent oracle these are tested against.

They are ``numba.njit`` functions, which numba-cuda compiles as device functions when a ``cuda.jit`` kernel
calls them (``src_cuda/kernels.py``, through the per-element dispatchers ``act_forward``, ``act_grad``,
``act_inverse`` below: a branch on a code that is uniform over the grid costs nothing there), and which the CPU
kernels call in their per-tile loops (``cpu_kernels``: one branch on the activation code per tile, then a loop
over one of these).  Each is compiled once by Numba and inlined by LLVM when a kernel links it (no call remains,
and the tile loops still vectorize); Numba-level inlining (``inline="always"``) would redo the typing of every
one in every kernel and make a cold compilation much slower.  Under Numba's CUDA simulator the kernels call them
as compiled CPU functions.

Correct inf handling needs IEEE semantics: never compile these with the fastmath flags ``nnan``, ``ninf`` or
``afn`` (exp(-y) overflowing to inf is how sigmoid, silu and mish saturate).  Compiled on their own, they keep
IEEE semantics inside the reductions' ``fastmath`` kernels too.

Numba inlines these into every kernel but checks only the kernel module's own source for staleness of its on-disk
cache: after editing this file, delete the kernels' caches (``ckptnorm/backends/__pycache__`` and
``src_cuda/__pycache__``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..activations import (CELU, ELU, EXP_INVERSE_CLAMP, GELU, GELU_TANH, GELU_TANH_BETA, GELU_TANH_KAPPA,
                           HARDSIGMOID, HARDSIGMOID_SLOPE, HARDSWISH, LEAKY_RELU, MISH, RELU, RELU6, SELU,
                           SELU_NEGCOEF, SELU_SCALE, SIGMOID, SILU, TANH)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_KAPPA3 = 3.0 * GELU_TANH_KAPPA

_scalar = njit(cache=True, nogil=True)  # not inline="always": see the module docstring


# -- piecewise linear ------------------------------------------------------------------------------------------------
@_scalar
def leaky_relu(y, a):
    return y if y > 0.0 else a * y


@_scalar
def leaky_relu_grad(y, a):
    return 1.0 if y > 0.0 else a  # PyTorch: the slope at 0


@_scalar
def leaky_relu_inverse(z, a):
    return z if z > 0.0 else z / a


@_scalar
def leaky_relu_grad_from_output(z, a):
    return 1.0 if z > 0.0 else a


@_scalar
def relu(y):
    return max(y, 0.0)


@_scalar
def relu_grad(y):
    return 1.0 if y > 0.0 else 0.0


@_scalar
def relu6(y):
    return min(max(y, 0.0), 6.0)


@_scalar
def relu6_grad(y):
    # PyTorch's hardtanh backward: the gradient passes only strictly between the bounds
    return 1.0 if (y > 0.0 and y < 6.0) else 0.0


@_scalar
def hardswish(y):
    return y * min(max(y + 3.0, 0.0), 6.0) / 6.0


@_scalar
def hardswish_grad(y):
    # PyTorch: 0 up to and including -3, 1 from 3 on (both kinks take the outer piece)
    if y <= -3.0:
        return 0.0
    if y < 3.0:
        return y / 3.0 + 0.5
    return 1.0


@_scalar
def hardsigmoid(y):
    return min(max(y + 3.0, 0.0), 6.0) / 6.0


@_scalar
def hardsigmoid_grad(y):
    return HARDSIGMOID_SLOPE if (y > -3.0 and y < 3.0) else 0.0


# -- exponential linear units ----------------------------------------------------------------------------------------
@_scalar
def elu(y, a):
    return y if y > 0.0 else a * math.expm1(y)


@_scalar
def elu_grad(y, a):
    return 1.0 if y > 0.0 else a * math.exp(y)  # PyTorch: alpha at 0 (the y <= 0 branch)


@_scalar
def elu_inverse(z, a):
    # z rounded onto -alpha would give log1p(-1) = -inf: clamped to a finite y (phi' ~ 0 there)
    return z if z > 0.0 else math.log1p(max(z / a, EXP_INVERSE_CLAMP))


@_scalar
def elu_grad_from_output(z, a):
    return 1.0 if z > 0.0 else z + a


@_scalar
def _celu_inner(a):
    # PyTorch's celu derivative takes its inner scale as 1.0 / alpha.toFloat(): alpha rounded to float32
    return 1.0 / np.float64(np.float32(a))


@_scalar
def celu(y, a):
    return y if y > 0.0 else a * math.expm1(y * (1.0 / a))


@_scalar
def celu_grad(y, a):
    if y > 0.0:
        return 1.0
    inner = _celu_inner(a)
    return inner * a * math.exp(y * inner)


@_scalar
def celu_inverse(z, a):
    return z if z > 0.0 else a * math.log1p(max(z / a, EXP_INVERSE_CLAMP))


@_scalar
def celu_grad_from_output(z, a):
    return 1.0 if z > 0.0 else _celu_inner(a) * (z + a)  # PyTorch's in-place celu backward


@_scalar
def selu(y):
    return SELU_SCALE * y if y > 0.0 else SELU_NEGCOEF * math.expm1(y)


@_scalar
def selu_grad(y):
    return SELU_SCALE if y > 0.0 else SELU_NEGCOEF * math.exp(y)


@_scalar
def selu_inverse(z):
    return z / SELU_SCALE if z > 0.0 else math.log1p(max(z / SELU_NEGCOEF, EXP_INVERSE_CLAMP))


@_scalar
def selu_grad_from_output(z):
    return SELU_SCALE if z > 0.0 else z + SELU_NEGCOEF  # PyTorch's in-place selu backward


# -- smooth ----------------------------------------------------------------------------------------------------------
@_scalar
def sigmoid(y):
    return 1.0 / (1.0 + math.exp(-y))


@_scalar
def sigmoid_grad(y):
    s = 1.0 / (1.0 + math.exp(-y))
    return (1.0 - s) * s  # PyTorch's sigmoid backward, from the output


@_scalar
def tanh(y):
    return math.tanh(y)


@_scalar
def tanh_grad(y):
    t = math.tanh(y)
    return 1.0 - t * t  # PyTorch's tanh backward, from the output


@_scalar
def silu(y):
    return y / (1.0 + math.exp(-y))


@_scalar
def silu_grad(y):
    s = 1.0 / (1.0 + math.exp(-y))
    return s * (1.0 + y * (1.0 - s))


@_scalar
def mish(y):
    # PyTorch's formula, without a softplus threshold: exp(y) = inf for y > 709 gives tanh(inf) = 1, phi = y
    return y * math.tanh(math.log1p(math.exp(y)))


@_scalar
def mish_grad(y):
    s = 1.0 / (1.0 + math.exp(-y))
    t = math.tanh(math.log1p(math.exp(y)))
    return t + y * s * (1.0 - t * t)


@_scalar
def gelu(y):
    return 0.5 * y * (1.0 + math.erf(y * _SQRT_HALF))


@_scalar
def gelu_grad(y):
    return 0.5 * (1.0 + math.erf(y * _SQRT_HALF)) + y * math.exp(-0.5 * y * y) * _INV_SQRT_2PI


@_scalar
def gelu_tanh(y):
    return 0.5 * y * (1.0 + math.tanh(GELU_TANH_BETA * (y + GELU_TANH_KAPPA * (y * y * y))))


@_scalar
def gelu_tanh_grad(y):
    y2 = y * y
    t = math.tanh(GELU_TANH_BETA * (y + GELU_TANH_KAPPA * (y2 * y)))
    return 0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * (GELU_TANH_BETA * (1.0 + _GELU_TANH_KAPPA3 * y2))


# -- per-element dispatch on the activation code (CUDA kernels; anything unknown is identity) ------------------------
@_scalar
def act_forward(y, kind, a):
    """phi(y)."""
    if kind == LEAKY_RELU:
        return leaky_relu(y, a)
    if kind == ELU:
        return elu(y, a)
    if kind == RELU:
        return relu(y)
    if kind == SILU:
        return silu(y)
    if kind == GELU:
        return gelu(y)
    if kind == RELU6:
        return relu6(y)
    if kind == HARDSWISH:
        return hardswish(y)
    if kind == HARDSIGMOID:
        return hardsigmoid(y)
    if kind == MISH:
        return mish(y)
    if kind == GELU_TANH:
        return gelu_tanh(y)
    if kind == SELU:
        return selu(y)
    if kind == CELU:
        return celu(y, a)
    if kind == TANH:
        return tanh(y)
    if kind == SIGMOID:
        return sigmoid(y)
    return y


@_scalar
def act_grad(y, kind, a):
    """phi'(y)."""
    if kind == LEAKY_RELU:
        return leaky_relu_grad(y, a)
    if kind == ELU:
        return elu_grad(y, a)
    if kind == RELU:
        return relu_grad(y)
    if kind == SILU:
        return silu_grad(y)
    if kind == GELU:
        return gelu_grad(y)
    if kind == RELU6:
        return relu6_grad(y)
    if kind == HARDSWISH:
        return hardswish_grad(y)
    if kind == HARDSIGMOID:
        return hardsigmoid_grad(y)
    if kind == MISH:
        return mish_grad(y)
    if kind == GELU_TANH:
        return gelu_tanh_grad(y)
    if kind == SELU:
        return selu_grad(y)
    if kind == CELU:
        return celu_grad(y, a)
    if kind == TANH:
        return tanh_grad(y)
    if kind == SIGMOID:
        return sigmoid_grad(y)
    return 1.0


@_scalar
def act_inverse(z, kind, a):
    """From z = phi(y): ``(y, phi'(y))`` (invertible activations; anything else is treated as identity)."""
    if kind == LEAKY_RELU:
        return leaky_relu_inverse(z, a), leaky_relu_grad_from_output(z, a)
    if kind == ELU:
        return elu_inverse(z, a), elu_grad_from_output(z, a)
    if kind == CELU:
        return celu_inverse(z, a), celu_grad_from_output(z, a)
    if kind == SELU:
        return selu_inverse(z), selu_grad_from_output(z)
    return z, 1.0
