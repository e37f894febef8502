"""What single graph nodes and modules are, for ``graph.py`` and ``sites.py``: BatchNorm kinds, aliases (views and
pass-through modules), in-place writers, ops that keep their input for backward, and ops whose output is a fresh
tensor.  Each answer is about one node or one module; following tensors through pieces is ``graph.Pieces``'s job.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_kind(mod) -> str | None:
    """What kind of BatchNorm ``mod`` is, for conversion: "bn" (plain), "sync_bn" (``nn.SyncBatchNorm``),
    "norm_act" (timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``: BN, ``drop`` and ``act`` in one module), "frozen"
    (fixed statistics and affine terms, no training state: left as is), or None.  Checked by exact type: a subclass
    with its own forward is not assumed to compute BatchNorm."""
    t = type(mod)
    if t in BN_TYPES:
        return "bn"
    if t is nn.SyncBatchNorm:
        return "sync_bn"
    lib = t.__module__.split(".")[0]
    if lib == "timm" and t.__name__ in ("BatchNormAct2d", "SyncBatchNormAct"):
        return "norm_act"
    if lib in ("timm", "torchvision") and t.__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
        return "frozen"
    return None


# -- aliases, in-place writers, inputs kept ------------------------------------------------------------------------------------------
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "transpose", "permute", "squeeze",
                 "unsqueeze", "expand", "expand_as", "narrow", "unflatten", "contiguous", "chunk", "split",
                 "unbind", "t", "__getitem__", "detach"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                   torch.narrow, torch.chunk, torch.split, torch.unbind, operator.getitem, torch.t}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
                 nn.Unflatten)
_IN_PLACE_OPS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ior, operator.iand,
                 torch.relu_, torch.sigmoid_, torch.tanh_}


def _target(piece, node):
    try:
        return piece.submodule(node.target)
    except AttributeError:
        return None


def _arg_index(user, node):
    for i, a in enumerate(user.args):
        if a is node:
            return i
    return None


def _is_alias(piece, user, node) -> bool:
    """``user`` returns ``node``'s memory (a view, or an unchanged pass-through)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target in _VIEW_METHODS or user.target.endswith("_")
    if user.op == "call_function":
        return user.target in _VIEW_FUNCTIONS or user.target in _IN_PLACE_OPS or user.kwargs.get("inplace") is True
    if user.op == "call_module":
        mod = _target(piece, user)
        return isinstance(mod, _PASS_MODULES) or getattr(mod, "inplace", False) is True
    return False


def _returns_input(graph, call, node) -> bool:
    """A traced child piece whose output is (an alias of) the placeholder that ``node`` is passed as."""
    idx = _arg_index(call, node)
    ph = [n for n in graph.nodes if n.op == "placeholder"]
    if idx is None or idx >= len(ph):
        return True  # not followed: assume it may return it
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    seen, todo = set(), [ph[idx]]
    while todo:
        n = todo.pop()
        if n is out:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(u for u in n.users if u.op != "output" and u.args and u.args[0] is n
                    and (u.op in ("call_method", "call_function") and (
                        u.target in _VIEW_METHODS or u.target in _VIEW_FUNCTIONS or u.target in _IN_PLACE_OPS
                        or (isinstance(u.target, str) and u.target.endswith("_")))))
    return False


def _in_place(piece, user) -> str:
    """A description of ``user`` when it writes its first argument in place, else ""."""
    if user.op == "call_function":
        if user.target in _IN_PLACE_OPS or user.kwargs.get("inplace") is True:
            return f"{getattr(user.target, '__name__', user.target)}"
        if user.target in _INPLACE_POSITIONAL and len(user.args) > _INPLACE_POSITIONAL[user.target] \
                and user.args[_INPLACE_POSITIONAL[user.target]] is True:
            return f"{user.target.__name__}(inplace=True)"
        name = getattr(user.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return name
    elif user.op == "call_method":
        if user.target.endswith("_") and not user.target.startswith("_"):
            return f".{user.target}()"
    elif user.op == "call_module":
        mod = _target(piece, user)
        if getattr(mod, "inplace", False) is True:
            return f"{piece.qualname(user.target)} ({type(mod).__name__}(inplace=True))"
    return ""


# F.relu(x, True) style: position of the inplace flag
_INPLACE_POSITIONAL = {F.relu: 1, F.relu6: 1, F.leaky_relu: 2, F.elu: 2, F.celu: 2, F.selu: 1, F.silu: 1,
                       F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1, F.hardtanh: 3, F.dropout: 3}

# Ops whose backward does not need their (tensor) input: what they read is not kept because of them.
_FREE_FUNCTIONS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.cat,
                   torch.stack, torch.flatten, torch.reshape, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout, F.pad,
                   operator.getitem, torch.chunk, torch.split, operator.neg}
_FREE_METHODS = {"add", "add_", "sub", "sub_", "view", "reshape", "flatten", "contiguous", "size", "dim",
                 "chunk", "split", "permute", "transpose", "unsqueeze", "squeeze", "expand", "__getitem__",
                 "mean", "sum"}
_FREE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Upsample,
                 nn.ZeroPad2d, nn.ConstantPad2d)


def _keeps_input(piece, user) -> bool:
    if user.op == "call_function":
        if user.target in (operator.mul, torch.mul, operator.truediv, torch.div):
            return any(isinstance(a, fx.Node) for a in user.args[1:])  # times a tensor keeps both
        if user.target is F.interpolate:
            return False
        return user.target not in _FREE_FUNCTIONS
    if user.op == "call_method":
        if user.target in ("mul", "mul_", "div", "div_"):
            return any(isinstance(a, fx.Node) for a in user.args[1:])
        return user.target not in _FREE_METHODS
    if user.op == "call_module":
        mod = _target(piece, user)
        if isinstance(mod, _FREE_MODULES):
            return False
        # these keep their result, not their input (an in-place one is flagged by in_place_writer first)
        return not (isinstance(mod, (nn.ReLU, nn.Sigmoid, nn.Tanh)) and not getattr(mod, "inplace", False))
    return True


# -- readers of the BN input: is it a fresh tensor? --------------------------------------------------------------------------------------
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.cat,
                    torch.matmul, F.conv1d, F.conv2d, F.conv3d, F.linear, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_FRESH_METHODS = {"add", "sub", "mul", "matmul"}


def _fresh_node(node, piece, pieces, depth=0) -> bool:
    """``node`` returns a new tensor that its own backward does not keep (a traced child piece: what it returns)."""
    if node.op == "call_module":
        try:
            mod = piece.submodule(node.target)
        except AttributeError:
            return False
        child = pieces.piece(mod)
        if child is not None:
            if child.graph is None or depth > 8:
                return False
            out = next(n for n in child.graph.nodes if n.op == "output").args[0]
            return (isinstance(out, fx.Node) and out.op not in ("placeholder", "get_attr") and len(out.users) == 1
                    and _fresh_node(out, child, pieces, depth + 1))
        return isinstance(mod, _FRESH_MODULES) or bn_kind(mod) == "bn"
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False
