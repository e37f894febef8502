"""Activation modules ckptnorm has no kernel for: one call of f on the kernels' y, and what it takes to re-run f
identically later (the autocast state of forward, and the RNG state when f drew random numbers).  Used by the
autograd Function (``function.py``) and by the recipes that re-materialize z = f(y) (``_recompute.py``).
"""
from __future__ import annotations

import contextlib

import torch


def _rng_state(device):
    """The generator states an elementwise module on ``device`` may draw from: the CPU one, and the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _autocast_state(device_type):
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled())


class ModuleCall:
    """One call of an elementwise activation f (an ``nn.Module`` or a callable ckptnorm has no kernel for) on the
    kernels' y = BN(x) [+ r], with what it takes to re-run f identically later.

    f runs three times at most: in forward without a graph (``first_run``), in the layer's backward under autograd
    to get dy = dz * f'(y) (``gradient``), and for a consumer of z (``Recipe``, again without a graph).  So that the
    re-runs give the same z as forward -- what the gradient is of -- they run under the autocast state of forward,
    and, when f drew random numbers (RReLU, a dropout inside), from the RNG state it started from, restored around
    the re-run only (as torch.utils.checkpoint's ``preserve_rng_state``; the global stream is left untouched).  Only
    the default CPU generator and the input device's are restored: f must be deterministic apart from those.
    """

    __slots__ = ("fn", "rng", "autocast", "device")

    def __init__(self, fn):
        self.fn, self.rng, self.autocast, self.device = fn, None, None, None

    def first_run(self, y):
        """z = f(y) in forward (the caller runs without grad); ``y`` is the layer's fresh buffer: f may overwrite it."""
        self.device = y.device
        self.autocast = _autocast_state(y.device.type)
        shape, device = y.shape, y.device  # before f: an in-place f changes y
        before = _rng_state(y.device)
        z = self.fn(y)
        check_elementwise(self.fn, shape, device, z)
        after = _rng_state(y.device)
        # Restoring costs two state copies per re-run; only worth it when f actually consumed randomness.
        if not torch.equal(before[0], after[0]) or (before[1] is not None and not torch.equal(before[1], after[1])):
            self.rng = before
        return z

    @contextlib.contextmanager
    def _replay(self):
        with torch.autocast(self.device.type, dtype=self.autocast[1], enabled=self.autocast[0],
                            cache_enabled=self.autocast[2]):
            if self.rng is None:
                yield self._reset
                return
            current = _rng_state(self.device)
            try:
                self._reset()
                yield self._reset
            finally:
                torch.set_rng_state(current[0])
                if current[1] is not None:
                    torch.cuda.set_rng_state(current[1], self.device)

    def _reset(self):
        if self.rng is not None:
            torch.set_rng_state(self.rng[0])
            if self.rng[1] is not None:
                torch.cuda.set_rng_state(self.rng[1], self.device)

    def rerun(self, y):
        """z = f(y) again, without a graph (a consumer's recipe).  ``y`` is a fresh buffer that f may overwrite."""
        with torch.no_grad(), self._replay():
            return self.fn(y)

    def gradient(self, y, dz):
        """dy = dz * f'(y), by autograd through one more run of f on ``y`` (a fresh buffer, owned by the caller)."""
        with torch.enable_grad(), self._replay() as reset:
            leaf = y.requires_grad_()
            # An in-place f cannot run on a leaf that requires grad: give it a copy (one more buffer, briefly).
            if getattr(self.fn, "inplace", False) is True:
                z = self.fn(leaf.clone())
            else:
                try:
                    z = self.fn(leaf)
                except RuntimeError as exc:  # in place without an ``inplace`` attribute: same remedy
                    if "in-place" not in str(exc):
                        raise
                    reset()
                    z = self.fn(leaf.clone())
        if not (isinstance(z, torch.Tensor) and z.requires_grad):  # f detached its result: no gradient flows
            return torch.zeros_like(y)
        (dy,) = torch.autograd.grad(z, leaf, dz, allow_unused=True)
        return torch.zeros_like(y) if dy is None else dy


def check_elementwise(fn, shape, device, z) -> None:
    """f's result must look elementwise: a floating-point tensor of its input's shape, on its device (the user's
    promise is that each output element depends on the same input element only; that part is not checked)."""
    if isinstance(z, torch.Tensor) and z.shape == shape and z.device == device and z.is_floating_point():
        return
    got = (f"a {type(z).__name__}" if not isinstance(z, torch.Tensor) else
           f"a {z.dtype} tensor of shape {tuple(z.shape)} on {z.device}")
    raise ValueError(
        f"ckptnorm: activation {describe_callable(fn)} returned {got} for an input of shape {tuple(shape)} on "
        f"{device}; an activation module must be elementwise (a floating-point result of the same shape, on the "
        "same device); tip: apply it as a separate module after the layer (activation='identity')")


def describe_callable(fn) -> str:
    """A one-line name for an activation module or callable (reprs and messages)."""
    if isinstance(fn, torch.nn.Module):
        return f"{type(fn).__name__}({fn.extra_repr()})"
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
