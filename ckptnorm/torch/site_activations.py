"""Which activation follows a BatchNorm: matching modules, functions and methods to ckptnorm activations.

Used by site discovery (``sites.py``).  An activation is fused by name when ckptnorm has a kernel for it
(``ckptnorm.activations``: PyTorch's modules and functions, timm's classes with the same math), or as a module the
layer runs itself when it is another parameter-free elementwise activation module of torch.nn or timm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import get_activation

__all__ = ["as_activation", "module_activation", "node_activation"]


# -- matching --------------------------------------------------------------------------------------------
_FN_SIMPLE = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.silu: "silu", F.relu6: "relu6",
              F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.mish: "mish", F.selu: "selu",
              torch.selu: "selu", torch.tanh: "tanh", torch.sigmoid: "sigmoid", F.tanh: "tanh",
              F.sigmoid: "sigmoid", torch.tanh_: "tanh", torch.sigmoid_: "sigmoid"}
_FN_PARAM = {F.leaky_relu: ("leaky_relu", "negative_slope", 0.01), F.elu: ("elu", "alpha", 1.0),
             F.celu: ("celu", "alpha", 1.0)}
for _name in ("relu_", "leaky_relu_", "elu_", "celu_", "selu_"):
    _fn = getattr(F, _name, None)
    if _fn is not None:
        if _name in ("relu_", "selu_"):
            _FN_SIMPLE[_fn] = _name[:-1]
        else:
            _FN_PARAM[_fn] = _FN_PARAM[getattr(F, _name[:-1])]
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
            "tanh_": "tanh"}
_MODULE_NAMES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
                 nn.Hardsigmoid: "hardsigmoid", nn.Mish: "mish", nn.SELU: "selu", nn.Tanh: "tanh",
                 nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
# timm's own activation classes with the same math as the PyTorch ops named
_TIMM_NAMES = {"Swish": "silu", "Mish": "mish", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish",
               "HardSigmoid": "hardsigmoid", "GELU": "gelu", "GELUTanh": "gelu_tanh"}
# torch.nn activation modules that are not elementwise (or not deterministic, or hold state): never fused as modules
_NOT_ELEMENTWISE = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "GLU", "MultiheadAttention", "PReLU", "RReLU",
                    "AdaptiveLogSoftmaxWithLoss")


def module_activation(mod):
    """("name", param) for a module ckptnorm has a kernel for, ("module", mod) for another elementwise activation
    module it can run itself, or None."""
    t = type(mod)
    if t in _MODULE_NAMES:
        return _MODULE_NAMES[t], None
    if t is nn.LeakyReLU:
        return "leaky_relu", float(mod.negative_slope)
    if t in (nn.ELU, nn.CELU):
        return ("elu" if t is nn.ELU else "celu"), float(mod.alpha)
    if t is nn.GELU:
        return ("gelu", None) if mod.approximate == "none" else ("gelu_" + mod.approximate, None)
    if t is nn.Hardtanh and float(mod.min_val) == 0.0 and float(mod.max_val) == 6.0:
        return "relu6", None
    lib = t.__module__
    if lib.startswith("timm.layers.activations") and t.__name__ in _TIMM_NAMES:
        return _TIMM_NAMES[t.__name__], None
    if _stateless(mod) and (
            (lib == "torch.nn.modules.activation" and t.__name__ not in _NOT_ELEMENTWISE)
            or (lib.startswith("timm.layers.activations") and "GLU" not in t.__name__)):
        return "module", mod
    return None


def _stateless(mod) -> bool:
    return not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers())


def node_activation(node, piece, input_node):
    """What ``node`` applies to ``input_node`` (its first argument) when it is an activation, else None."""
    if not node.args or node.args[0] is not input_node:
        return None
    if any(a is input_node for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    if node.op == "call_module":
        try:
            return module_activation(piece.submodule(node.target))
        except AttributeError:
            return None
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
    if target is F.hardtanh:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return ("relu6", None) if (lo, hi) == (0.0, 6.0) else None
    return None


def as_activation(found):
    """An ``Activation`` for a fusable (name, param), else None."""
    if found is None or found[0] == "module":
        return None
    name, param = found
    try:
        return get_activation(name, param)
    except ValueError:  # a name this version of the kernels does not know
        return None
