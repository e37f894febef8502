"""Activation specs: forward, derivative and (where it exists) inverse, in float64 NumPy.

An ``Activation`` is a small frozen value (name, parameter).  It carries everything the strategies need:

* ``forward(y)``, ``derivative(y)``               -- used by every strategy and by the reference;
* ``inverse(z)``, ``derivative_from_output(z)``   -- used by ``inplace_abn``, which keeps only z = phi(y).

``kernel_code`` is the integer the compiled kernels branch on; it is the only coupling between this module and
the backends (whose scalar twins of these formulas live in ``backends/activation_math.py``).

The math is PyTorch's own, operation for operation where that matters, so that a float64 model converted to
ckptnorm layers matches the original to ~1e-12, derivatives at kinks included (probed against ``torch.autograd``
in tests/test_activations.py):

    relu          phi'(0) = 0                       leaky_relu(a)  phi'(0) = a
    elu(a)        phi'(0) = a  (y <= 0 branch)      celu(a), selu   the y <= 0 branch at 0, like elu
    relu6         hardtanh(0, 6): phi' = 1 only for 0 < y < 6 (0 at both kinks)
    hardswish     phi' = 0 for y <= -3, y/3 + 1/2 for -3 < y < 3, 1 for y >= 3
    hardsigmoid   phi' = 1/6 for -3 < y < 3 (strictly), 0 elsewhere

Two PyTorch quirks are reproduced on purpose, because a float64 comparison at 1e-12 sees them:
hardsigmoid's backward multiplies by the float32 literal ``1.0f / 6.0f`` (also for float64 tensors), and celu's
backward takes its inner scale as ``1 / float32(alpha)`` (``1.0 / alpha.toFloat()`` in PyTorch's derivative
formulas).  Both are exact for the usual parameters (celu alpha = 1 or any float32 value); only the derivative
sees them, never the forward.

Inverses (design note, "Activations"), with PyTorch's in-place backward (computed from the output) as phi'(y):

    leaky_relu(a), a > 0 :  y = z if z > 0 else z / a                 phi'(y) = 1 if z > 0 else a
    elu(a), a > 0        :  y = z if z > 0 else log1p(z / a)          phi'(y) = 1 if z > 0 else z + a
    celu(a), a > 0       :  y = z if z > 0 else a * log1p(z / a)      phi'(y) = 1 if z > 0 else (z + a) / float32(a)
    selu                 :  y = z / s if z > 0 else log1p(z / (s*l))  phi'(y) = s if z > 0 else z + s*l

(s, l: SELU's scale and alpha).  The other activations are not invertible: relu, relu6, hardswish, hardsigmoid,
gelu, gelu_tanh, silu and mish are flat or non-monotonic somewhere (z does not determine y: relu6 maps every
y >= 6 to 6, silu and mish have a minimum), and tanh and sigmoid, though strictly monotonic, saturate: their
inverse ``atanh(z)`` amplifies z's rounding by 1 / (1 - z^2), which is 2^24 already at |y| ~ 9 in float32, so
the backward from z would silently lose every bit for the large pre-activations BN routinely produces.

The exponential inverses are ill-conditioned where z -> -a (elu, celu) or -s*l (selu): the kernels clamp so that
a z rounded onto the asymptote gives a finite y, and ``strategies.InplaceABN`` keeps x instead whenever the
pre-activation goes low enough to lose more than a few bits (``floor`` in its ``fallback_reason``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Integer codes shared with the kernels (ckptnorm/backends/activation_math.py, cpu_kernels.py, src_cuda/).
# Append only: the codes are compiled into cached kernels.
(IDENTITY, LEAKY_RELU, ELU, RELU, SILU, GELU, RELU6, HARDSWISH, HARDSIGMOID, MISH, GELU_TANH, SELU, CELU, TANH,
 SIGMOID) = range(15)

# PyTorch's SELU constants (ATen's SELU_ALPHA, SELU_SCALE); its elu kernel multiplies them into one coefficient.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
SELU_NEGCOEF = SELU_ALPHA * SELU_SCALE
# PyTorch's tanh-approximate GELU: kBeta = M_SQRT2 * M_2_SQRTPI * 0.5 (= sqrt(2/pi)), kKappa = 0.044715.
GELU_TANH_BETA = 1.41421356237309504880 * 1.12837916709551257390 * 0.5
GELU_TANH_KAPPA = 0.044715
# PyTorch's hardsigmoid backward: the float32 literal 1.0f / 6.0f, whatever the tensor's dtype.
HARDSIGMOID_SLOPE = float(np.float32(1.0) / np.float32(6.0))
# Inverse of elu, celu, selu: a z rounded onto the asymptote would give log1p(-1) = -inf; clamp to a finite y
# (phi' is ~0 there, so the clamped y contributes nothing).
EXP_INVERSE_CLAMP = -1.0 + 1e-16

_CODES = {"identity": IDENTITY, "leaky_relu": LEAKY_RELU, "elu": ELU, "relu": RELU, "silu": SILU, "gelu": GELU,
          "relu6": RELU6, "hardswish": HARDSWISH, "hardsigmoid": HARDSIGMOID, "mish": MISH, "gelu_tanh": GELU_TANH,
          "selu": SELU, "celu": CELU, "tanh": TANH, "sigmoid": SIGMOID}
# PyTorch's defaults: F.leaky_relu negative_slope 0.01, F.elu alpha 1.0, F.celu alpha 1.0.
_DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0, "celu": 1.0}
_PARAM_NAME = {"leaky_relu": "negative slope", "elu": "alpha", "celu": "alpha"}
_ALIASES = {
    "none": "identity", "linear": "identity", "id": "identity",
    "leaky": "leaky_relu", "leakyrelu": "leaky_relu", "lrelu": "leaky_relu",
    "swish": "silu",
    "relu_6": "relu6",
    "hard_swish": "hardswish", "hswish": "hardswish", "h_swish": "hardswish",
    "hard_sigmoid": "hardsigmoid", "hsigmoid": "hardsigmoid", "h_sigmoid": "hardsigmoid",
    "gelu_approx_tanh": "gelu_tanh", "gelu_approximate_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_erf": "gelu", "gelu_exact": "gelu", "gelu_none": "gelu",
    "logistic": "sigmoid",
}


def _float32(value: float) -> float:
    """``value`` rounded to float32 and back (PyTorch's ``Scalar.toFloat()``)."""
    return float(np.float32(value))


@dataclass(frozen=True)
class Activation:
    """An activation phi with its parameter (leaky slope, ELU or CELU alpha; 0.0 and ignored for the others)."""

    name: str
    param: float = 0.0

    @property
    def kernel_code(self) -> int:
        return _CODES[self.name]

    @property
    def linear_slope(self) -> "float | None":
        """phi'(y) for y < 0 when phi is piecewise linear (identity 1, relu 0, leaky_relu a), else None.

        The CPU backend runs these activations through branch-free kernels (``cpu_kernels_linear``).  relu6,
        hardswish and hardsigmoid have more than one kink, so they take the tiled kernels."""
        return {"identity": 1.0, "relu": 0.0, "leaky_relu": self.param}.get(self.name)

    @property
    def derivative_at_zero(self) -> float:
        """phi'(0) as PyTorch takes it (relu 0, leaky_relu a, elu a, ...)."""
        if self.linear_slope is not None:  # per kernel call in the CPU backend: no array work for these
            return 0.0 if self.name == "relu" else (self.param if self.name == "leaky_relu" else 1.0)
        return float(self.derivative(np.zeros(1))[0])

    @property
    def invertible(self) -> bool:
        """True when z = phi(y) determines y (needed by ``inplace_abn``; module docstring for the others)."""
        if self.name in ("identity", "selu"):
            return True
        if self.name in ("leaky_relu", "elu", "celu"):
            return self.param > 0
        return False

    # -- forward / derivative from the pre-activation y -------------------------------------------------------
    def forward(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        name, a = self.name, self.param
        neg = np.minimum(y, 0.0)  # the exponential branches' y: exp(neg) never overflows (celu: alpha > 0)
        with np.errstate(over="ignore"):  # exp(-y), exp(y) of huge |y|: inf, and the formulas take it
            if name == "identity":
                return y.copy()
            if name == "leaky_relu":
                return np.where(y > 0, y, a * y)
            if name == "elu":
                return np.where(y > 0, y, a * np.expm1(neg))
            if name == "celu":
                return np.where(y > 0, y, a * np.expm1(neg * (1.0 / a)))
            if name == "selu":
                return np.where(y > 0, SELU_SCALE * y, SELU_NEGCOEF * np.expm1(neg))
            if name == "relu":
                return np.maximum(y, 0.0)
            if name == "relu6":
                return np.minimum(np.maximum(y, 0.0), 6.0)
            if name == "hardswish":
                return y * np.minimum(np.maximum(y + 3.0, 0.0), 6.0) / 6.0
            if name == "hardsigmoid":
                return np.minimum(np.maximum(y + 3.0, 0.0), 6.0) / 6.0
            if name == "silu":
                return y / (1.0 + np.exp(-y))
            if name == "mish":
                return y * np.tanh(np.log1p(np.exp(y)))
            if name == "gelu_tanh":
                return 0.5 * y * (1.0 + np.tanh(GELU_TANH_BETA * (y + GELU_TANH_KAPPA * (y * y * y))))
            if name == "tanh":
                return np.tanh(y)
            if name == "sigmoid":
                return 1.0 / (1.0 + np.exp(-y))
            return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))  # gelu, exact (erf) form

    def derivative(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        name, a = self.name, self.param
        neg = np.minimum(y, 0.0)
        with np.errstate(over="ignore"):
            if name == "identity":
                return np.ones_like(y)
            if name == "leaky_relu":
                return np.where(y > 0, 1.0, a)
            if name == "elu":
                return np.where(y > 0, 1.0, a * np.exp(neg))
            if name == "celu":
                inner = 1.0 / _float32(a)  # PyTorch's derivative formula: 1.0 / alpha.toFloat()
                return np.where(y > 0, 1.0, inner * a * np.exp(neg * inner))
            if name == "selu":
                return np.where(y > 0, SELU_SCALE, SELU_NEGCOEF * np.exp(neg))
            if name == "relu":
                return (y > 0).astype(np.float64)
            if name == "relu6":
                return ((y > 0) & (y < 6)).astype(np.float64)
            if name == "hardswish":
                return np.where(y <= -3, 0.0, np.where(y < 3, y / 3.0 + 0.5, 1.0))
            if name == "hardsigmoid":
                return np.where((y > -3) & (y < 3), HARDSIGMOID_SLOPE, 0.0)
            if name == "silu":
                s = 1.0 / (1.0 + np.exp(-y))
                return s * (1.0 + y * (1.0 - s))
            if name == "mish":
                s = 1.0 / (1.0 + np.exp(-y))
                t = np.tanh(np.log1p(np.exp(y)))
                return t + y * s * (1.0 - t * t)
            if name == "gelu_tanh":
                t = np.tanh(GELU_TANH_BETA * (y + GELU_TANH_KAPPA * (y * y * y)))
                inner = GELU_TANH_BETA * (1.0 + 3.0 * GELU_TANH_KAPPA * (y * y))
                return 0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * inner
            if name == "tanh":
                t = np.tanh(y)
                return 1.0 - t * t
            if name == "sigmoid":
                s = 1.0 / (1.0 + np.exp(-y))
                return (1.0 - s) * s
            cdf = 0.5 * (1.0 + _erf(y / math.sqrt(2.0)))
            return cdf + y * np.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)

    # -- inverse, for strategies that keep only z ---------------------------------------------------------------
    def inverse(self, z: np.ndarray) -> np.ndarray:
        self._require_invertible()
        z = np.asarray(z, dtype=np.float64)
        name, a = self.name, self.param
        if name == "identity":
            return z.copy()
        if name == "leaky_relu":
            return np.where(z > 0, z, z / a)
        # clamp so that a z rounded onto the asymptote gives a finite y (its phi' is 0 there, see kernels)
        if name == "elu":
            return np.where(z > 0, z, np.log1p(np.maximum(z / a, EXP_INVERSE_CLAMP)))
        if name == "celu":
            return np.where(z > 0, z, a * np.log1p(np.maximum(z / a, EXP_INVERSE_CLAMP)))
        # selu
        return np.where(z > 0, z / SELU_SCALE, np.log1p(np.maximum(z / SELU_NEGCOEF, EXP_INVERSE_CLAMP)))

    def derivative_from_output(self, z: np.ndarray) -> np.ndarray:
        self._require_invertible()
        z = np.asarray(z, dtype=np.float64)
        name, a = self.name, self.param
        if name == "identity":
            return np.ones_like(z)
        if name == "leaky_relu":
            return np.where(z > 0, 1.0, a)
        if name == "elu":
            return np.where(z > 0, 1.0, z + a)
        if name == "celu":
            return np.where(z > 0, 1.0, (1.0 / _float32(a)) * (z + a))
        return np.where(z > 0, SELU_SCALE, z + SELU_NEGCOEF)  # selu

    def _require_invertible(self) -> None:
        if not self.invertible:
            raise ValueError(
                f"ckptnorm: activation {self.describe()} is not invertible, so z alone does not determine y; "
                "tip: use identity, selu, leaky_relu with slope > 0, or elu or celu with alpha > 0, or a strategy "
                "that keeps x (efficient_checkpoint)"
            )

    def describe(self) -> str:
        if self.name in _DEFAULT_PARAM:
            return f"{self.name}({self.param:g})"
        return self.name


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v)


ACTIVATION_NAMES = tuple(_CODES)


def get_activation(name: "str | Activation | None", param: "float | None" = None) -> Activation:
    """Return the ``Activation`` for a name (aliases allowed), an ``Activation`` instance, or ``None`` (identity).

    ``param`` is the parameter of leaky_relu (negative slope), elu and celu (alpha); ``None`` takes PyTorch's
    default (0.01, 1.0, 1.0).  The other activations have no parameter: ``param`` is ignored for them, and their
    ``Activation.param`` is 0.0.  For an ``Activation`` instance, a non-None ``param`` replaces its parameter.
    """
    if isinstance(name, Activation):
        return name if param is None else get_activation(name.name, param)
    if name is None:
        name = "identity"
    if not isinstance(name, str):
        raise TypeError(f"ckptnorm: activation must be a name or an Activation, got {type(name).__name__}; "
                        f"tip: use one of {', '.join(ACTIVATION_NAMES)}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _CODES:
        raise ValueError(f"ckptnorm: unknown activation {name!r}; tip: use one of {', '.join(ACTIVATION_NAMES)}")
    if key not in _DEFAULT_PARAM:
        return Activation(key, 0.0)
    value = _DEFAULT_PARAM[key] if param is None else float(param)
    if not math.isfinite(value):
        raise ValueError(f"ckptnorm: {key} {_PARAM_NAME[key]} must be finite, got {param!r}; tip: pass None for "
                         f"PyTorch's default ({_DEFAULT_PARAM[key]:g})")
    if key == "celu" and value == 0.0:
        raise ValueError("ckptnorm: celu alpha must not be 0 (celu divides by it); tip: pass None for PyTorch's "
                         "default (1.0)")
    return Activation(key, value)
