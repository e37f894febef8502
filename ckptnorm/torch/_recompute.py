"""Re-materialize z = phi(BN(x)) for its consumers instead of letting them keep it.

``checkpoint`` and ``efficient_checkpoint`` keep x.  Their output z is usually kept too -- by the next layer (a
conv keeps its input) -- which would cancel the saving.  So when an op saves one of our outputs z for backward,
it keeps a ``Recipe`` (x, per-channel statistics, parameters) instead, and z is recomputed when that backward
unpacks it.  This is done with PyTorch's saved-tensor hooks, without any wrapper or context asked of the user:

 1. The strategy declares per call what a recipe needs (``CallDecision.recipe``, an ``OutputRecipe``: x alone,
    statistics recomputed, or x and this call's statistics); the forward builds the ``Recipe`` from it, and every
    such output z is registered (weakly) with it in ``HOOKS``, the one ``HookState`` of the process.
 2. While a registered z is alive, its thread's default saved-tensor hooks are ``pack_hook``/``unpack_hook``,
    pushed only when no other hooks are active (so they sit at the bottom of the stack and a user's context,
    ``torch.utils.checkpoint`` included, stays on top and keeps working: inside it, its own hooks decide).
 3. ``pack_hook`` swaps a tensor for a recipe only if it is a registered z, unchanged since forward (same memory,
    metadata and version); anything else passes through untouched.
 4. When the last registered z of a thread dies, that thread's hooks are popped again (``torch.func`` transforms
    refuse to run while any saved-tensor hooks are installed); a z freed on another thread, during a backward or
    under a user's hooks leaves the pop to the owner thread's next ckptnorm call.
 5. Autograd skips its in-place (version) check for saved tensors when hooks are installed, so tensors passing
    through our hooks are wrapped in ``Kept``, which makes that check on unpack (and holds a detached alias: see
    ``Kept``).
 6. At a residual site, z = phi(BN(x) + r) needs r as well.  The recipe holds r the way a consumer would: the
    recipe of r when r is itself a registered output (the previous block's, typically), else r itself (kept by
    the site anyway).  So a stage of residual blocks keeps one buffer per block, and recomputing a block's output
    walks back the chain of recipes.  The chain is at most ``MAX_RESIDUAL_CHAIN`` long: a longer one would make
    backward's recomputation quadratic in the stage's depth, so the output that would extend it is not registered
    (its consumers keep it) and the next chain starts there.
 7. Backward reaches a block's output twice (the next block's residual site, then its first conv) and the block
    before it next, whose output the walk just recomputed on its way: so each thread holds its last
    ``RECENT_CHAIN_OUTPUTS`` recomputed residual-site outputs, each until a newer one takes its place or its
    recipe dies with the graph (a bounded transient: that many buffers, in backward only).

Users composing their own saved-tensor hooks can call ``pack_hook``/``unpack_hook`` inside theirs to keep the
saving; ``SavedTensorsCounter`` below does exactly that to measure what is kept.

A layer whose activation is a module ckptnorm has no kernel for (``module_call.ModuleCall``) computes y = BN(x) [+ r]
with the kernels and z = f(y) in PyTorch; its recipe recomputes y the same way and re-runs f (no graph, same RNG
state).
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks

from ..strategies import OutputRecipe
from . import _arrays, _compat



def _modified_in_place(what, version, expected) -> RuntimeError:
    """The error autograd raises for a saved tensor changed in place (it skips that check while hooks are set)."""
    return RuntimeError(
        f"ckptnorm: one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"{what} is at version {version}; expected version {expected} instead. tip: find the in-place op (e.g. "
        f"with torch.autograd.set_detect_anomaly(True)) and make it out of place")


# Rule 6: the longest chain of residual-site recipes.  Recomputing the output at depth d costs d elementwise passes,
# so a stage of n blocks costs at most n * MAX_RESIDUAL_CHAIN passes in backward and keeps n / MAX_RESIDUAL_CHAIN
# outputs more than the chain would.  16 covers every stage of the common ResNets but ResNet-101/152's third.
MAX_RESIDUAL_CHAIN = 16
# Rule 7: recomputed residual-site outputs held per thread.  2 halves the walks again (the block before reuses what
# the walk computed on its way); more would trade a buffer each for less recomputation.
RECENT_CHAIN_OUTPUTS = 2


class Recipe:
    """How to recompute one output z from its input x [and residual r] (what a consumer keeps instead of z), built
    in forward from the strategy's declared ``decision.recipe`` and bound to z by ``HookState.register``."""

    def __init__(self, x, layout, cfg, decision, beta, residual=None):
        self.z_ref = self.z_version = self.z_meta = None
        # rule 6: r's own recipe when r is a registered output, else r itself (version-checked like a saved tensor)
        self.residual = None if residual is None else (HOOKS.recipe_of(residual) or Kept(residual))
        self.depth = 0 if residual is None else 1 + getattr(self.residual, "depth", 0)
        self.x = x.detach()
        self.x_version = x._version
        self.layout, self.act, self.eps = layout, cfg.act, cfg.eps
        self.module = cfg.module  # a ModuleCall (then act is identity: z = f(y)), or None
        self.beta = beta
        if decision.recipe is OutputRecipe.RECOMPUTE_STATISTICS:
            self.mean = self.scale = None
        elif decision.recipe is OutputRecipe.REUSE_STATISTICS:
            self.mean, self.scale = decision.mean, decision.scale
        else:
            raise ValueError(f"ckptnorm: no recipe for {decision.recipe}; tip: build a Recipe only when the strategy "
                             "declares one (decision.recipe)")
        self.gamma_over_invstd = decision.scale / decision.invstd  # gamma: rebuilds scale from recomputed statistics
        self.owner = threading.get_ident()
        self._last = None
        self.held = None  # rule 7: a strong reference to the recomputed z while this recipe is among the recent ones

    def bind(self, z) -> None:
        """The output this recipe stands for: only that tensor, unchanged, is swapped for the recipe."""
        self.z_ref = weakref.ref(z)
        self.z_version = z._version
        self.z_meta = (z.shape, z.stride(), z.dtype, z.device)

    def matches(self, t) -> bool:
        z = self.z_ref() if self.z_ref is not None else None
        return (z is not None and t._version == self.z_version
                and (t.shape, t.stride(), t.dtype, t.device) == self.z_meta)

    def kept_tensors(self):
        return (self.x,) + (() if self.residual is None else self.residual.kept_tensors())

    def materialize(self) -> torch.Tensor:
        z = self.z_ref()
        if z is not None and z._version != self.z_version:  # what autograd would say had z itself been kept
            raise _modified_in_place("the output of a BatchNormAct layer", z._version, self.z_version)
        if self.x._version != self.x_version:
            raise RuntimeError(
                "ckptnorm: the input of a BatchNormAct layer was modified in place after its forward, so its output "
                "cannot be recomputed for backward; tip: avoid in-place ops on that input, or use "
                "strategy='standard' for that layer")
        z = self._last() if self._last is not None else None
        if z is not None:  # several consumers unpacking z while the first recomputation is alive: reuse it
            return z
        backend = _arrays.backend_for(self.x)  # on the current stream of the backward that unpacks z
        x_arr = _arrays.activation_view(self.x, self.layout)
        mean, scale = self.mean, self.scale
        if mean is None:
            from ckptnorm.channel_stats import batch_statistics
            mean, _, invstd, _, _ = batch_statistics(backend, x_arr, self.layout, self.eps)
            scale = self.gamma_over_invstd * invstd
        r_arr = None
        if self.residual is not None:  # rule 6: r recomputed first when it is itself a recipe
            r_arr = _arrays.gradient_view(self.residual.materialize(), self.layout)
        z = torch.empty_like(self.x)
        backend.normalize_act(x_arr, _arrays.activation_view(z, self.layout), self.layout, mean, scale, self.beta,
                              self.act, r_arr)
        del r_arr  # r (a recomputed one included) is not held past this call
        if self.module is not None:
            z = self.module.rerun(z)
        self._last = weakref.ref(z)
        if self.residual is not None:
            HOOKS.hold_recent(self, z)
        return z


class Kept:
    """A saved tensor that our hooks pass through unchanged, with its version when it was saved.

    Autograd checks saved tensors for in-place modification only when no hooks are installed, so while ours are
    we make that check ourselves in ``unpack_hook`` (never a silently wrong gradient).
    """

    __slots__ = ("tensor", "version")

    def __init__(self, tensor):
        # Detached (same memory and version counter), because autograd may save a node's own output: kept with its
        # grad_fn, the node would own a reference to itself through this object, a cycle that Python's garbage
        # collector cannot see (the graph is C++) -- the graph, our registered outputs and our hooks would never be
        # released.  Autograd re-attaches the grad_fn when it unpacks.
        self.tensor, self.version = tensor.detach(), tensor._version

    def kept_tensors(self):
        return (self.tensor,)

    def materialize(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise _modified_in_place(f"a tensor of shape {tuple(self.tensor.shape)}", self.tensor._version,
                                     self.version)
        return self.tensor


def pack_hook(t):
    """Saved-tensor pack hook: a registered, unchanged output z becomes its ``Recipe``; anything else is kept."""
    return HOOKS.recipe_of(t) or Kept(t)


def unpack_hook(packed):
    return packed.materialize()


in_backward = _compat.graph_task_running
_top_hooks = _compat.top_saved_tensors_hooks


class HookState:
    """The one owner of ckptnorm's saved-tensor hooks (module docstring, rules 1-4): which outputs are registered,
    how many of each thread's are alive, and when this thread's hooks are pushed and popped.

    The hook stack is per thread, so only the thread that registered an output pushes or pops for it; an output
    freed on another thread (a tensor handed to a data-loader or logging thread) lowers its owner's count, and the
    owner pops at its next ckptnorm call.
    """

    def __init__(self):
        self.registry: dict = {}                   # data_ptr of a live z -> Recipe (any thread)
        self._live: dict = {}                      # thread id -> registered outputs of that thread still alive
        self._lock = threading.Lock()
        self._thread = threading.local()           # per thread: recently recomputed residual outputs (rule 7)

    def live(self, thread=None) -> int:
        """Registered outputs of ``thread`` (default: this one) still alive."""
        return self._live.get(threading.get_ident() if thread is None else thread, 0)

    def recipe_of(self, t: torch.Tensor):
        """The recipe of ``t`` when it is a registered output, unchanged since forward (rule 3), else None."""
        try:
            recipe = self.registry.get(t.data_ptr())
        except RuntimeError:  # tensors without storage (e.g. some subclasses) are never ours
            return None
        return recipe if recipe is not None and recipe.matches(t) else None

    def hold_recent(self, recipe, z) -> None:
        """Rule 7: ``recipe`` keeps its recomputed ``z`` until ``RECENT_CHAIN_OUTPUTS`` newer ones of this thread
        replace it; the queue holds the recipes weakly, so a held z never outlives its recipe."""
        if RECENT_CHAIN_OUTPUTS <= 0:
            return
        recent = getattr(self._thread, "recent", None)
        if recent is None:
            recent = self._thread.recent = []
        recipe.held = z
        recent.append(weakref.ref(recipe))
        while len(recent) > RECENT_CHAIN_OUTPUTS:
            old = recent.pop(0)()
            if old is not None and old is not recipe:
                old.held = None

    def register(self, z: torch.Tensor, recipe: Recipe) -> None:
        """Make consumers of ``z`` keep ``recipe`` instead of ``z`` (rules 1-2, 6)."""
        if not _compat.saved_tensors_hooks_enabled():
            return  # e.g. inside torch.func transforms: z is simply kept
        if recipe.depth > MAX_RESIDUAL_CHAIN:
            return  # rule 6: z is kept, and the next block's recipe starts a new chain from it
        recipe.bind(z)
        key, owner = z.data_ptr(), threading.get_ident()
        with self._lock:
            self.registry[key] = recipe
            self._live[owner] = self._live.get(owner, 0) + 1
        weakref.finalize(z, self._on_output_freed, key, recipe, owner)
        # Only onto an empty stack (bottom), and not during a backward: autograd runs a backward on a copy of the
        # thread's hook stack and restores the original afterwards, so a push or pop there would be lost.
        if _top_hooks() is None and not in_backward():
            _compat.push_saved_tensors_hooks(pack_hook, unpack_hook)

    def _on_output_freed(self, key, recipe, owner) -> None:
        with self._lock:
            if self.registry.get(key) is recipe:
                del self.registry[key]
            left = self._live.get(owner, 0) - 1
            if left > 0:
                self._live[owner] = left
            else:
                self._live.pop(owner, None)
        if owner == threading.get_ident():
            self.release_if_idle()

    def release_if_idle(self) -> None:
        """Pop this thread's hooks when none of its registered outputs is alive and they are on top of its stack.

        Called when a registered z dies and at every ckptnorm forward; when a z dies under a user's hooks, during
        a backward or on another thread, the pop waits for the next ckptnorm call on the owner thread.
        """
        if self.live() <= 0 and not in_backward():
            top = _top_hooks()
            if top is not None and top[0] is pack_hook:
                _compat.pop_saved_tensors_hooks()


HOOKS = HookState()


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
        for tensor in packed.kept_tensors():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._excluded:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return packed

    @property
    def saved_bytes(self) -> int:
        return sum(self.storages.values())
