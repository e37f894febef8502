"""``check_equivalence``: does a converted model compute what the original computes, in float64?

``check_equivalence(original, converted, inputs)`` works on float64 deep copies of both models (the caller's models,
and the global random number generator, are left as they were):

1. the state_dict keys must be identical, and the original's state_dict is loaded into the converted copy with
   ``strict=True`` (a mismatch raises ``ValueError``: that is a conversion bug, not a numerical difference);
2. eval mode: one forward (no gradients), outputs compared;
3. ``steps`` training steps: train mode, ``torch.manual_seed(seed + step)`` before each model's forward (so dropout
   and stochastic depth draw the same masks), outputs compared, ``training_loss`` (``ckptnorm.torch.zoo``: summed
   over every output tensor, dict and tuple outputs included) backpropagated, parameter gradients compared; between
   steps each model takes a plain SGD step (learning rate ``lr``) with its own gradients;
4. the running statistics after the last step compared.

Every error is normwise relative over one concatenated vector: ``||a - b|| / ||b||`` with b the original's (the
absolute ``||a - b||`` where ``||b|| = 0``; NaN counts as ``inf``) -- all floating-point output tensors of a
forward, in order; all parameter gradients in name order (a parameter without a gradient counts as zeros), so that
a parameter whose true gradient is ~0 cannot dominate; all BatchNorm ``running_mean`` and ``running_var`` buffers
in name order.  ``num_batches_tracked`` must match exactly (``running_stats`` is ``inf`` otherwise, and ``notes``
say where).  The largest error over the steps is kept; ``max`` is the largest of the four.

Checking several conversions of one model: ``ref = trace(original, inputs)`` runs the original once, and
``check_equivalence(original, converted, inputs, reference=ref)`` reuses it (same ``steps``, ``seed``, ``lr``).

Below float64 the two cannot agree to 1e-10; there the bound is relative to PyTorch's own rounding:
``error_bound(native_error, dtype)`` is how far a ckptnorm result may be from a float64 truth computed from the same
rounded inputs, given PyTorch's native BN + activation's error at that dtype (``NATIVE_ERROR_BOUNDS``; the
equivalence and mixed-precision tests and ``benchmarks.gpu_check`` all use it).
"""
from __future__ import annotations

import collections
import copy
import math
from dataclasses import dataclass, field

import torch

from .zoo import flatten_outputs, training_loss

__all__ = ["Equivalence", "NATIVE_ERROR_BOUNDS", "Trace", "check_equivalence", "error_bound", "max_relative_error",
           "normwise_error", "trace"]

_STAT_SUFFIXES = ("running_mean", "running_var")

# dtype: (factor, floor).  A ckptnorm result's error (max|a - b| / max|b| against the float64 truth) may be
# ``factor`` times PyTorch's own error at that dtype, floored at the format's unit roundoff: no result stored in the
# format is more exact than its rounding, and below that the ratio of two errors is noise.  The factors are the
# project's acceptance bounds: 2x for float32, 1.5x for the half formats (float32 parameters and statistics).
NATIVE_ERROR_BOUNDS = {
    torch.float32: (2.0, 2.0 ** -24),
    torch.float16: (1.5, 2.0 ** -11),
    torch.bfloat16: (1.5, 2.0 ** -8),
}


def error_bound(native_error, dtype) -> float:
    """The largest error (``max_relative_error`` against a float64 truth) a ckptnorm result at ``dtype`` may have,
    given PyTorch's native error on the same inputs; see ``NATIVE_ERROR_BOUNDS``."""
    factor, floor = NATIVE_ERROR_BOUNDS[dtype]
    return factor * max(native_error, floor)


def max_relative_error(got, truth) -> float:
    """``max|got - truth| / max|truth|`` in float64 (the absolute error where truth is 0; inf for a NaN)."""
    got, truth = got.detach().double().cpu(), truth.detach().double().cpu()
    err = float((got - truth).abs().max()) if truth.numel() else 0.0
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    err = err / scale if scale > 0 else err
    return math.inf if math.isnan(err) else err


def normwise_error(got, truth) -> float:
    """``||got - truth|| / ||truth||`` over sequences of tensors taken as one float64 vector (inf for a NaN)."""
    return _rel(_flat(got), _flat(truth))


@dataclass(frozen=True)
class Equivalence:
    """Normwise relative errors of a converted model vs the original (float64); see the module docstring."""

    eval_output: float
    train_output: float
    grad: float
    running_stats: float
    max: float
    steps: int = 1
    notes: tuple = field(default_factory=tuple)  # structural differences found (output count, num_batches_tracked)

    def ok(self, tol=1e-10) -> bool:
        return self.max <= tol

    def __str__(self):
        text = (f"eval output {self.eval_output:.2e}, train output {self.train_output:.2e}, grad {self.grad:.2e}, "
                f"running stats {self.running_stats:.2e} (max {self.max:.2e}, {self.steps} step"
                f"{'s' if self.steps != 1 else ''})")
        return text + "".join(f"; {n}" for n in self.notes)


@dataclass
class Trace:
    """What one float64 run of a model recorded (``trace``): outputs, gradients, running statistics."""

    keys: list                 # state_dict keys, in order
    state: dict                # the float64 state_dict the run started from
    param_names: list          # sorted
    eval_out: list             # floating-point output tensors of the eval forward
    train_out: list            # per step: the output tensors
    grads: list                # per step: all parameter gradients, concatenated in name order
    stats: torch.Tensor        # running_mean / running_var buffers after the last step, concatenated
    counts: dict               # num_batches_tracked per BN
    steps: int
    seed: int
    lr: float


def _rel(got, ref) -> float:
    if got.shape != ref.shape:
        return math.inf
    diff = float((got - ref).norm())
    scale = float(ref.norm())
    err = diff / scale if scale > 0 else diff
    return math.inf if math.isnan(err) else err  # a NaN must not pass a tolerance


def _flat(tensors):
    parts = [t.detach().reshape(-1).to(torch.float64) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _outputs(out):
    return [t.detach().clone() for t in flatten_outputs(out) if t.is_floating_point()]


def _output_error(got, ref, where, notes) -> float:
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        notes.append(f"{where}: output tensors differ in number or shape ({[tuple(t.shape) for t in got]} vs "
                     f"{[tuple(t.shape) for t in ref]})")
        return math.inf
    return _rel(_flat(got), _flat(ref))


def _as_inputs(inputs):
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(t.detach().to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in items)


def _check_module(m, what):
    if not isinstance(m, torch.nn.Module):
        raise TypeError(f"ckptnorm: check_equivalence needs nn.Modules, got {type(m).__name__} as {what}; tip: "
                        "pass the model and convert(model, strategy)")


def _run(model, xs, steps, seed, lr, state=None):
    """Run a float64 deep copy of ``model`` (with ``state`` loaded, strict) and record a ``Trace``."""
    m = copy.deepcopy(model).double()
    if state is not None:
        m.load_state_dict(state, strict=True)
    keys = list(m.state_dict())
    start = state
    if state is None:  # a copy that keeps the state_dict's version metadata (some modules check it on load)
        current = m.state_dict()
        start = collections.OrderedDict((k, v.detach().clone()) for k, v in current.items())
        start._metadata = copy.deepcopy(getattr(current, "_metadata", {}))
    params = dict(m.named_parameters())
    names = sorted(params)
    device = next((t.device for t in xs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    eval_out, train_out, grads = None, [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        m.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            eval_out = _outputs(m(*xs))
        m.train()
        for step in range(steps):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(seed + step)
            out = m(*xs)
            loss = training_loss(out)
            if loss is None:
                raise TypeError("ckptnorm: check_equivalence needs a model output with floating-point tensors; tip: "
                                "wrap the model so that it returns its output tensors")
            loss.backward()
            train_out.append(_outputs(out))
            del out, loss
            grads.append(_flat([params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])
                                for n in names]))
            if step + 1 < steps:
                with torch.no_grad():
                    for p in m.parameters():
                        if p.grad is not None:
                            p.sub_(lr * p.grad)
    buffers = dict(m.named_buffers())
    stats = _flat([buffers[n] for n in sorted(buffers) if n.endswith(_STAT_SUFFIXES)])
    counts = {n: int(b) for n, b in buffers.items() if n.endswith("num_batches_tracked")}
    return Trace(keys, start, names, eval_out, train_out, grads, stats, counts, steps, seed, lr)


def trace(original, inputs, *, steps=1, seed=0, lr=0.01) -> Trace:
    """Run ``original`` as ``check_equivalence`` does (float64 deep copy) and record what it computed, for
    ``check_equivalence(..., reference=...)`` to compare several converted models against one run."""
    _check_module(original, "original")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ckptnorm: steps must be a positive int, got {steps!r}; tip: use steps=1")
    return _run(original, _as_inputs(inputs), steps, seed, lr)


def check_equivalence(original, converted, inputs, *, steps=1, seed=0, lr=0.01, reference=None) -> Equivalence:
    """Compare ``converted`` with ``original`` on ``inputs`` (a tensor or a tuple of them) in float64; see the module
    docstring.  ``reference``: a ``trace(original, inputs, ...)`` to reuse instead of running ``original`` again.
    Returns an ``Equivalence``; raises ``ValueError`` when the state_dict keys or parameters differ."""
    _check_module(original, "original")
    _check_module(converted, "converted")
    if reference is None:
        reference = trace(original, inputs, steps=steps, seed=seed, lr=lr)
    elif (reference.steps, reference.seed, reference.lr) != (steps, seed, lr):
        raise ValueError(f"ckptnorm: the reference trace ran with steps={reference.steps}, seed={reference.seed}, "
                         f"lr={reference.lr}, not steps={steps}, seed={seed}, lr={lr}; tip: pass the same arguments "
                         "to trace and check_equivalence")
    new_keys = list(converted.state_dict())
    if set(reference.keys) != set(new_keys):
        missing = [k for k in reference.keys if k not in set(new_keys)]
        extra = [k for k in new_keys if k not in set(reference.keys)]
        raise ValueError(f"ckptnorm: the converted model's state_dict keys differ from the original's (missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}); tip: convert must keep every key, so this is a "
                         "conversion bug: report it with the model")
    if sorted(n for n, _ in converted.named_parameters()) != reference.param_names:
        raise ValueError("ckptnorm: the converted model's parameters differ from the original's; tip: convert must "
                         "keep every parameter, so this is a conversion bug: report it with the model")
    got = _run(converted, _as_inputs(inputs), steps, seed, lr, state=reference.state)
    notes = []
    eval_err = _output_error(got.eval_out, reference.eval_out, "eval", notes)
    train_err = max(_output_error(g, r, f"train step {k}", notes)
                    for k, (g, r) in enumerate(zip(got.train_out, reference.train_out)))
    grad_err = max(_rel(g, r) for g, r in zip(got.grads, reference.grads))
    stats_err = _rel(got.stats, reference.stats)
    bad = [n for n in reference.counts if got.counts.get(n) != reference.counts[n]]
    if bad:
        stats_err = math.inf
        notes.append("num_batches_tracked differs at " + ", ".join(
            f"{n} ({got.counts.get(n)} vs {reference.counts[n]})" for n in bad[:5]) + (", ..." if len(bad) > 5 else ""))
    worst = max(eval_err, train_err, grad_err, stats_err)
    return Equivalence(eval_err, train_err, grad_err, stats_err, worst, steps, tuple(notes))
