"""``convert``: replace a model's BatchNorm (+ activation) sites by ckptnorm layers with chosen strategies.

The model keeps its class, its ``forward`` code, methods and attributes: ``convert`` returns a deep copy (or, with
``inplace_module=True``, the model itself) in which BatchNorm modules are swapped for ``BatchNormAct*d`` layers
inside the module tree, with the same names, so state_dict keys are unchanged and a checkpoint of the original
loads with ``strict=True``.  Rules (``sites``, ``graph`` and ``graph_nodes`` hold the analysis behind them,
``decisions`` the choice per site and the predicted saving):

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

from torch import nn

from .decisions import ConversionReport, SiteDecision, decide, predicted_saving, resolver
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
from ._compat import deepcopy_keeping_groups

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
    resolve = resolver(strategy)
    work = model if inplace_module else deepcopy_keeping_groups(model)
    pieces, sites = discover(work, example_inputs)
    report = ConversionReport()
    planned = []
    for site in sites:
        requested = resolve(site) if site.kind != "frozen" else None
        applied, use_inplace, reason = decide(site, requested, inplace, strict)
        saving = predicted_saving(site, applied) if applied is not None else 0
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
