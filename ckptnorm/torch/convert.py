"""``convert``: replace a model's BatchNorm + activation sites by ``BatchNormAct*d`` layers with chosen strategies.

The original model is never modified: ``convert`` works on a deep copy.  A traced model comes back as a
``torch.fx.GraphModule`` with the same submodule names (BN modules replaced in place, fused activation call nodes
removed from the graph, activation modules left alone since they may be shared); an untraceable model comes back as
the same class, with the fused activation children of its ``nn.Sequential`` containers replaced by ``nn.Identity``.
Either way the state_dict keys are unchanged and the original's state_dict loads with ``strict=True``.

Residual sites (``BN -> add(r) -> act``) become one layer called as ``layer(x, r)``, placed where the add was (r
may be computed after the BN, e.g. by a projection shortcut); the add and activation call nodes are removed.  There
``inplace_abn`` keeps z only (plus r, which the block's first conv keeps anyway), while ``checkpoint`` and
``efficient_checkpoint`` keep x and leave z materialized -- it is the next block's input and residual -- so they
save nothing at residual sites (design note, "Residual sites"); the report says so.

``convert_sync`` (and ``convert(..., sync=True)``) makes every BatchNorm layer synchronized across the processes of
a torch.distributed group: ``BatchNormAct*d`` become ``SyncBatchNormAct*d`` (same strategy and activation), plain
``nn.BatchNorm*d`` become ``SyncBatchNormAct*d`` with the identity activation and the ``standard`` strategy (the same
math as the BN, synchronized, on CPU too).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..strategies import get_strategy
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

__all__ = ["ConversionReport", "SiteDecision", "convert", "convert_sync"]

_ACT_CLASSES = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d, nn.BatchNorm3d: BatchNormAct3d}
_SYNC_CLASSES = {nn.BatchNorm1d: SyncBatchNormAct1d, nn.BatchNorm2d: SyncBatchNormAct2d,
                 nn.BatchNorm3d: SyncBatchNormAct3d, BatchNormAct1d: SyncBatchNormAct1d,
                 BatchNormAct2d: SyncBatchNormAct2d, BatchNormAct3d: SyncBatchNormAct3d}
FALLBACK = "efficient_checkpoint"


@dataclass(frozen=True)
class SiteDecision:
    """What ``convert`` did at one site.  ``applied`` is None when the site was left as plain BN (+ activation)."""

    name: str
    activation: str
    requested: str | None
    applied: str | None
    inplace: bool
    reason: str = ""


class ConversionReport(list):
    """Per-site ``SiteDecision`` records, printable as a table."""

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
        converted = sum(d.applied is not None for d in self)
        lines.append(f"{converted} of {len(self)} sites converted")
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


def _new_layer(bn, site, strategy, inplace):
    param = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if param is None else {"device": param.device, "dtype": param.dtype}
    layer = _ACT_CLASSES[type(bn)](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                   bias=not bn.affine or bn.bias is not None, activation=site.activation.name,
                                   activation_param=site.activation.param, strategy=strategy, inplace=inplace, **kw)
    layer.load_state_dict(bn.state_dict(), strict=True)
    for name, p in bn.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(p.requires_grad)
    layer.train(bn.training)
    return layer


def _set_module(root, qualname, module):
    parent, _, leaf = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _restore_missing_state(gm, src):
    """GraphModule copies only what its graph uses: put back modules, parameters and buffers it left out, so that the
    state_dict keys stay those of ``src``."""
    for qual, mod in src.named_modules():
        if not qual:
            target = gm
        else:
            try:
                target = gm.get_submodule(qual)
            except AttributeError:
                parent, _, leaf = qual.rpartition(".")
                holder = gm
                for part in parent.split(".") if parent else ():
                    if not hasattr(holder, part):
                        holder.add_module(part, nn.Module())
                    holder = getattr(holder, part)
                holder.add_module(leaf, mod)
                continue
        for name, p in mod.named_parameters(recurse=False):
            if not hasattr(target, name):
                target.register_parameter(name, p)
        for name, b in mod.named_buffers(recurse=False):
            if not hasattr(target, name):
                target.register_buffer(name, b, persistent=name not in mod._non_persistent_buffers_set)


def _decide(site, requested, inplace, strict):
    """(applied, inplace, reason) for one site."""
    act = site.activation.describe()
    notes = []
    if site.fused_residual:
        notes.append("residual site: add and activation fused")
    elif site.residual:
        notes.append(f"residual site not fused: no ckptnorm kernel for {site.unfused}")
    elif site.unfused:
        notes.append(f"{site.unfused} after the BN is not fused (no ckptnorm kernel for it)")
    if requested is None:
        return None, False, "; ".join(["no strategy requested"] + notes)
    if site.calls > 1:
        msg = (f"ckptnorm: BatchNorm module {site.name!r} is called {site.calls} times in the graph, so it cannot be "
               "replaced for one call only; tip: give each call its own BatchNorm module, or leave this site out "
               "(map its name to None in a strategy dict)")
        if strict:
            raise ValueError(msg)
        return None, False, f"BN module called {site.calls} times: left as is"
    applied = requested
    try:
        get_strategy(requested).check_activation(site.activation)
    except ValueError:
        if strict:
            raise ValueError(
                f"ckptnorm: site {site.name!r} cannot take strategy {requested!r}: it needs an invertible activation "
                f"and this site applies {act}; tip: request 'efficient_checkpoint' for this site (e.g. "
                f"strategy={{{site.name!r}: 'efficient_checkpoint', '*': {requested!r}}}), or pass strict=False to "
                "fall back automatically") from None
        applied = FALLBACK
        notes.insert(0, f"{requested} needs an invertible activation, {act} is not: fell back to {FALLBACK}")
    if site.fused_residual and get_strategy(applied).rematerializes_output:
        notes.append("output stays materialized (the next block's residual): saves nothing here")
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


def _fuse_residual(graph, nodes, site):
    """``act(bn(x) + r)`` -> ``layer(x, r)``, inserted at the add (both x and r exist there)."""
    bn, add, act = nodes[site.bn_node], nodes[site.add_node], nodes[site.activation_node]
    # r from the add's current arguments: r may be an earlier site's activation node, replaced since discovery
    residual = add.args[1] if add.args[0] is bn else add.args[0]
    with graph.inserting_before(add):
        fused = graph.call_module(site.name, (bn.args[0], residual))
    fused.meta = dict(act.meta)
    act.replace_all_uses_with(fused)
    for node in (act, add, bn):
        graph.erase_node(node)


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
            process_group=None):
    """Return a converted deep copy of ``model``; its ``ckptnorm_report`` tells what happened at each site.

    ``strategy``: a strategy name (every site); a dict of glob patterns on the BN modules' qualified names -> name
    (first matching pattern wins, ``"*"`` is the default whatever its position; a site matching nothing, or mapped
    to None, keeps its plain BN + activation); or a callable ``(site) -> name or None`` taking a ``Site``.
    ``inplace``: ``"auto"`` writes z over x only for inplace_abn sites whose BN input the graph proves has no other
    reader; ``True`` asks for it everywhere inplace_abn applies (still never where the input may have other readers:
    recorded); ``False`` never.  ``strict``: a site that cannot take its requested strategy raises ``ValueError``
    instead of falling back to ``efficient_checkpoint``.  ``example_inputs``: when given, each ``Site`` handed to a
    callable ``strategy`` knows its input shape (one shape-propagation run, in eval mode, without gradients).
    ``sync``: also synchronize every BatchNorm layer across ``process_group`` (torch.distributed; None: the default
    group), as ``convert_sync`` does on the converted model: sites left as plain BN become synchronized identity
    layers with the ``standard`` strategy.

    Eval outputs and training gradients equal the original's (up to the kernels' rounding).  Forward hooks
    registered on the replaced BN modules and on removed activation calls do not carry over.
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
    work = deepcopy_keeping_groups(model)
    gm, sites = discover(work, example_inputs)
    report = ConversionReport()
    planned = []
    for site in sites:
        requested = resolve(site)
        applied, use_inplace, reason = _decide(site, requested, inplace, strict)
        report.append(SiteDecision(site.name, site.activation.describe(), requested, applied, use_inplace, reason))
        if applied is not None:
            planned.append((site, applied, use_inplace))
    root = work if gm is None else gm
    for site, applied, use_inplace in planned:
        bn = root.get_submodule(site.name)
        _set_module(root, site.name, _new_layer(bn, site, applied, use_inplace))
    if gm is None:
        for site, _, _ in planned:
            if site.activation_node is not None:
                _set_module(work, site.activation_node, nn.Identity())
        result = work
    else:
        nodes = {n.name: n for n in gm.graph.nodes}
        for site, _, _ in planned:
            if site.fused_residual:
                _fuse_residual(gm.graph, nodes, site)
            elif site.activation_node is not None:
                act = nodes[site.activation_node]
                act.replace_all_uses_with(nodes[site.bn_node])
                gm.graph.erase_node(act)
        gm.graph.lint()
        gm.recompile()
        _restore_missing_state(gm, work)
        gm.training = work.training  # submodules keep their own modes
        result = gm
    if sync:
        _synchronize(result, process_group)
    result.ckptnorm_report = report
    return result
