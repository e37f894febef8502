"""``convert``: replace a model's BatchNorm (+ activation) sites by ckptnorm layers with chosen strategies.

The model keeps its class, its ``forward`` code, methods and attributes: ``convert`` returns a deep copy (or, with
``inplace_module=True``, the model itself) in which BatchNorm modules are swapped for ``BatchNormAct*d`` layers
inside the module tree, with the same names, so state_dict keys are unchanged and a checkpoint of the original
loads with ``strict=True``.  Rules (``sites`` and ``graph`` hold the analysis behind them):

 1. An activation module called once, right after its BN, is fused by swapping it for ``nn.Identity``.
 2. Any other fusion -- a functional or shared activation, a residual site ``BN -> add(r) -> act`` fused into
    ``layer(x, r)`` -- rewrites the forward of the one module that calls the BN, and only when that forward traces
    to the same graph in training and eval mode with no optional arguments; the report names every rewritten
    module.  Otherwise the site is converted without its activation, and the report says why.
 3. A strategy that keeps the layer's output (``inplace_abn``) is not used where an op may modify that output in
    place afterwards (``out += shortcut``, an unfused ``ReLU(inplace=True)``), or where the output reaches code that
    was not traced: such sites get ``efficient_checkpoint``, which keeps the input instead.
 4. A site ckptnorm cannot prove it computes identically (a norm-act module with a drop layer, an activation it
    cannot run, a frozen BN) is left as it was, with the reason in ``ckptnorm_report``.

Residual sites: there ``inplace_abn`` keeps z only (plus r, which the block's first conv keeps anyway), and
``checkpoint`` and ``efficient_checkpoint`` keep x, the consumers of z a recipe that holds r or r's own recipe (the
previous block's): one buffer per residual site either way (docs, "Residual sites").

``convert_sync`` (and ``convert(..., sync=True)``) makes every BatchNorm layer synchronized across the processes of
a torch.distributed group: ``BatchNormAct*d`` become ``SyncBatchNormAct*d`` (same strategy and activation), plain
``nn.BatchNorm*d`` become ``SyncBatchNormAct*d`` with the identity activation and the ``standard`` strategy (the same
math as the BN, synchronized, on CPU too).  ``nn.SyncBatchNorm`` (and timm's ``SyncBatchNormAct``) sites always
become synchronized layers over the same process group.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from torch import nn

from ..strategies import get_strategy
from .rewrite import rewrite_piece
from .modules import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    SyncBatchNormAct1d,
    SyncBatchNormAct2d,
    SyncBatchNormAct3d,
    _BatchNormAct,
    _SyncBatchNormAct,
)
from .sites import discover
from .sync import deepcopy_keeping_groups

__all__ = ["ConversionReport", "SiteDecision", "SyncBatchNormAct", "convert", "convert_sync"]


class SyncBatchNormAct(_SyncBatchNormAct):
    """Synchronized BatchNorm + activation for any (N, C, ...) input, like ``nn.SyncBatchNorm`` (what its sites
    become: the input rank is not known when converting)."""

    _expected_dims = (2, 3, 4, 5)
    _shape_hint = "(N, C, ...)"


_ACT_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}
_SYNC_CLASSES = {nn.BatchNorm1d: SyncBatchNormAct1d, nn.BatchNorm2d: SyncBatchNormAct2d,
                 nn.BatchNorm3d: SyncBatchNormAct3d, BatchNormAct1d: SyncBatchNormAct1d,
                 BatchNormAct2d: SyncBatchNormAct2d, BatchNormAct3d: SyncBatchNormAct3d}
FALLBACK = "efficient_checkpoint"


@dataclass(frozen=True)
class SiteDecision:
    """What ``convert`` did at one site.  ``applied`` is None when the site was left as it was.
    ``predicted_saved_bytes``: bytes kept for backward that the change saves (needs ``example_inputs``)."""

    name: str
    activation: str
    requested: str | None
    applied: str | None
    inplace: bool
    reason: str = ""
    predicted_saved_bytes: int | None = None


class ConversionReport(list):
    """Per-site ``SiteDecision`` records, printable as a table; ``rewritten`` lists the modules whose forward was
    rewritten (rule 2), ``predicted_saved_bytes`` the predicted saving in bytes kept for backward of one training
    step (None without ``example_inputs``)."""

    rewritten: tuple = ()

    @property
    def predicted_saved_bytes(self):
        values = [d.predicted_saved_bytes for d in self if d.applied is not None]
        if any(v is None for v in values):
            return None
        return sum(values)

    @property
    def converted(self) -> int:
        return sum(d.applied is not None for d in self)

    def __str__(self):
        rows = [("site", "activation", "requested", "applied", "inplace", "reason")]
        for d in self:
            rows.append((d.name, d.activation, d.requested or "-", d.applied or "-", "yes" if d.inplace else "no",
                         d.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else ""))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ------")
        lines.append(f"{self.converted} of {len(self)} sites converted")
        if self.rewritten:
            lines.append("forward rewritten: " + ", ".join(n or "(model)" for n in self.rewritten))
        if self.predicted_saved_bytes is not None:
            lines.append(f"predicted saving: {self.predicted_saved_bytes / 2**20:.2f} MiB kept for backward")
        return "\n".join(lines)

    def __repr__(self):
        return f"ConversionReport({list.__repr__(self)})"


def _strategy_name(value, where):
    if value is None:
        return None
    try:
        return get_strategy(value).name
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{exc} (strategy for {where})") from None


def _resolver(strategy):
    """A function site -> requested strategy name (or None: leave the site alone)."""
    if isinstance(strategy, dict):
        patterns = [(p, _strategy_name(v, f"pattern {p!r}")) for p, v in strategy.items() if p != "*"]
        default = _strategy_name(strategy["*"], "pattern '*'") if "*" in strategy else None
        for p, _ in patterns:
            if not isinstance(p, str):
                raise TypeError(f"ckptnorm: strategy dict keys are glob patterns (str), got {p!r}; tip: use e.g. "
                                "{'layer1.*': 'inplace_abn', '*': 'efficient_checkpoint'}")

        def resolve(site):
            for p, name in patterns:
                if fnmatch.fnmatchcase(site.name, p):
                    return name
            return default
        return resolve
    if callable(strategy) and not isinstance(strategy, type):
        return lambda site: _strategy_name(strategy(site), f"site {site.name!r} (returned by the callable)")
    name = _strategy_name(strategy, "all sites")
    return lambda site: name


def _decide(site, requested, inplace, strict):
    """(applied, inplace, reason) for one site."""
    act = site.describe_activation()
    notes = []
    if site.note:
        return None, False, site.note
    if site.fused_residual:
        notes.append("residual site: add and activation fused")
    if site.inline_node is not None:
        notes.append(f"{site.inlined} returns the BN output: its code is inlined into {site.owner or 'the model'}'s "
                     "rewritten forward")
    elif site.residual and not site.fused_residual:
        notes.append(f"residual site not fused: {site.rewrite_blocked or 'no ckptnorm kernel for ' + site.unfused}")
    elif site.unfused:
        why = site.rewrite_blocked or "no ckptnorm kernel for it"
        notes.append(f"{site.unfused} after the BN is not fused ({why})")
    if not site.traced and site.rewrite_blocked:
        notes.append(f"no activation fused: {site.rewrite_blocked}")
    if site.calls > 1:
        notes.append(f"BN module called {site.calls} times: converted without fusing an activation")
    if requested is None:
        return None, False, "; ".join(["no strategy requested"] + notes)
    applied = requested
    strat = get_strategy(requested)
    needs_inverse = strat.requires_invertible and (site.activation_module is not None or
                                                   not site.activation.invertible)
    if needs_inverse:
        if strict:
            raise ValueError(
                f"ckptnorm: site {site.name!r} cannot take strategy {requested!r}: it needs an invertible activation "
                f"and this site applies {act}; tip: request 'efficient_checkpoint' for this site (e.g. "
                f"strategy={{{site.name!r}: 'efficient_checkpoint', '*': {requested!r}}}), or pass strict=False to "
                "fall back automatically") from None
        applied = FALLBACK
        notes.insert(0, f"{requested} needs an invertible activation, {act} is not: fell back to {FALLBACK}")
    elif strat.requires_invertible and site.precision_risk:
        # inplace_abn's precision check would keep x (and z) at every call: efficient_checkpoint keeps x alone
        applied = FALLBACK
        notes.insert(0, f"{site.precision_risk}: {requested} would keep x as well (precision fallback), so "
                        f"{FALLBACK} keeps less")
    elif "z" in strat.keeps and strat.name != "standard" and site.in_place_writer:
        if strict:
            raise ValueError(f"ckptnorm: site {site.name!r} cannot take strategy {requested!r}, which keeps the "
                             f"layer's output: {site.in_place_writer}; tip: request 'efficient_checkpoint' for this "
                             "site, or pass strict=False to fall back automatically")
        applied = FALLBACK
        notes.insert(0, f"{site.in_place_writer}: {requested} would keep a modified output, fell back to {FALLBACK}")
    use_inplace = False
    if get_strategy(applied).may_overwrite_input:
        if inplace is False:
            pass
        elif site.input_has_other_readers:
            if inplace is True:
                notes.insert(0, "inplace=True not applied: the BN input may have other readers")
            else:
                notes.insert(0, "out of place: the BN input may have other readers")
        else:
            use_inplace = True
    return applied, use_inplace, "; ".join(notes)


# -- prediction of the saving -------------------------------------------------------------------------------------
# What PyTorch's own activation keeps for backward: its result z (these, out of place), or its input y.  In place,
# the ones whose derivative is a function of z keep z; the others keep a copy of y taken before overwriting it.
_KEEPS_RESULT = {"identity", "relu", "sigmoid", "tanh"}
_KEEPS_RESULT_IN_PLACE = _KEEPS_RESULT | {"leaky_relu", "elu", "celu", "selu"}


def _buffers_kept(site, strategy) -> int:
    """Activation-sized buffers kept for backward at this site (BN input, pre-activation, output)."""
    act = site.activation.name if site.activation is not None else "module"
    identity = act == "identity" and site.activation_module is None
    if strategy is None:  # the original model
        result = act in (_KEEPS_RESULT_IN_PLACE if site.act_in_place else _KEEPS_RESULT)
        keeps_y = not identity and not result
        keeps_z = (not identity and result) or site.output_kept
        return 1 + keeps_y + keeps_z
    strat = get_strategy(strategy)
    if strat.name == "standard":
        keeps_y = not identity and act not in _KEEPS_RESULT | {"leaky_relu", "elu", "celu", "selu"}
        keeps_z = not identity or site.output_kept
        return 1 + keeps_y + keeps_z
    if "z" in strat.keeps:  # inplace_abn: z alone
        return 1
    # checkpoint / efficient_checkpoint keep x; consumers keep a recipe (at residual sites one that holds r, or r's
    # recipe: assumed here to stay within _recompute.MAX_RESIDUAL_CHAIN, beyond which one output in so many is kept)
    return 1


def _predicted_saving(site, applied):
    if site.input_shape is None or site.input_dtype is None:
        return None
    nbytes = math.prod(site.input_shape) * site.input_dtype.itemsize
    return (_buffers_kept(site, None) - _buffers_kept(site, applied)) * nbytes


# -- applying -----------------------------------------------------------------------------------------------------
def _layer_class(bn, site):
    if site.kind == "sync_bn" or (site.kind == "norm_act" and isinstance(bn, nn.SyncBatchNorm)):
        return SyncBatchNormAct
    for base, cls in _ACT_CLASSES.items():
        if isinstance(bn, base):
            return cls
    raise TypeError(f"ckptnorm: no layer for {type(bn).__name__}; tip: leave this site out")


def _new_layer(bn, site, strategy, inplace):
    param = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    if site.activation_module is not None:
        kw.update(activation=site.activation_module)
    else:
        kw.update(activation=site.activation.name, activation_param=site.activation.param)
    cls = _layer_class(bn, site)
    if cls is SyncBatchNormAct:
        kw["process_group"] = bn.process_group
    layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                bias=not bn.affine or bn.bias is not None, strategy=strategy, inplace=inplace, **kw)
    layer.load_state_dict(bn.state_dict(), strict=True)
    for name, p in bn.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(p.requires_grad)
    layer.train(bn.training)
    return layer


def _replace_modules(root, replacements):
    """Swap modules by identity everywhere in the tree (a module held under several names stays one module)."""
    for mod in list(root.modules()):
        for name, child in list(mod._modules.items()):
            if child is not None and id(child) in replacements:
                mod._modules[name] = replacements[id(child)]


def _sync_layer(bn, process_group):
    """The ``SyncBatchNormAct*d`` equivalent of a plain BN or a ``BatchNormAct*d`` (same state, mode, devices)."""
    param = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    if isinstance(bn, _BatchNormAct):
        kw.update(activation=bn.activation, activation_param=bn.activation_param, strategy=bn.strategy,
                  inplace=bn.inplace)
    else:  # a plain BN: same math, through the kernel path that synchronizes (native ops cannot on CPU)
        kw.update(activation="identity", strategy="standard")
    layer = _SYNC_CLASSES[type(bn)](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                    process_group, bias=not bn.affine or bn.bias is not None, **kw)
    layer.load_state_dict(bn.state_dict(), strict=True)
    for name, p in bn.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(p.requires_grad)
    layer.train(bn.training)
    return layer


def _synchronize(module, process_group, done=None):
    """Replace, in place, every BN layer below ``module`` by its synchronized version (a layer reachable under
    several names stays one layer)."""
    done = {} if done is None else done
    for name, child in list(module._modules.items()):  # named_children() would skip a second name of a module
        if child is None:
            continue
        if id(child) in done:
            if done[id(child)] is not child:
                setattr(module, name, done[id(child)])
            continue
        if type(child) in _SYNC_CLASSES:
            done[id(child)] = _sync_layer(child, process_group)
            setattr(module, name, done[id(child)])
            continue
        done[id(child)] = child
        if isinstance(child, _SyncBatchNormAct):
            child.process_group = process_group
        else:
            _synchronize(child, process_group, done)


def convert_sync(model: nn.Module, process_group=None):
    """Return a copy of ``model`` whose BatchNorm layers are synchronized across ``process_group`` (torch.distributed;
    None: the default group).  The original is untouched.

    ``BatchNormAct*d`` become ``SyncBatchNormAct*d`` with the same strategy, activation and state; plain
    ``nn.BatchNorm*d`` become ``SyncBatchNormAct*d`` with the identity activation and the ``standard`` strategy
    (use ``convert(model, strategy, sync=True)`` to fuse activations and choose strategies at the same time);
    layers already synchronized move to ``process_group``.  state_dict keys are unchanged.  Call it before wrapping
    the model in ``DistributedDataParallel``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckptnorm: convert_sync needs an nn.Module, got {type(model).__name__}; tip: pass the model")
    if type(model) in _SYNC_CLASSES:
        return _sync_layer(model, process_group)
    work = deepcopy_keeping_groups(model)
    if isinstance(work, _SyncBatchNormAct):
        work.process_group = process_group
    _synchronize(work, process_group)
    return work


def convert(model: nn.Module, strategy, *, inplace="auto", strict=False, example_inputs=None, sync=False,
            process_group=None, inplace_module=False):
    """Return ``model`` converted: a deep copy of the same class (``inplace_module=True``: the model itself), whose
    ``ckptnorm_report`` tells what happened at each site.

    ``strategy``: a strategy name (every site); a dict of glob patterns on the BN modules' qualified names -> name
    (first matching pattern wins, ``"*"`` is the default whatever its position; a site matching nothing, or mapped
    to None, keeps its plain BN + activation); or a callable ``(site) -> name or None`` taking a ``Site``.
    ``inplace``: ``"auto"`` writes z over x only for inplace_abn sites whose BN input the graph proves has no other
    reader; ``True`` asks for it everywhere inplace_abn applies (still never where the input may have other readers:
    recorded); ``False`` never.  ``strict``: a site that cannot take its requested strategy raises ``ValueError``
    instead of falling back to ``efficient_checkpoint``.  ``example_inputs``: when given, each ``Site`` knows its
    input shape (one forward in eval mode, without gradients) and the report predicts the saving.  ``sync``: also
    synchronize every BatchNorm layer across ``process_group`` (torch.distributed; None: the default group), as
    ``convert_sync`` does on the converted model.

    Eval outputs, training outputs, gradients and running statistics equal the original's (up to the kernels'
    rounding: ``check_equivalence`` measures it).  Forward hooks on replaced BN and activation modules do not carry
    over.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckptnorm: convert needs an nn.Module, got {type(model).__name__}; tip: pass the model")
    if sync not in (True, False):
        raise TypeError(f"ckptnorm: sync must be True or False, got {sync!r}; tip: pass sync=True and the group "
                        "as process_group=")
    if process_group is not None and not sync:
        raise ValueError("ckptnorm: process_group is only used with sync=True; tip: pass sync=True, or drop "
                         "process_group")
    if inplace not in ("auto", True, False):
        raise ValueError(f"ckptnorm: inplace must be 'auto', True or False, got {inplace!r}; tip: use 'auto'")
    resolve = _resolver(strategy)
    work = model if inplace_module else deepcopy_keeping_groups(model)
    pieces, sites = discover(work, example_inputs)
    report = ConversionReport()
    planned = []
    for site in sites:
        requested = resolve(site) if site.kind != "frozen" else None
        applied, use_inplace, reason = _decide(site, requested, inplace, strict)
        saving = _predicted_saving(site, applied) if applied is not None else 0
        report.append(SiteDecision(site.name, site.describe_activation(), requested, applied, use_inplace, reason,
                                   saving))
        if applied is not None:
            planned.append((site, applied, use_inplace))
    replacements, by_owner = {}, {}
    for site, applied, use_inplace in planned:
        bn = work.get_submodule(site.name)
        replacements[id(bn)] = _new_layer(bn, site, applied, use_inplace)
        if site.fuse == "rewrite":
            by_owner.setdefault(site.owner, []).append(site)
    _replace_modules(work, replacements)
    work = replacements.get(id(work), work)  # the model itself is a BN
    for site, _, _ in planned:
        if site.fuse == "swap":
            parent, _, leaf = site.activation_node.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, leaf, nn.Identity())
    for owner, owned in by_owner.items():
        rewrite_piece(next(p for p in pieces.all_pieces() if p.name == owner), owned, pieces)
    report.rewritten = tuple(by_owner)
    if sync:
        _synchronize(work, process_group)
    work.ckptnorm_report = report
    return work
