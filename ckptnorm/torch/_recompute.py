"""Re-materialize z = phi(BN(x)) for its consumers instead of letting them keep it.

``checkpoint`` and ``efficient_checkpoint`` keep x.  Their output z is usually kept too -- by the next layer (a
conv keeps its input) -- which would cancel the saving.  So when an op saves one of our outputs z for backward,
it keeps a ``Recipe`` (x, per-channel statistics, parameters) instead, and z is recomputed when that backward
unpacks it.  This is done with PyTorch's saved-tensor hooks, without any wrapper or context asked of the user:

 1. Every such output z is registered here (weakly) together with its recipe.
 2. While a registered z is alive, this thread's default saved-tensor hooks are ``pack_hook``/``unpack_hook``,
    pushed only when no other hooks are active (so they sit at the bottom of the stack and a user's context,
    ``torch.utils.checkpoint`` included, stays on top and keeps working: inside it, its own hooks decide).
 3. ``pack_hook`` swaps a tensor for a recipe only if it is a registered z, unchanged since forward (same memory,
    metadata and version); anything else passes through untouched.
 4. When the last registered z of the thread dies, the hooks are popped again (``torch.func`` transforms refuse
    to run while any saved-tensor hooks are installed).

Users composing their own saved-tensor hooks can call ``pack_hook``/``unpack_hook`` inside theirs to keep the
saving; ``SavedTensorsCounter`` below does exactly that to measure what is kept.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks

from . import _arrays

_registry: dict = {}              # data_ptr of a live z -> Recipe
_thread_state = threading.local()  # .pushed: our hooks are on this thread's stack; .live: registered z alive


class Recipe:
    """How to recompute one output z from its input x (what a consumer keeps instead of z)."""

    def __init__(self, z, x, layout, cfg, plan, beta):
        self.z_ref = weakref.ref(z)
        self.z_version = z._version
        self.z_meta = (z.shape, z.stride(), z.dtype, z.device)
        self.x = x.detach()
        self.x_version = x._version
        self.layout, self.backend, self.act, self.eps = layout, cfg.backend, cfg.act, cfg.eps
        self.beta = beta
        # checkpoint recomputes the statistics from x (naive); efficient_checkpoint reuses what forward computed.
        self.mean, self.scale = (None, None) if plan.keep == ("x",) else (plan.mean, plan.scale)
        self.gamma_over_invstd = plan.scale / plan.invstd  # gamma, to rebuild scale after recomputing statistics
        self.owner = threading.get_ident()
        self._last = None

    def matches(self, t) -> bool:
        z = self.z_ref()
        return (z is not None and t._version == self.z_version
                and (t.shape, t.stride(), t.dtype, t.device) == self.z_meta)

    def kept_tensors(self):
        return (self.x,)

    def materialize(self) -> torch.Tensor:
        if self.x._version != self.x_version:
            raise RuntimeError(
                "ckptnorm: the input of a BatchNormAct layer was modified in place after its forward, so its output "
                "cannot be recomputed for backward; tip: avoid in-place ops on that input, or use "
                "strategy='standard' for that layer")
        z = self._last() if self._last is not None else None
        if z is not None:  # several consumers unpacking the same z: compute it once
            return z
        x_arr = _arrays.activation_view(self.x, self.layout)
        mean, scale = self.mean, self.scale
        if mean is None:
            from ckptnorm.strategies import batch_statistics
            mean, _, invstd, _, _ = batch_statistics(self.backend, x_arr, self.layout, self.eps)
            scale = self.gamma_over_invstd * invstd
        z = torch.empty_like(self.x)
        self.backend.normalize_act(x_arr, _arrays.activation_view(z, self.layout), self.layout, mean, scale,
                                   self.beta, self.act)
        self._last = weakref.ref(z)
        return z


def pack_hook(t):
    """Saved-tensor pack hook: a registered, unchanged output z becomes its ``Recipe``; anything else is kept."""
    try:
        recipe = _registry.get(t.data_ptr())
    except RuntimeError:  # tensors without storage (e.g. some subclasses) are never ours
        return t
    if recipe is not None and recipe.matches(t):
        return recipe
    return t


def unpack_hook(packed):
    return packed.materialize() if isinstance(packed, Recipe) else packed


def _hooks_are_ours(top) -> bool:
    return top is not None and top[0] is pack_hook


def register(z: torch.Tensor, recipe: Recipe) -> None:
    """Make consumers of ``z`` keep ``recipe`` instead of ``z`` (see module docstring, points 1-2)."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return  # e.g. inside torch.func transforms: z is simply kept
    key = z.data_ptr()
    _registry[key] = recipe
    state = _thread_state
    state.live = getattr(state, "live", 0) + 1
    weakref.finalize(z, _on_output_freed, key, recipe, state)
    if not getattr(state, "pushed", False) and torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
        torch._C._autograd._push_saved_tensors_default_hooks(pack_hook, unpack_hook)
        state.pushed = True


def _on_output_freed(key, recipe, state) -> None:
    if _registry.get(key) is recipe:
        del _registry[key]
    state.live -= 1
    if recipe.owner == threading.get_ident():
        release_hooks_if_idle()


def release_hooks_if_idle() -> None:
    """Pop our hooks from this thread's stack when no registered z is alive and they are on top."""
    state = _thread_state
    if getattr(state, "pushed", False) and getattr(state, "live", 0) <= 0:
        if _hooks_are_ours(torch._C._autograd._top_saved_tensors_default_hooks(False)):
            torch._C._autograd._pop_saved_tensors_default_hooks()
            state.pushed = False


class SavedTensorsCounter(saved_tensors_hooks):
    """Context manager counting the bytes kept for backward, each storage once, with recomputation in effect.

    ``exclude``: modules and/or tensors whose storages are not counted (parameters and buffers, typically).
    ``saved_bytes`` is the total after the forward ran inside the context.
    """

    def __init__(self, exclude=()):
        self.storages: dict = {}
        self._excluded = set()
        for item in exclude if isinstance(exclude, (list, tuple)) else (exclude,):
            tensors = (list(item.parameters()) + list(item.buffers())) if isinstance(item, torch.nn.Module) else [item]
            self._excluded.update(t.untyped_storage().data_ptr() for t in tensors)
        super().__init__(self._pack, unpack_hook)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, t):
        packed = pack_hook(t)
        for tensor in packed.kept_tensors() if isinstance(packed, Recipe) else (packed,):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._excluded:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return packed

    @property
    def saved_bytes(self) -> int:
        return sum(self.storages.values())
