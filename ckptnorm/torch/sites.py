"""Site discovery: where a model runs ``BatchNorm [-> add(r)] -> activation`` that ``convert`` can replace.

A *site* is one BatchNorm module: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, or timm's ``BatchNormAct2d`` /
``SyncBatchNormAct`` (BN and activation in one module, same state_dict keys).  Frozen BatchNorm modules
(torchvision's and timm's ``FrozenBatchNorm2d``) are listed as sites that stay as they are.  The code around a
site is read from the fx graph of the module whose forward calls it (``graph.Pieces``; each forward is traced on
its own), and the site records how its activation can be fused:

* ``fuse="swap"``: ``BN -> act`` where the activation is a module called once in the whole model and the BN output
  has no other reader: the BN becomes the fused layer and the activation module an ``nn.Identity``.  No code
  changes.
* ``fuse="rewrite"``: the activation is a function (``F.relu``, ``x.relu()``), a module called elsewhere too
  (torchvision's ResNet blocks call one ``relu`` three times), or the site is a residual one
  (``BN -> add(r) -> act``, fused into ``layer(x, r)``): the forward of the module that calls the BN is replaced
  by code generated from its edited graph -- only when ``graph.Piece.rewritable`` holds; otherwise
  ``rewrite_blocked`` says why and the site is converted without its activation.
* ``fuse="inside"``: a norm-act module (timm) brings its own activation.
* ``fuse=""``: nothing to fuse (no activation after the BN, or one ckptnorm cannot compute: ``unfused`` names it).

Activations fused: every one ``ckptnorm.activations`` has a kernel for (ReLU, ReLU6, LeakyReLU, ELU, CELU, SELU,
SiLU, GELU both forms, Hardswish, Hardsigmoid, Mish, Tanh, Sigmoid, Identity, as modules or functions), and any
other parameter-free elementwise activation module of torch.nn or timm, which the layer then runs itself
(``activation_module``; ``checkpoint``, ``efficient_checkpoint`` and ``standard`` only).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from .._caller import warn_at_caller
from ..activations import Activation, get_activation
from . import _compat
from .graph import Pieces
from .graph_nodes import _fresh_node, bn_kind
from .site_activations import as_activation, module_activation, node_activation

__all__ = ["Site", "SiteDiscoveryWarning", "find_sites"]

IDENTITY = get_activation("identity")


class SiteDiscoveryWarning(UserWarning):
    """Part of the model could not be traced: sites there are converted without fusing, or left as they are."""


@dataclass(frozen=True)
class Site:
    """One BatchNorm module that ``convert`` may replace (see the module docstring for ``fuse``).

    ``activation``: what the converted layer applies (an ``Activation``; identity when nothing is fused), or None
    when ``activation_module`` (an elementwise module without a kernel) is fused instead.  ``activation_node``: the
    fx node of the fused activation call in the owner's graph, or the qualified name of the activation module for
    ``fuse="swap"``.  ``owner``: qualified name of the module whose forward calls the BN ("" for the model itself;
    None when no traced code calls it).  ``calls``: traced calls of the BN module.  ``input_has_other_readers``:
    False only when the graph proves the BN input is a fresh tensor read by nothing else (``inplace="auto"``).
    ``in_place_writer``: why an op may modify the layer's output in place afterwards ("" if none can).
    ``output_kept``: some consumer keeps the layer's output for its backward.  ``residual``: the pattern
    ``BN -> add -> act`` (fused when ``add_node`` is set).  ``unfused``: an activation after the BN that is not
    fused, or "".  ``rewrite_blocked``: why the owner's forward may not be rewritten, when fusing needed it.
    """

    name: str
    bn_type: type
    activation: Activation | None
    activation_node: str | None = None
    channels: int = 0
    input_shape: tuple | None = None
    input_has_other_readers: bool = True
    gamma_range: tuple | None = None
    residual: bool = False
    residual_activation: Activation | None = None
    unfused: str = ""
    bn_node: str | None = None
    traced: bool = True
    calls: int = 1
    add_node: str | None = None
    residual_node: str | None = None
    kind: str = "bn"
    owner: str | None = None
    fuse: str = ""
    activation_module: nn.Module | None = None
    rewrite_blocked: str = ""
    in_place_writer: str = ""
    output_kept: bool = True
    input_dtype: torch.dtype | None = None
    act_in_place: bool = False
    note: str = ""
    passed_nodes: tuple = ()        # nn.Identity calls between the BN (or the inlined call) and what is fused
    inline_node: str | None = None  # the owner's call of the module returning the BN output, inlined to fuse
    inlined: str = ""               # that module's qualified name

    @property
    def precision_risk(self) -> str:
        """Why ``inplace_abn``'s precision check would keep x at this site's current parameters ("" if it would
        not): gamma = 0 (zero-initialized last BN of a residual block) or |gamma| < |beta| / 31 in some channel."""
        if self.gamma_range is None:
            return ""
        return "gamma = 0 in some channel" if self.gamma_range[0] == 0 else ""

    @property
    def fused_residual(self) -> bool:
        """``convert`` fuses the add and the activation into this site's layer."""
        return self.add_node is not None

    def describe_activation(self) -> str:
        if self.activation_module is not None:
            return type(self.activation_module).__name__
        return (self.activation or IDENTITY).describe()


_ADDS = {operator.add, operator.iadd, torch.add}


def _residual_operand(node, bn_node):
    """The other operand r when ``node`` is ``bn_node + r`` (an add of two different tensors), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADDS)
              or (node.op == "call_method" and node.target in ("add", "add_")))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is bn_node else node.args[0] if node.args[1] is bn_node else None
    return other if isinstance(other, fx.Node) and other is not bn_node else None


def _claims_residual(pieces, piece, head, add, other) -> bool:
    """When both operands of the add are single-user BN outputs that could take the site, only the add's first
    operand takes it."""
    if len(other.users) == 1 and _bn_output(pieces, piece, other):
        return add.args[0] is head
    return True


def _bn_output(pieces, piece, node) -> bool:
    """``node`` is (through Identity calls) the output of a BN without its own activation: called here, or returned
    by an inlinable child (``_inlinable_call``)."""
    while node.op == "call_module" and type(_target_or_none(piece, node)) is nn.Identity and node.args:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    mod = _target_or_none(piece, node)
    kind = bn_kind(mod)
    if kind in ("bn", "sync_bn"):
        return True
    if kind == "norm_act":
        act = getattr(mod, "act", None)
        return act is None or type(act) is nn.Identity
    child = pieces.piece(mod) if mod is not None else None
    if child is None or child.graph is None:
        return False
    out = next(n for n in child.graph.nodes if n.op == "output").args[0]
    return (isinstance(out, fx.Node) and out.op == "call_module" and bn_kind(_target_or_none(child, out)) is not None
            and _inlinable_call(pieces, child, out) is not None and _bn_output(pieces, child, out))


def _target_or_none(piece, node):
    try:
        return piece.submodule(node.target)
    except AttributeError:
        return None


def _gamma_range(bn):
    if getattr(bn, "weight", None) is None:
        return None
    w = bn.weight.detach().abs()
    if w.numel() == 0:
        return None
    return float(w.min()), float(w.max())


# -- discovery ------------------------------------------------------------------------------------------------------
def _skip_identities(piece, node):
    """(head, names): ``node`` followed through single-user ``nn.Identity`` calls without hooks (timm's drop_path
    at rate 0), and the names of the calls passed."""
    passed = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs or user.args[0] is not node:
            break
        try:
            mod = piece.submodule(user.target)
        except AttributeError:
            break
        if type(mod) is not nn.Identity or _compat.has_forward_hooks(mod):
            break
        passed.append(user.name)
        node = user
    return node, tuple(passed)


def _inlinable_call(pieces, piece, head):
    """(caller, call) when ``piece`` returns ``head`` itself and may be inlined into its only caller: the one place
    where what follows the BN can be seen (timm's ``ConvNormAct`` returns BN's output to the block that adds the
    shortcut).  Inlining bypasses the child's forward, so it must be rewritable (rule 3 of graph.py), called once
    by traced code only (rule 2), without hooks, with positional arguments only."""
    users = list(head.users)
    if len(users) != 1 or users[0].op != "output" or users[0].args[0] is not head or piece.module is pieces.model:
        return None
    child = piece.module
    calls = pieces.calls(child)
    if (len(calls) != 1 or pieces.untraced_parent(child) or not _single_name(pieces, child)
            or _compat.has_forward_hooks(child) or piece.rewritable()):
        return None
    caller, call = calls[0]
    placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
    if call.kwargs or len(call.args) != len(placeholders):
        return None
    return caller, call


def _fusion(pieces, piece, node, hop=True):
    """How the activation after BN call ``node`` can be fused: (Site fields, the node whose value is the layer's
    output once fused, the piece holding that node)."""
    out = {"fuse": "", "activation": IDENTITY}
    head, passed = _skip_identities(piece, node)
    if hop and not passed:
        found = _inlinable_call(pieces, piece, head)
        if found is not None:
            caller, call = found
            more, last, where = _fusion(pieces, caller, call, hop=False)
            if more["fuse"] == "rewrite":
                more.update(inline_node=call.name, inlined=caller.qualname(call.target))
            if more["fuse"] in ("swap", "rewrite"):
                return more, last, where
            return out, node, piece
    users = list(head.users)
    if len(users) != 1:
        return out, node, piece
    user = users[0]
    found = node_activation(user, piece, head)
    add = other = None
    if found is None:
        other = _residual_operand(user, head)
        if other is None or len(user.users) != 1 or not _claims_residual(pieces, piece, head, user, other):
            return out, node, piece
        add, act_call = user, next(iter(user.users))
        found = node_activation(act_call, piece, add)
        if found is None:
            return out, node, piece
        user = act_call
        out["residual"] = True
    fused = as_activation(found)
    module = found[1] if found[0] == "module" else None
    if fused is None and module is None:
        out["unfused"] = found[0]
        return out, node, piece
    if add is not None and module is not None:
        out["unfused"] = type(module).__name__  # residual + module activation: not fused
        return out, node, piece
    swap = False
    if user.op == "call_module" and add is None:
        act_mod = piece.submodule(user.target)
        # rule 2 of graph.py: every call of the module is known, and only this one exists
        swap = (len(pieces.calls(act_mod)) == 1 and not pieces.untraced_parent(act_mod)
                and _single_name(pieces, act_mod))
    blocked = "" if swap else piece.rewritable()
    if blocked:
        out["rewrite_blocked"] = blocked
        out["unfused"] = fused.describe() if fused is not None else type(module).__name__
        return out, node, piece
    out.update(fuse="swap" if swap else "rewrite", activation=fused, activation_module=module,
               activation_node=piece.qualname(user.target) if swap else user.name,
               act_in_place=_writes_input(piece, user), passed_nodes=passed)
    if add is not None:
        out.update(residual_activation=fused, add_node=add.name, residual_node=other.name)
    return out, user, piece


def _writes_input(piece, node) -> bool:
    """The activation call works in place (what PyTorch then keeps for its backward is its result)."""
    if node.op == "call_module":
        return getattr(piece.submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.kwargs.get("inplace") is True or getattr(node.target, "__name__", "").endswith("_") or (
        len(node.args) > 1 and node.args[-1] is True)


def _single_name(pieces, mod) -> bool:
    return sum(1 for _, m in pieces.model.named_modules(remove_duplicate=False) if m is mod) == 1


def _norm_act_fields(bn):
    """Fields for a timm norm-act module (its activation is its own ``act``)."""
    drop = getattr(bn, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        return {"fuse": "", "activation": None, "note": f"its drop layer {type(drop).__name__} sits between BN "
                "and activation: left as is"}
    act = getattr(bn, "act", None)
    found = module_activation(act) if act is not None else ("identity", None)
    if found is None:
        return {"fuse": "", "activation": None, "note": f"activation {type(act).__name__} is not elementwise-known: "
                "left as is"}
    fused = as_activation(found)
    if fused is None and found[0] != "module":
        return {"fuse": "", "activation": None, "note": f"no ckptnorm kernel for {found[0]}: left as is"}
    return {"fuse": "inside", "activation": fused, "activation_module": found[1] if found[0] == "module" else None,
            "act_in_place": getattr(act, "inplace", False) is True}


def discover(model: nn.Module, example_inputs=None):
    """(Pieces, sites) of ``model``; with ``example_inputs``, each site knows its input shape and dtype."""
    pieces = Pieces(model)
    shapes = _input_shapes(model, example_inputs) if example_inputs is not None else {}
    sites, seen, failed = [], set(), {}
    for name, bn in model.named_modules():
        kind = bn_kind(bn)
        if kind is None or id(bn) in seen:
            continue
        seen.add(id(bn))
        fields = {"kind": kind, "owner": None, "calls": 0, "activation": IDENTITY}
        calls = pieces.calls(bn)
        fields["calls"] = len(calls)
        untraced = pieces.untraced_parent(bn)
        for p in pieces.untraced_above(bn):
            failed.setdefault(p.name or type(p.module).__name__, (name, p.error))
        if untraced:
            fields["rewrite_blocked"] = f"{untraced} could not be traced ({failed[untraced][1]})"
        out_node = owner_piece = None
        if kind == "frozen":
            fields.update(activation=None, note="frozen BatchNorm (fixed statistics): left as is")
        elif len(calls) == 1 and not untraced:  # fusing changes every call: all must be known (rule 2)
            owner_piece, node = calls[0]
            fields.update(owner=owner_piece.name, bn_node=node.name)
            inp = node.args[0] if node.args else None
            if isinstance(inp, fx.Node) and inp.op not in ("placeholder", "get_attr"):
                fields["input_has_other_readers"] = len(inp.users) > 1 or not _fresh_node(inp, owner_piece, pieces)
            out_node = node
            if kind == "norm_act":
                fields.update(_norm_act_fields(bn))
            if kind != "norm_act" or (fields["fuse"] == "inside" and fields["activation"] == IDENTITY
                                      and fields.get("activation_module") is None):
                more, out_node, owner_piece = _fusion(pieces, owner_piece, node)
                if more["fuse"] or kind != "norm_act":
                    fields.update(more, owner=owner_piece.name)
        elif kind == "norm_act":
            fields.update(_norm_act_fields(bn))
        fields["traced"] = bool(calls) and not untraced
        outputs = [(owner_piece, out_node)] if owner_piece is not None else calls
        if outputs and not untraced:
            fields["in_place_writer"] = next((w for w in (pieces.in_place_writer(p, n) for p, n in outputs) if w), "")
            fields["output_kept"] = any(pieces.kept_by_consumers(p, n) for p, n in outputs)
        else:
            fields["in_place_writer"] = f"its callers are not all traced ({untraced or 'no traced code calls it'})"
        shape, dtype = shapes.get(id(bn), (None, None))
        sites.append(Site(name, type(bn), channels=bn.num_features, input_shape=shape, input_dtype=dtype,
                          gamma_range=_gamma_range(bn), **fields))
    if failed:
        names = list(failed)[:3]
        where = "; ".join(f"{failed[n][1]}" for n in names)
        warn_at_caller(f"ckptnorm: torch.fx tracing of {', '.join(names)} failed ({where}), so what happens there "
                       f"to the outputs of the sites below it (e.g. {failed[names[0]][0]}) is unknown: they are never "
                       "given a strategy that keeps their output; tip: make that forward traceable (no "
                       "data-dependent control flow), see ckptnorm_report", SiteDiscoveryWarning)
    return pieces, sites


def _input_shapes(model, example_inputs):
    """id(BN module) -> (input shape, dtype), from one eval-mode forward without grad (state untouched)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    found, handles = {}, []
    for m in model.modules():
        if bn_kind(m) is not None:
            def record(mod, args, key=id(m)):
                if args and isinstance(args[0], torch.Tensor):
                    found.setdefault(key, (tuple(args[0].shape), args[0].dtype))
            handles.append(m.register_forward_pre_hook(record))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return found


def find_sites(model: nn.Module, example_inputs=None) -> list:
    """The BatchNorm sites of ``model`` (see the module docstring), in module order.

    ``example_inputs`` (a tensor or a tuple of them): when given, one eval-mode, no-grad forward fills each site's
    ``input_shape`` (running statistics are not changed).  The model itself is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckptnorm: find_sites needs an nn.Module, got {type(model).__name__}; tip: pass the model")
    return discover(model, example_inputs)[1]
