"""Activation specs: forward, derivative and (where it exists) inverse, in float64 NumPy.

An ``Activation`` is a small frozen value (name, parameter).  It carries everything the strategies need:

* ``forward(y)``, ``derivative(y)``               -- used by every strategy and by the reference;
* ``inverse(z)``, ``derivative_from_output(z)``   -- used by ``inplace_abn``, which keeps only z = phi(y).

``kernel_code`` is the integer the compiled kernels branch on; it is the only coupling between this module and
the backends.  Inverses (design note, "Activations"):

    leaky_relu(a), a > 0 :  y = z if z >= 0 else z / a          phi'(y) = 1 if z >= 0 else a
    elu(alpha), alpha > 0:  y = z if z >= 0 else log1p(z/alpha) phi'(y) = 1 if z >= 0 else z + alpha

ELU's inverse is ill-conditioned where z -> -alpha; ``elu_inverse_floor`` below is how far down y may go before
``inplace_abn`` stops trusting it (see ``strategies.InplaceABN``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Integer codes shared with the kernels (ckptnorm/backends/cpu_kernels.py, src_cuda/).
IDENTITY, LEAKY_RELU, ELU, RELU, SILU, GELU = range(6)

_DEFAULT_PARAM = {"identity": 0.0, "leaky_relu": 0.01, "elu": 1.0, "relu": 0.0, "silu": 0.0, "gelu": 0.0}
_CODES = {"identity": IDENTITY, "leaky_relu": LEAKY_RELU, "elu": ELU, "relu": RELU, "silu": SILU, "gelu": GELU}
_ALIASES = {
    "none": "identity", "linear": "identity", "id": "identity",
    "leaky": "leaky_relu", "leakyrelu": "leaky_relu", "lrelu": "leaky_relu",
    "swish": "silu",
}


@dataclass(frozen=True)
class Activation:
    """An activation phi with its parameter (leaky slope ``a`` or ELU ``alpha``; ignored by the others)."""

    name: str
    param: float = 0.0

    @property
    def kernel_code(self) -> int:
        return _CODES[self.name]

    @property
    def linear_slope(self) -> "float | None":
        """phi'(y) for y < 0 when phi is piecewise linear (identity 1, relu 0, leaky_relu a), else None.

        The CPU backend runs these activations through branch-free kernels (``cpu_kernels_linear``)."""
        return {"identity": 1.0, "relu": 0.0, "leaky_relu": self.param}.get(self.name)

    @property
    def derivative_at_zero(self) -> float:
        """phi'(0) as every implementation here takes it: 0 for relu, 1 for the others."""
        return 0.0 if self.name == "relu" else 1.0

    @property
    def invertible(self) -> bool:
        """True when z = phi(y) determines y (needed by ``inplace_abn``)."""
        if self.name == "identity":
            return True
        if self.name in ("leaky_relu", "elu"):
            return self.param > 0
        return False

    # -- forward / derivative from the pre-activation y -------------------------------------------------------
    def forward(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.name == "identity":
            return y.copy()
        if self.name == "leaky_relu":
            return np.where(y >= 0, y, self.param * y)
        if self.name == "elu":
            return np.where(y >= 0, y, self.param * np.expm1(np.minimum(y, 0.0)))
        if self.name == "relu":
            return np.maximum(y, 0.0)
        if self.name == "silu":
            return y / (1.0 + np.exp(-y))
        return 0.5 * y * (1.0 + _erf(y / math.sqrt(2.0)))  # gelu, exact (erf) form

    def derivative(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.name == "identity":
            return np.ones_like(y)
        if self.name == "leaky_relu":
            return np.where(y >= 0, 1.0, self.param)
        if self.name == "elu":
            return np.where(y >= 0, 1.0, self.param * np.exp(np.minimum(y, 0.0)))
        if self.name == "relu":
            return (y > 0).astype(np.float64)
        if self.name == "silu":
            s = 1.0 / (1.0 + np.exp(-y))
            return s * (1.0 + y * (1.0 - s))
        cdf = 0.5 * (1.0 + _erf(y / math.sqrt(2.0)))
        return cdf + y * np.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)

    # -- inverse, for strategies that keep only z ---------------------------------------------------------------
    def inverse(self, z: np.ndarray) -> np.ndarray:
        self._require_invertible()
        z = np.asarray(z, dtype=np.float64)
        if self.name == "identity":
            return z.copy()
        if self.name == "leaky_relu":
            return np.where(z >= 0, z, z / self.param)
        # elu: clamp so that a z rounded onto -alpha gives a finite y (its phi' is 0 there, see kernels)
        return np.where(z >= 0, z, np.log1p(np.maximum(z / self.param, -1.0 + 1e-16)))

    def derivative_from_output(self, z: np.ndarray) -> np.ndarray:
        self._require_invertible()
        z = np.asarray(z, dtype=np.float64)
        if self.name == "identity":
            return np.ones_like(z)
        if self.name == "leaky_relu":
            return np.where(z >= 0, 1.0, self.param)
        return np.where(z >= 0, 1.0, z + self.param)

    def _require_invertible(self) -> None:
        if not self.invertible:
            raise ValueError(
                f"ckptnorm: activation {self.describe()} is not invertible, so z alone does not determine y; "
                "tip: use identity, leaky_relu with slope > 0 or elu with alpha > 0, or a strategy that keeps x "
                "(efficient_checkpoint)"
            )

    def describe(self) -> str:
        if self.name in ("leaky_relu", "elu"):
            return f"{self.name}({self.param:g})"
        return self.name


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(v)


ACTIVATION_NAMES = tuple(_CODES)


def get_activation(name: "str | Activation | None", param: "float | None" = None) -> Activation:
    """Return the ``Activation`` for a name (aliases allowed), an ``Activation`` instance, or ``None`` (identity).

    ``param`` is the leaky slope or ELU alpha; ``None`` takes the usual default (0.01, 1.0).
    """
    if isinstance(name, Activation):
        return name if param is None else Activation(name.name, float(param))
    if name is None:
        name = "identity"
    if not isinstance(name, str):
        raise TypeError(f"ckptnorm: activation must be a name or an Activation, got {type(name).__name__}; "
                        f"tip: use one of {', '.join(ACTIVATION_NAMES)}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _CODES:
        raise ValueError(f"ckptnorm: unknown activation {name!r}; tip: use one of {', '.join(ACTIVATION_NAMES)}")
    value = _DEFAULT_PARAM[key] if param is None else float(param)
    if not math.isfinite(value):
        raise ValueError(f"ckptnorm: activation parameter must be finite, got {param!r}; tip: pass None for the "
                         "default (leaky_relu 0.01, elu 1.0)")
    return Activation(key, value if key in ("leaky_relu", "elu") else 0.0)
