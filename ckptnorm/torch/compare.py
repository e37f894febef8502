"""Side-by-side comparison of the strategies on a whole model (``compare``; ``make_block`` builds the one-block
model of ``ckptnorm compare --model block``).

``compare(model, example_inputs)`` runs whole training steps (forward, loss, backward; train mode; each row on its
own deep copy of the model, so the caller's model is untouched) for:

 - ``original``: the model as given (PyTorch's own BatchNorm and activation modules);
 - each uniform strategy via ``convert(model, strategy)`` (sites that cannot take a strategy fall back as
   ``convert`` reports; the row's note says how many);
 - ``plan``: a ``Plan`` from ``ckptnorm.torch.planner.plan``, applied with ``plan.apply(model)``, when given;
 - ``torch_checkpoint``: what users do today, ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
   around each residual block of the original model.  The blocks are the children of the model's top-level
   ``nn.Sequential`` children (``layer1[0]``, ``layer1[1]``, ... in torchvision's ResNets and the built-in
   ``preact_resnet``) when they hold most of the parameters; otherwise the children of the outermost
   ``nn.Sequential`` / ``nn.ModuleList`` containers found anywhere in the model (``encoder.layer1[0]``, ...,
   ``decoder.blocks[0]``, ... in segmentation-models-pytorch); failing that, each top-level child with parameters.
   A model where no blocks are found, or whose checkpointed blocks do not run, gets no such row: ``meta["skipped"]``
   and the table say why.
 - with ``compile=True`` / ``compile_budgets``: ``torch.compile`` rows (``ckptnorm.torch.compiled``):
   ``compile:original`` (default settings), ``compile:<strategy>`` (``COMPILE_OPTIONS``: the saving kept),
   ``compile:budget=B`` (the model as given, ``activation_memory_budget=B``).  Their compile time (first step minus median step) is a column of its own;
   Dynamo's caches are reset before each such row and after the comparison.

The loss of a step is ``ckptnorm.torch.zoo.training_loss``: summed over every output tensor (tuples, lists, dicts
such as torchvision's segmentation ``{"out", "aux"}``, ``.logits``), cross-entropy for a classifier's logits, the
mean of squares otherwise.

Per row: ``saved_bytes``, the bytes kept for backward (``SavedTensorsCounter``: exact, each storage once, parameters
and inputs excluded; for ``torch_checkpoint`` the block inputs that checkpoint keeps for its recomputation are
added, since its own saved-tensor hooks hide the rest); the reduction vs ``standard``; ``peak_bytes``, the memory
growth during one step (on CUDA exact: ``torch.cuda.max_memory_allocated`` minus what was allocated before; on CPU
approximate: the process's resident set size from ``/proc/self/statm``, sampled during the step after returning
freed heap memory to the OS, minus its value before; ``None`` where ``/proc`` is missing); the median step time and
its ratio to ``standard`` measured in the same run (the eager rows' steps in turn, one step of each row per round,
so that a shared machine's noise spreads over all of them; a compiled row's steps alone, under its settings); the
normwise relative error of the whole gradient against the float64 truth, the model as given run in float64 on the
same inputs (``||g - g64|| / ||g64||``, all parameters as one vector; so ``original`` shows PyTorch's own float32
error beside ours).  A model that does not run in float64
is compared with ``standard``'s gradient instead (``meta["grad_reference"]`` says which).  The step whose gradient is
compared runs under ``torch.manual_seed(0)`` in every row and in the truth, so that dropout draws the same masks
where PyTorch draws them the same way; the caller's RNG state is left as it was.

Steps, saved bytes and times come from ``harness`` (the same step ``plan`` and the benchmarks measure).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from ._recompute import SavedTensorsCounter
from .equivalence import normwise_error
from .harness import as_inputs, median_times, release_free_memory, rss, training_step


def make_block(in_channels=32, channels=64, activation="leaky_relu", activation_param=None):
    """``conv1x1 -> nn.BatchNorm2d -> activation module -> conv1x1`` in plain PyTorch: the unit the design note
    counts buffers for (``ckptnorm compare --model block``)."""
    from torch import nn

    from ..activations import get_activation
    act = get_activation(activation, activation_param)
    simple = {"identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "selu": nn.SELU, "silu": nn.SiLU,
              "gelu": nn.GELU, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "mish": nn.Mish,
              "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    with_param = {"leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "celu": nn.CELU}
    if act.name in simple:
        module = simple[act.name]()
    elif act.name in with_param:
        module = with_param[act.name](act.param)
    else:
        module = nn.GELU(approximate="tanh")  # gelu_tanh, the last of ckptnorm's activations
    return nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), module,
                         nn.Conv2d(channels, in_channels, 1, bias=False))


# ----------------------------------------------------------------------------------------------- whole models

DEFAULT_STRATEGIES = ("standard", "checkpoint", "efficient_checkpoint", "inplace_abn")


@dataclass
class Row:
    """One line of a ``Comparison``.  ``name``: ``original``, a strategy name, ``plan`` or ``torch_checkpoint``."""

    name: str
    saved_bytes: int
    peak_bytes: int | None
    step_seconds: float
    grad_error: float         # normwise over the whole gradient vs the float64 truth (meta["grad_reference"])
    note: str = ""
    reduction: float = 0.0    # 1 - saved_bytes / standard's
    time_ratio: float = 1.0   # step_seconds / standard's
    compile_seconds: float | None = None  # compiled rows: first step's time minus the median step's
    settings: dict = field(default_factory=dict)  # compiled rows: compile, strategy, budget, options

    @property
    def compiled(self) -> bool:
        return bool(self.settings.get("compile"))


@dataclass
class Comparison:
    """What ``compare`` measured: ``rows`` (``Row``) and ``meta`` (model, input, device, threads, repeats)."""

    rows: list
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def pareto(self) -> list:
        """The names of the rows no other row beats on both saved bytes and step time (the frontier)."""
        return [r.name for r in self.rows
                if not any(o.saved_bytes <= r.saved_bytes and o.step_seconds <= r.step_seconds
                           and (o.saved_bytes, o.step_seconds) != (r.saved_bytes, r.step_seconds) for o in self.rows)]

    def table(self) -> str:
        m = self.meta
        width = max([20] + [len(r.name) for r in self.rows])
        frontier = set(self.pareto())
        any_compiled = any(r.compiled for r in self.rows)
        lines = [f"model {m.get('model', '?')}, input {m.get('input', '?')}, {m.get('device', '?')}, "
                 f"{m.get('threads', '?')} threads, median of {m.get('repeats', '?')} training steps "
                 "(forward + loss + backward; eager rows timed in turn)",
                 f"  {'row':{width}s} {'saved MiB':>10s} {'reduction':>10s} {'peak MiB':>9s} {'step ms':>9s} "
                 f"{'time ratio':>11s} {'grad err':>9s}" + (f" {'compile s':>10s}" if any_compiled else "")]
        for r in self.rows:
            peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.2f}"
            line = (f"{'*' if r.name in frontier else ' '} {r.name:{width}s} {r.saved_bytes / 2**20:10.2f} "
                    f"{r.reduction:10.1%} {peak:>9s} {r.step_seconds * 1e3:9.1f} {r.time_ratio:10.2f}x "
                    f"{r.grad_error:9.1e}")
            if any_compiled:
                line += f" {'-' if r.compile_seconds is None else f'{r.compile_seconds:.1f}':>10s}"
            lines.append(line)
        lines.append("saved = bytes kept for backward (exact; parameters and inputs excluded); reduction and time "
                     f"ratio vs standard; grad err = normwise relative error of the whole gradient vs "
                     f"{m.get('grad_reference', 'standard')}; * = on the frontier (no other row keeps fewer bytes in "
                     "less time)")
        if any_compiled:
            lines.append("compile:* rows = torch.compile of that row's model; compile s = first step's time minus "
                         "the median step's (Dynamo + Inductor, forward and backward; shorter with warm caches)")
        lines.append("peak = " + ("growth of torch.cuda.max_memory_allocated during one step" if m.get("device", "")
                                  .startswith("cuda") else "growth of the process RSS during one step "
                                  "(approximate: sampled, allocator-dependent)"))
        lines.extend(f"  {r.name}: {r.note}" for r in self.rows if r.note)
        lines.extend(f"  {name}: skipped, {why}" for name, why in m.get("skipped", {}).items())
        return "\n".join(lines)

    __str__ = table

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": [asdict(r) for r in self.rows]}, indent=2)

    @classmethod
    def from_json(cls, text) -> "Comparison":
        data = json.loads(text)
        return cls([Row(**r) for r in data["rows"]], data.get("meta", {}))

    def plot(self, path) -> None:
        """Write a PNG: step time (x) vs saved-activation memory (y), one labelled point per row (eager: circles,
        compiled: crosses), the frontier (``pareto``) as a line."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("ckptnorm: plot needs matplotlib, which is not installed; tip: pip install matplotlib"
                              ", or use to_json() / --json instead") from None
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for r in self.rows:
            ax.scatter(r.step_seconds * 1e3, r.saved_bytes / 2**20, marker="x" if r.compiled else "o",
                       color="tab:orange" if r.compiled else "tab:blue")
            ax.annotate(r.name, (r.step_seconds * 1e3, r.saved_bytes / 2**20), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        frontier = set(self.pareto())
        front = sorted((r.step_seconds * 1e3, r.saved_bytes / 2**20) for r in self.rows if r.name in frontier)
        ax.plot([t for t, _ in front], [b for _, b in front], color="gray", linestyle="--", linewidth=1,
                label="frontier")
        ax.scatter([], [], marker="o", color="tab:blue", label="eager")
        if any(r.compiled for r in self.rows):
            ax.scatter([], [], marker="x", color="tab:orange", label="torch.compile")
        ax.legend(fontsize=8)
        ax.set_xlabel("training step time (ms, median)")
        ax.set_ylabel("saved activations (MiB)")
        ax.set_title(f"{self.meta.get('model', '')} {self.meta.get('input', '')}".strip(), fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)


_active_counter = None  # the SavedTensorsCounter of the step being measured, for torch_checkpoint's block inputs


def _checkpoint_forward(inner):
    def forward(*args, **kwargs):
        counter = _active_counter
        if counter is not None:
            for a in args:
                if isinstance(a, torch.Tensor):
                    storage = a.untyped_storage()
                    if storage.data_ptr() not in counter._excluded:
                        counter.storages[storage.data_ptr()] = storage.nbytes()
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return forward


def _nparams(module):
    return sum(p.numel() for p in module.parameters())


def _container_blocks(module, prefix=""):
    """The children with parameters of the outermost ``nn.Sequential`` / ``nn.ModuleList`` containers holding at
    least two such children, searched top-down (a found container is not searched further)."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList)
    found = []
    for name, child in module.named_children():
        qual = f"{prefix}{name}"
        if isinstance(child, containers):
            inner = [(f"{qual}.{b}", m) for b, m in child.named_children() if _nparams(m)]
            if len(inner) >= 2:
                found.extend(inner)
                continue
        if _nparams(child):
            found.extend(_container_blocks(child, f"{qual}."))
    return found


def _find_blocks(model):
    total = _nparams(model)
    blocks = [(f"{n}.{b}", m) for n, stage in model.named_children() if isinstance(stage, torch.nn.Sequential)
              for b, m in stage.named_children()]
    if blocks and 2 * sum(_nparams(m) for _, m in blocks) >= total:
        return blocks
    if isinstance(model, (torch.nn.Sequential, torch.nn.ModuleList)):
        blocks = [(n, m) for n, m in model.named_children() if _nparams(m)]
    else:
        blocks = _container_blocks(model)
    if not blocks:
        blocks = [(n, m) for n, m in model.named_children() if _nparams(m)]
    return blocks


def checkpoint_blocks(model):
    """Wrap blocks of ``model`` (in place) in non-reentrant ``torch.utils.checkpoint``; return their names (empty
    when none are found; see the module docstring for which).  Module names and state_dict keys do not change (the
    blocks' ``forward`` is wrapped).
    """
    import torch.utils.checkpoint  # noqa: F401
    blocks = _find_blocks(model)
    for _, m in blocks:
        m.forward = _checkpoint_forward(m.forward)
    return [n for n, _ in blocks]


def _peak(model, inputs, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        training_step(model, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    gc.collect()
    release_free_memory()
    base = rss()
    if base is None:
        return None
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        training_step(model, inputs, probe=lambda: peak.__setitem__(0, max(peak[0], rss())))
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - base


def _param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(grads, reference):
    """Normwise relative error of the whole gradient (every parameter, in name order, as one vector): a parameter
    whose true gradient is ~0 cannot dominate, as it would per parameter."""
    if any(n not in grads for n in reference):
        return float("inf")
    names = sorted(reference)
    return normwise_error([grads[n] for n in names], [reference[n] for n in names])


def _note(report):
    total = len(report)
    applied = sum(d.applied is not None for d in report)
    fallback = sum(d.applied is not None and d.requested is not None and d.applied != d.requested for d in report)
    text = f"{applied} of {total} sites converted"
    if fallback:
        text += f", {fallback} fell back to efficient_checkpoint"
    return text


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="ckptnorm compare", unit="step", leave=False)


def _seeded_step(model, inputs, device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        training_step(model, inputs)


def _float64_gradient(model, inputs, device):
    """(gradient, None) of one seeded step of the model as given in float64 (a deep copy; floating-point inputs
    cast), or (None, why) where the model does not run in float64."""
    try:
        m64 = copy.deepcopy(model).double().train()
        inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
        _seeded_step(m64, inputs64, device)
    except Exception as exc:  # noqa: BLE001 -- whatever float64 breaks in a user's model
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _param_grads(m64), None


def _measure(model, runner, inputs, device, repeats, bar, name, timed=True):
    """One row's figures: (gradients of the first step, its seconds, saved bytes, peak, median step seconds; None
    unless ``timed``).  ``runner`` is what is called (``model``, or ``model`` compiled); the gradients are read from
    ``model``."""
    global _active_counter

    def advance(n=1):
        if bar is not None:
            bar.update(n)
    start = time.perf_counter()
    _seeded_step(runner, inputs, device)  # warm-up (kernel compilation, allocator); its gradients are compared
    first = time.perf_counter() - start
    if bar is not None:
        bar.set_postfix_str(name)  # compiled, if it was
    grads = _param_grads(model)
    advance()
    counter = SavedTensorsCounter(exclude=[model, *[t for t in inputs if isinstance(t, torch.Tensor)]])
    _active_counter = counter
    try:
        training_step(runner, inputs, counter=counter)
    finally:
        _active_counter = None
    advance()
    peak = _peak(runner, inputs, device)
    advance()
    seconds = None
    if timed:
        (seconds,) = median_times([runner], inputs, repeats)
        advance(repeats)
    return grads, first, counter.saved_bytes, peak, seconds


def _measure_row(name, build, settings, inputs, device, repeats, bar):
    """``((saved bytes, peak, median seconds, gradients, note, compile seconds, settings), model)`` of one row: its
    model built, compiled when ``settings`` say so (``compiled``'s rules), measured.  An eager row's median seconds
    are None: its steps are timed later, in turn with the other eager rows (``compare``); a compiled row's steps are
    timed here, under its own settings."""
    from . import compiled
    if settings:
        compiled.prepare()
    model, note = build()
    model.train()
    runner = torch.compile(model, options=settings.get("options")) if settings else model
    with compiled.compile_settings(settings["budget"]) if settings else contextlib.nullcontext():
        grads, first, saved, peak, seconds = _measure(model, runner, inputs, device, repeats, bar, name,
                                                      timed=bool(settings))
        if settings:
            note = f"{note}; {compiled.describe(settings['budget'], settings.get('options'))}"
    return (saved, peak, seconds, grads, note, first - seconds if settings else None, settings), model


def compare(model, example_inputs, strategies=DEFAULT_STRATEGIES, *, plan=None, repeats=5, progress=True,
            include_original=True, include_torch_checkpoint=True, compile=False, compile_budgets=(),
            model_name=None) -> Comparison:
    """Measure training steps of ``model`` on ``example_inputs`` under each strategy; see the module docstring.

    ``standard`` is always measured (first: it is the baseline) even if not listed.  ``plan``: a ``Plan`` whose
    ``apply(model)`` gives the planned model (row ``plan``).  ``repeats``: timed steps per row (median shown).
    ``compile``: also ``compile:original`` (``torch.compile`` of the model as given, default settings) and
    ``compile:<strategy>`` for each strategy (its converted model compiled with ``compiled.COMPILE_OPTIONS``).  ``compile_budgets``: one row
    ``compile:budget=B`` per budget, the model as given compiled with ``activation_memory_budget=B`` (0 < B <= 1;
    see ``ckptnorm.torch.compiled``).  ``progress``: a tqdm progress bar on stderr when tqdm is installed.  The
    caller's model is not modified.
    """
    from ..strategies import get_strategy
    from . import compiled
    from .convert import convert
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"ckptnorm: compare needs an nn.Module, got {type(model).__name__}; tip: pass the model")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"ckptnorm: repeats must be a positive int, got {repeats!r}; tip: use repeats=5")
    budgets = [float(b) for b in compile_budgets]
    if any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"ckptnorm: compile budgets are fractions in (0, 1], got {list(compile_budgets)}; tip: "
                         "use e.g. compile_budgets=(1.0, 0.5, 0.2)")
    names = [get_strategy(s).name for s in strategies]
    names = ["standard"] + [n for n in dict.fromkeys(names) if n != "standard"]
    inputs = as_inputs(example_inputs)
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))

    variants = []  # (row name, builder () -> (model, note), settings: {} for an eager row)
    as_given = "the model as given (PyTorch's BN + act)"
    if include_original:
        variants.append(("original", lambda: (copy.deepcopy(model), as_given), {}))

    def build_converted(n):
        converted = convert(model, n)
        return converted, _note(converted.ckptnorm_report)
    for n in names:
        variants.append((n, lambda n=n: build_converted(n), {}))
    if plan is not None:
        def build_plan():
            planned = plan.apply(model)
            report = getattr(planned, "ckptnorm_report", None)
            return planned, ("per-site strategies of the plan" if report is None else _note(report))
        variants.append(("plan", build_plan, {}))
    if include_torch_checkpoint:
        def build_ckpt():
            wrapped = copy.deepcopy(model)
            blocks = checkpoint_blocks(wrapped)
            if not blocks:
                raise _Skip("no blocks found to wrap in torch.utils.checkpoint (no child module with parameters)")
            shown = ", ".join(blocks[:3]) + (", ..." if len(blocks) > 3 else "")
            return wrapped, f"torch.utils.checkpoint (non-reentrant) around {len(blocks)} blocks ({shown})"
        variants.append(("torch_checkpoint", build_ckpt, {}))
    if compile:
        variants.append(("compile:original", lambda: (copy.deepcopy(model), as_given),
                         {"compile": True, "strategy": None, "budget": None}))
        for n in names:
            variants.append((f"compile:{n}", lambda n=n: build_converted(n),
                             {"compile": True, "strategy": n, "budget": None, "options": compiled.COMPILE_OPTIONS}))
    for b in budgets:
        variants.append((f"compile:budget={b:g}", lambda: (copy.deepcopy(model), as_given),
                         {"compile": True, "strategy": None, "budget": b}))

    # The caller's RNG state is left as it was (dropout in the steps draws from it).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        truth, why_not = _float64_gradient(model, inputs, device)
        bar = _progress(len(variants) * (repeats + 3), progress)
        rows, measured, skipped = [], {}, {}
        eager = {}  # row name -> model, for the steps timed in turn
        try:
            for name, build, settings in variants:
                if bar is not None:
                    bar.set_postfix_str(f"{name} (compiling)" if settings else name)
                try:
                    measured[name], row_model = _measure_row(name, build, settings, inputs, device, repeats, bar)
                    if not settings:
                        eager[name] = row_model
                except Exception as exc:  # noqa: BLE001 -- torch_checkpoint is a baseline, not ckptnorm: skipped
                    if name != "torch_checkpoint":
                        raise
                    skipped[name] = (str(exc) if isinstance(exc, _Skip) else
                                     f"the checkpointed blocks do not run ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''})")
                    if bar is not None:
                        bar.update(repeats + 3)
            # The eager rows' steps, round-robin: a busy moment of a shared machine costs every row alike, and the
            # time ratios stay fair (each row timed alone would take all of a disturbance that lands on it).
            if bar is not None:
                bar.set_postfix_str("timing the eager rows in turn")
            for name, seconds in zip(eager, median_times(list(eager.values()), inputs, repeats)):
                measured[name] = (*measured[name][:2], seconds, *measured[name][3:])
            if bar is not None:
                bar.update(len(eager) * repeats)
            eager.clear()
        finally:
            if bar is not None:
                bar.close()
            if compile or budgets:
                torch._dynamo.reset()  # the compiled rows' graphs are not kept alive after the comparison
    reference = truth if truth is not None else measured["standard"][3]
    std_saved, std_time = measured["standard"][0], measured["standard"][2]
    for name, (saved, peak, seconds, grads, note, compile_seconds, settings) in measured.items():
        rows.append(Row(name, saved, peak, seconds, _grad_error(grads, reference), note,
                        1.0 - saved / std_saved if std_saved else 0.0, seconds / std_time, compile_seconds,
                        settings))
    shape = "x".join(str(d) for d in inputs[0].shape) if isinstance(inputs[0], torch.Tensor) else "?"
    meta = {"model": model_name or type(model).__name__, "input": f"{shape} {str(inputs[0].dtype)[6:]}",
            "device": str(device), "threads": torch.get_num_threads(), "repeats": repeats,
            "torch": torch.__version__}
    meta["grad_reference"] = ("the float64 truth" if truth is not None else
                              f"standard (the model does not run in float64: {why_not})")
    if skipped:
        meta["skipped"] = skipped
    return Comparison(rows, meta)


class _Skip(Exception):
    """A row that does not apply to the model (its message says why)."""
