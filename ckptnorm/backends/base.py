"""The backend interface: the few fused primitives every strategy is written in.

A backend streams activation-sized arrays; strategies (``ckptnorm.strategies``) own the per-channel math.
Arrays are 3-D views in memory order (``layout`` "ncs" = (N, C, S), "nsc" = (N, S, C)); per-channel arrays are
1-D float64.

Activation storage (``storage``): an activation-sized array (x, z, dz, out, dx, residual, dres) holds float64,
float32, or half precision as a 16-bit *integer view of the same bits*: float16 as **uint16**, bfloat16 as
**int16** (Numba's CPU target has no float16 type, NumPy has no bfloat16, and ``torch.bfloat16`` has no
``__cuda_array_interface__`` type string; the signedness is what tells the two formats apart).  Each array may be
in its own format (e.g. uint16 x with a float32 dz).  Kernels widen every loaded element to float64 (exactly),
compute and accumulate in float64, and round each stored element once to its array's format (to nearest even;
overflow to inf, subnormals and NaN as IEEE).  Per-channel inputs and results stay float64 whatever the storage.

Residual sites (``z = phi(BN(x) + r)``, the end of a post-activation residual block): every primitive but
``channel_stats`` takes an optional ``residual`` r, a view of the same shape and layout as x with any strides (like
``dz``).  With it the pre-activation is ``y + r``: the forward adds r before phi, the backward evaluates phi' at
``y + r`` (from x) or recovers ``y = phi^-1(z) - r`` (from z); the dx primitives then also write the residual's
gradient ``dres = dy = dz * phi'(y + r)`` when ``dres`` is given.  Without ``residual`` nothing changes.

A backend never allocates an activation-sized array: outputs are passed in, and may alias inputs where a primitive
says so.  Backends must be deterministic (same bits on every run).
"""
from __future__ import annotations

import abc

LAYOUTS = ("ncs", "nsc")


class Backend(abc.ABC):
    """Fused BatchNorm+activation primitives.  ``act`` is an ``ckptnorm.activations.Activation``."""

    name: str = "abstract"

    @abc.abstractmethod
    def channel_stats(self, x, layout, with_range=False):
        """Return float64 arrays ``(mean, var, xmin, xmax)`` per channel; ``var`` is biased (divides by m).

        ``xmin``/``xmax`` (the range of x) are computed only ``with_range``; otherwise they are None.
        """

    @abc.abstractmethod
    def normalize_act(self, x, out, layout, mean, scale, beta, act, residual=None):
        """``out = phi((x - mean) * scale + beta [+ residual])`` elementwise; ``out`` may be ``x`` (in place), never
        ``residual``."""

    @abc.abstractmethod
    def reduce_from_input(self, x, dz, layout, mean, invstd, scale, beta, act, residual=None):
        """Return ``(sum(dy), sum(dy * xhat))`` with y, xhat recomputed from x and dy = dz * phi'(y [+ residual])."""

    @abc.abstractmethod
    def reduce_from_output(self, z, dz, layout, beta, act, residual=None):
        """Return ``(sum(dy), sum(dy * (y - beta)))`` from z alone: y = phi^-1(z) [- residual], dy = dz * phi'(.)
        with phi' taken from z."""

    @abc.abstractmethod
    def dx_from_input(self, x, dz, dx, layout, mean, scale, beta, act, coef_dy, coef_u, coef_const, residual=None,
                      dres=None):
        """``dx = coef_dy * dy + coef_u * (x - mean) + coef_const`` per channel, dy recomputed from x (and
        ``residual``); ``dres = dy`` when given."""

    @abc.abstractmethod
    def dx_from_output(self, z, dz, dx, layout, beta, act, coef_dy, coef_u, coef_const, residual=None, dres=None):
        """``dx = coef_dy * dy + coef_u * (y - beta) + coef_const`` per channel from z alone, y = phi^-1(z)
        [- residual]; ``dres = dy`` when given."""

    @abc.abstractmethod
    def update_running_stats(self, running_mean, running_var, mean, var, count, factor):
        """In place, per channel: ``running = (1 - factor) * running + factor * batch`` with the unbiased batch
        variance (``ckptnorm.channel_stats.updated_running_stats``; ``count`` = m).  ``running_mean`` and
        ``running_var`` are the running buffers themselves, 1-D, each in a storage format like an activation (rounded
        once when stored); ``mean`` and ``var`` are this call's float64 statistics."""

    def to_host(self, array):
        """A NumPy copy of a (small, per-channel) array this backend returned; may wait for the device."""
        import numpy as np
        return np.asarray(array)
