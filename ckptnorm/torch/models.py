"""Models for ``ckptnorm compare`` / ``ckptnorm plan``: a built-in pre-activation ResNet and torchvision's models.

``preact_resnet`` is a small pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks") with
LeakyReLU, like the networks of the In-Place ABN paper, built from plain ``nn.BatchNorm2d`` and activation modules
so that ``ckptnorm.torch.convert`` finds its BN + activation sites.  ``postact_resnet`` is its post-activation
twin (the original ResNet block, ``BN -> add -> act`` at the end of each block, projection shortcuts with a BN):
its residual sites are where ``inplace_abn`` differs from ``efficient_checkpoint``.
``get_model("torchvision:NAME")`` builds torchvision's model NAME with random weights when torchvision (an optional
dependency) is installed.

(Moved here from ``ckptnorm.models``, which still re-exports these names for one release, with a warning.)
"""
from __future__ import annotations

import importlib.util

from torch import nn

__all__ = ["preact_resnet", "postact_resnet", "get_model", "check_model_name", "MODEL_NAMES", "DEFAULT_MODEL",
           "PreActBlock", "PreActResNet", "PostActBlock", "PostActResNet"]

DEFAULT_MODEL = "preact_resnet"
MODEL_NAMES = ("preact_resnet", "postact_resnet", "torchvision:NAME")
_ACTIVATIONS = ("leaky_relu", "relu", "elu")


def _activation(name, param):
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01 if param is None else param)
    if name == "relu":
        return nn.ReLU()
    return nn.ELU(1.0 if param is None else param)


def _stages(block, blocks, width, activation, activation_param):
    """Three ``nn.Sequential`` stages of ``blocks`` blocks, widths w, 2w, 4w, the first block of stages 2 and 3 with
    stride 2; returns (stages, output channels)."""
    channels, stages = width, []
    for stage in range(3):
        out = width * 2 ** stage
        stages.append(nn.Sequential(*(
            block(channels if i == 0 else out, out, 2 if stage and i == 0 else 1, activation, activation_param)
            for i in range(blocks))))
        channels = out
    return stages, channels


class PreActBlock(nn.Module):
    """``BN -> act -> conv3x3 -> BN -> act -> conv3x3`` plus the shortcut (identity, or a strided 1x1 conv of
    the pre-activated input when the shape changes)."""

    def __init__(self, in_channels, channels, stride, activation, activation_param):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = _activation(activation, activation_param)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = _activation(activation, activation_param)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x):
        a = self.act1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.act2(self.bn2(self.conv1(a)))) + residual

class PreActResNet(nn.Module):
    """``conv3x3 stem -> layer1..layer3 (nn.Sequential of PreActBlock) -> BN -> act -> pool -> fc``."""

    def __init__(self, blocks, width, num_classes, activation, activation_param):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        (self.layer1, self.layer2, self.layer3), channels = _stages(PreActBlock, blocks, width, activation,
                                                                    activation_param)
        self.bn = nn.BatchNorm2d(channels)
        self.act = _activation(activation, activation_param)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.pool(self.act(self.bn(x))).flatten(1))

class PostActBlock(nn.Module):
    """``conv3x3 -> BN -> act -> conv3x3 -> BN -> + shortcut -> act``; the shortcut is the identity, or a
    strided ``conv1x1 -> BN`` projection when the shape changes."""

    def __init__(self, in_channels, channels, stride, activation, activation_param):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = _activation(activation, activation_param)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = _activation(activation, activation_param)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + (x if self.shortcut is None else self.shortcut(x)))

class PostActResNet(nn.Module):
    """``conv3x3 -> BN -> act stem -> layer1..layer3 (nn.Sequential of PostActBlock) -> pool -> fc``."""

    def __init__(self, blocks, width, num_classes, activation, activation_param):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = _activation(activation, activation_param)
        (self.layer1, self.layer2, self.layer3), channels = _stages(PostActBlock, blocks, width, activation,
                                                                    activation_param)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(x)))).flatten(1))


def preact_resnet(depth=14, width=16, num_classes=10, activation="leaky_relu", activation_param=None):
    """A pre-activation ResNet for 3-channel images of any size >= 4x4: ``depth = 6n + 2`` (3 stages of n basic
    blocks of 2 convs each, plus stem and classifier), stage widths ``width``, ``2 width``, ``4 width``.

    The default (depth 14, width 16, 0.17 M parameters) runs a training step on 8x3x64x64 in a fraction of a second on
    2 CPU cores.  ``activation``: ``"leaky_relu"`` (slope ``activation_param``), ``"relu"`` or ``"elu"``.
    """
    _check_args("preact_resnet", depth, width, activation)
    return PreActResNet((depth - 2) // 6, width, num_classes, activation, activation_param)


def _check_args(model, depth, width, activation):
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ckptnorm: {model} depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth!r}; "
                         "tip: use depth=14")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"ckptnorm: {model} width must be a positive int, got {width!r}; tip: use width=16")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"ckptnorm: {model} activation must be one of {', '.join(_ACTIVATIONS)}, got "
                         f"{activation!r}; tip: use 'leaky_relu'")


def postact_resnet(depth=14, width=16, num_classes=10, activation="leaky_relu", activation_param=None):
    """The post-activation twin of ``preact_resnet`` (same depths, widths and arguments): every block ends with a
    residual site ``BN -> add -> act``."""
    _check_args("postact_resnet", depth, width, activation)
    return PostActResNet((depth - 2) // 6, width, num_classes, activation, activation_param)


def check_model_name(name: str) -> None:
    """Raise a one-line ``ValueError`` if ``get_model(name)`` cannot work (checked without building anything)."""
    if name in ("preact_resnet", "postact_resnet"):
        return
    if name.startswith("torchvision:") and name[len("torchvision:"):]:
        if importlib.util.find_spec("torchvision") is None:
            raise ValueError(f"ckptnorm: model {name!r} needs torchvision, which is not installed; tip: pip install "
                             "torchvision (an optional extra), or use the built-in model preact_resnet")
        return
    raise ValueError(f"ckptnorm: unknown model {name!r}; tip: use one of {', '.join(MODEL_NAMES)} "
                     "(e.g. torchvision:resnet50)")


def get_model(name: str = DEFAULT_MODEL, **kwargs):
    """Build a model by name: ``"preact_resnet"``, ``"postact_resnet"`` (``kwargs`` go to the builder) or
    ``"torchvision:NAME"``
    (torchvision's ``models.get_model(NAME, weights=None, **kwargs)``).  Raises a one-line ``ValueError``."""
    check_model_name(name)
    if name == "preact_resnet":
        return preact_resnet(**kwargs)
    if name == "postact_resnet":
        return postact_resnet(**kwargs)
    import torchvision
    arch = name[len("torchvision:"):]
    try:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    except ValueError as exc:
        raise ValueError(f"ckptnorm: torchvision has no model {arch!r} ({exc}); tip: see "
                         "torchvision.models.list_models()") from None
