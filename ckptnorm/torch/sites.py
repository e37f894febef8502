"""Site discovery: where a model runs ``BatchNorm -> activation`` that ``convert`` can fuse into a ``BatchNormAct``.

A *site* is one call of a plain ``nn.BatchNorm1d/2d/3d`` module.  With ``torch.fx`` symbolic tracing:

* ``BN -> act``, where the activation is the BN output's only user, is a site with that activation.  Activations
  recognized: modules ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ELU``, ``nn.SiLU``, ``nn.GELU`` (exact form only),
  ``nn.Identity``; functions ``F.relu``, ``torch.relu``, ``F.leaky_relu``, ``F.elu``, ``F.silu``, ``F.gelu`` (also
  with ``inplace=``, and their ``_`` in-place variants) and the ``Tensor.relu`` method.
* ``BN -> add(r) -> act`` (the end of a post-activation residual block), where the add and the activation each
  have one user, is a site with ``residual=True``: ``convert`` fuses it into one layer computing
  ``phi(BN(x) + r)`` (design note, "Residual sites").  When both operands of the add are such BN calls (a
  projection shortcut ending in a BN), the add's first operand is the site; the other BN stays an identity site.
  With an activation ckptnorm has no kernel for (``relu6``, ...), the site is not fused: identity activation,
  ``unfused`` names it.
* Any other BN (no activation user, several users, or an activation ckptnorm has no kernel for: ``relu6``,
  ``gelu(approximate='tanh')``, ...) is a site with the identity activation; ``unfused`` names the activation that
  stays a separate op when there is one.  Decision: ``relu6`` is not fused (ckptnorm has no relu6), such a BN is
  an identity site with ``unfused="relu6"``.

Activations are matched per call node, so a shared activation module (torchvision's ResNet calls one ``relu`` three
times) is never touched: ``convert`` removes call nodes, not modules.

When tracing fails (data-dependent control flow), ``find_sites`` falls back to adjacent children of every
``nn.Sequential`` (a BN child immediately followed by an activation module) and warns (``SiteDiscoveryWarning``).
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import Activation, get_activation
from .modules import _BatchNormAct

__all__ = ["Site", "SiteDiscoveryWarning", "find_sites"]

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
IDENTITY = get_activation("identity")


class SiteDiscoveryWarning(UserWarning):
    """Tracing failed and the ``nn.Sequential`` fallback was used."""


@dataclass(frozen=True)
class Site:
    """One plain BatchNorm call that ``convert`` may replace.

    ``name``: qualified name of the BN module.  ``activation``: what the converted layer would apply (identity when
    nothing can be fused; identity at residual sites).  ``activation_node``: the fx node name of the fused activation
    call (traced), or the qualified name of the activation child (Sequential fallback); ``None`` when there is
    none.  ``input_has_other_readers``: True unless the graph proves the BN input is read by nothing else -- it is
    produced by an op known to return a fresh tensor that its backward does not keep (conv, linear, pooling, add,
    cat, ...), and the BN is its only user; a model input or a shortcut reader makes it True.  ``gamma_range``:
    (min, max) of |weight|, ``None`` without affine weight.  ``residual``: the pattern ``BN -> add -> act``;
    ``residual_activation`` is its fusable activation (then also ``activation``, with ``add_node`` the fx node of
    the add and ``residual_node`` that of its other operand r), None when it cannot be fused.  ``unfused``: an
    activation after the BN that is not fused (e.g. ``"relu6"``), or "".  ``bn_node``: fx node name of the BN call
    (``None`` in the fallback).  ``traced``: found by fx tracing (False: Sequential fallback).  ``calls``: how many
    times the graph calls this BN module.
    """

    name: str
    bn_type: type
    activation: Activation
    activation_node: str | None
    channels: int
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

    @property
    def fused_residual(self) -> bool:
        """``convert`` fuses the add and the activation into this site's layer."""
        return self.add_node is not None


# -- activation matching --------------------------------------------------------------------------------------------
_FN_SIMPLE = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.silu: "silu", F.relu6: "relu6"}
_FN_PARAM = {F.leaky_relu: ("leaky_relu", "negative_slope", 0.01), F.elu: ("elu", "alpha", 1.0)}
for _name in ("relu_", "leaky_relu_", "elu_"):
    _fn = getattr(F, _name, None)
    if _fn is not None:
        if _name == "relu_":
            _FN_SIMPLE[_fn] = "relu"
        else:
            _FN_PARAM[_fn] = _FN_PARAM[getattr(F, _name[:-1])]
_METHODS = {"relu": "relu", "relu_": "relu"}


def _module_activation(mod):
    """(name, param) for an activation module, or None."""
    t = type(mod)
    if t is nn.ReLU:
        return "relu", None
    if t is nn.ReLU6:
        return "relu6", None
    if t is nn.LeakyReLU:
        return "leaky_relu", float(mod.negative_slope)
    if t is nn.ELU:
        return "elu", float(mod.alpha)
    if t is nn.SiLU:
        return "silu", None
    if t is nn.GELU:
        return ("gelu", None) if mod.approximate == "none" else ("gelu_" + mod.approximate, None)
    if t is nn.Identity:
        return "identity", None
    return None


def _node_activation(node, modules, input_node):
    """(name, param) when ``node`` applies an activation to ``input_node`` (its first argument), else None."""
    if not node.args or node.args[0] is not input_node:
        return None
    if any(a is input_node for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    if node.op == "call_module":
        return _module_activation(modules.get(node.target))
    if node.op == "call_method":
        if node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
            return _METHODS[node.target], None
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _FN_SIMPLE:
        return _FN_SIMPLE[target], None
    if target in _FN_PARAM:
        act, kw, default = _FN_PARAM[target]
        value = node.args[1] if len(node.args) > 1 else node.kwargs.get(kw, default)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return act, float(value)
        return None
    if target is F.gelu:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu", None) if approx == "none" else (f"gelu_{approx}", None)
    return None


def _as_activation(found):
    """An ``Activation`` for a fusable (name, param), else None."""
    if found is None:
        return None
    name, param = found
    try:
        return get_activation(name, param)
    except ValueError:  # relu6, gelu_tanh, ...: no ckptnorm activation
        return None


# -- "fresh output" producers: ops whose result is a new tensor that their own backward does not keep ----------------
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.cat,
                    torch.matmul, F.conv1d, F.conv2d, F.conv3d, F.linear, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_FRESH_METHODS = {"add", "sub", "mul", "matmul"}


def _fresh_module(mod) -> bool:
    if isinstance(mod, _FRESH_MODULES):
        return True
    # a plain BN returns a new tensor; its backward keeps its input, not its output
    return type(mod) in BN_TYPES


def _fresh_node(node, modules) -> bool:
    if node.op == "call_module":
        return _fresh_module(modules.get(node.target))
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


class _Tracer(fx.Tracer):
    """Default tracer that also keeps ckptnorm's own modules as leaves."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _BatchNormAct) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (ckptnorm modules as leaves); the GraphModule shares ``model``'s submodules."""
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _gamma_range(bn):
    if bn.weight is None:
        return None
    w = bn.weight.detach().abs()
    if w.numel() == 0:
        return None
    return float(w.min()), float(w.max())


def _is_plain_bn(mod) -> bool:
    return type(mod) in BN_TYPES


_ADDS = {operator.add, operator.iadd, torch.add}


def _residual_operand(node, bn_node):
    """The other operand r when ``node`` is ``bn_node + r`` (an add of two different tensors), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADDS)
              or (node.op == "call_method" and node.target in ("add", "add_")))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is bn_node else node.args[0] if node.args[1] is bn_node else None
    return other if isinstance(other, fx.Node) and other is not bn_node else None


def _claims_residual(bn_node, other, modules) -> bool:
    """When both operands of the add are single-user BN calls, only the add's first operand takes the site."""
    other_is_bn = (other.op == "call_module" and _is_plain_bn(modules.get(other.target)) and len(other.users) == 1)
    add = next(iter(bn_node.users))
    return not other_is_bn or add.args[0] is bn_node


def graph_sites(gm: fx.GraphModule) -> list:
    """Sites of a traced GraphModule (``input_shape`` from ``tensor_meta`` when shape propagation ran)."""
    modules = dict(gm.named_modules())
    bn_calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and _is_plain_bn(modules.get(node.target)):
            bn_calls[node.target] = bn_calls.get(node.target, 0) + 1
    sites = []
    for node in gm.graph.nodes:
        if not (node.op == "call_module" and _is_plain_bn(modules.get(node.target))):
            continue
        bn = modules[node.target]
        act, act_node, residual, res_act, unfused = IDENTITY, None, False, None, ""
        add_node = residual_node = None
        users = list(node.users)
        if len(users) == 1:
            user = users[0]
            found = _node_activation(user, modules, node)
            if found is not None:
                fused = _as_activation(found)
                if fused is not None:
                    act, act_node = fused, user.name
                else:
                    unfused = found[0]
            elif _residual_operand(user, node) is not None and len(user.users) == 1:
                other = _residual_operand(user, node)
                nxt = next(iter(user.users))
                found = _node_activation(nxt, modules, user)
                if found is not None and _claims_residual(node, other, modules):
                    residual = True
                    res_act = _as_activation(found)
                    if res_act is None:
                        unfused = found[0]
                    else:
                        act, act_node, add_node, residual_node = res_act, nxt.name, user.name, other.name
        inp = node.args[0] if node.args else None
        readers = True
        if isinstance(inp, fx.Node) and inp.op not in ("placeholder", "get_attr"):
            readers = len(inp.users) > 1 or not _fresh_node(inp, modules)
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        sites.append(Site(node.target, type(bn), act, act_node, bn.num_features, shape, readers, _gamma_range(bn),
                          residual, res_act, unfused, node.name, True, bn_calls[node.target], add_node,
                          residual_node))
    return sites


def sequential_sites(model: nn.Module) -> list:
    """Fallback discovery: BN children of every ``nn.Sequential``, fused with an activation child right after."""
    sites = []
    for qual, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (cname, child) in enumerate(children):
            if not _is_plain_bn(child):
                continue
            name = f"{qual}.{cname}" if qual else cname
            act, act_name, unfused = IDENTITY, None, ""
            if i + 1 < len(children):
                nname, nxt = children[i + 1]
                found = _module_activation(nxt)
                fused = _as_activation(found)
                if fused is not None:
                    act, act_name = fused, f"{qual}.{nname}" if qual else nname
                elif found is not None:
                    unfused = found[0]
            readers = i == 0 or not _fresh_module(children[i - 1][1])
            sites.append(Site(name, type(child), act, act_name, child.num_features, None, readers,
                              _gamma_range(child), False, None, unfused, None, False, 1))
    return sites


def _shape_prop(gm: fx.GraphModule, example_inputs) -> None:
    """Fill ``tensor_meta`` by running ``gm`` once in eval mode without grad (running statistics untouched)."""
    from torch.fx.passes.shape_prop import ShapeProp
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def discover(model: nn.Module, example_inputs=None):
    """(GraphModule or None, sites): the traced graph the sites' node names refer to, None for the fallback."""
    try:
        gm = trace(model)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure means: use the fallback
        warnings.warn(f"ckptnorm: torch.fx tracing of {type(model).__name__} failed ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); fell back to BatchNorm + activation "
                      "children of nn.Sequential containers, so sites elsewhere are not found; tip: make the "
                      "model traceable (no data-dependent control flow) to find all sites",
                      SiteDiscoveryWarning, stacklevel=3)
        return None, sequential_sites(model)
    if example_inputs is not None:
        _shape_prop(gm, example_inputs)
    return gm, graph_sites(gm)


def find_sites(model: nn.Module, example_inputs=None) -> list:
    """The BatchNorm sites of ``model`` (see the module docstring), in graph order.

    ``example_inputs`` (a tensor or a tuple of them): when given, one eval-mode, no-grad forward fills each site's
    ``input_shape`` (running statistics are not changed).  The model itself is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ckptnorm: find_sites needs an nn.Module, got {type(model).__name__}; tip: pass the model")
    return discover(model, example_inputs)[1]
