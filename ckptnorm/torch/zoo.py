"""Models of the common libraries by name, with random weights, and the training loss used on their outputs.

``build_model(spec)`` takes one of

* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None)``; builders that take a backbone
  (``deeplabv3_resnet50``, ``fcn_resnet50``, ``lraspp_mobilenet_v3_large``, ...) also get ``weights_backbone=None``,
  so nothing is ever downloaded;
* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``;
* ``smp:ARCH:ENCODER`` -- ``segmentation_models_pytorch.create_model(ARCH, ENCODER, encoder_weights=None)``, e.g.
  ``smp:Unet:resnet18``, ``smp:FPN:efficientnet-b0``, ``smp:DeepLabV3Plus:resnet34``

and returns ``(model, example_input)``: the model in training mode, float32, weights drawn from ``seed``, and an
input ``batch x 3 x S x S`` with the smallest side S from ``INPUT_SIDES`` (64 first) that the model accepts (checked
with one forward in eval mode, without gradients, which changes no parameter or buffer).  The libraries are
imported only when a model of theirs is built (none of them is a dependency of ckptnorm: ``pip install -e
".[zoo]"`` after torch and its torchvision).

``flatten_outputs(out)`` lists the tensors of a model output: a tensor, tuples/lists (torchvision's GoogLeNet
returns ``(logits, aux2, aux1)`` in training), dicts (torchvision's segmentation models return ``{"out": ...,
"aux": ...}``), objects with a ``.logits`` tensor; ``None`` and non-tensor leaves are skipped.
``training_loss(out)`` is the loss ``compare``, ``plan`` and ``check_equivalence`` backpropagate: the sum over the
floating-point outputs of cross-entropy against fixed pseudo-random labels for a classifier's ``N x K`` logits
(K > 1), the mean of squares for any other tensor.  It is computed in the outputs' own dtype (float16 and bfloat16
in float32), so a float64 model gets a float64 loss.
"""
from __future__ import annotations

import difflib
import importlib.util

import torch

__all__ = ["build_model", "check_spec", "parse_spec", "flatten_outputs", "training_loss", "SPEC_FORMS",
           "INPUT_SIDES"]

SPEC_FORMS = ("torchvision:NAME", "timm:NAME", "smp:ARCH:ENCODER")
INPUT_SIDES = (64, 96, 128, 160, 192, 224, 256, 299, 320, 384, 512)  # tried in this order
_LIBRARIES = {"torchvision": "torchvision", "timm": "timm", "smp": "segmentation_models_pytorch"}
_PIP_NAMES = {"torchvision": "torchvision (installed together with its torch: pip install torch==2.14.1 "
                             "torchvision==0.29.1)",
              "timm": "timm (pip install -e '.[zoo]')",
              "smp": "segmentation-models-pytorch (pip install -e '.[zoo]')"}
_TIP = ("tip: use torchvision:NAME, timm:NAME or smp:ARCH:ENCODER (e.g. torchvision:resnet50, timm:efficientnet_b0, "
        "smp:Unet:resnet18)")


def _close(word, names):
    close = difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)
    return f" (close: {', '.join(close)})" if close else ""


def parse_spec(spec) -> tuple:
    """``("torchvision", NAME)``, ``("timm", NAME)`` or ``("smp", ARCH, ENCODER)``; a one-line ``ValueError`` for
    anything else (nothing is imported)."""
    if not isinstance(spec, str):
        raise TypeError(f"ckptnorm: a model spec is a string, got {type(spec).__name__}; {_TIP}")
    library, _, rest = spec.partition(":")
    if library not in _LIBRARIES:
        raise ValueError(f"ckptnorm: unknown model library {library!r} in {spec!r}; {_TIP}")
    parts = rest.split(":") if rest else []
    expected = 2 if library == "smp" else 1
    if len(parts) != expected or not all(parts):
        form = next(f for f in SPEC_FORMS if f.startswith(library + ":"))
        raise ValueError(f"ckptnorm: model spec {spec!r} is not of the form {form}; {_TIP}")
    return (library, *parts)


def check_spec(spec) -> None:
    """Raise a one-line ``ValueError`` if ``spec`` is malformed or its library is not installed (builds nothing)."""
    library = parse_spec(spec)[0]
    if importlib.util.find_spec(_LIBRARIES[library]) is None:
        raise ValueError(f"ckptnorm: model {spec!r} needs {library}, which is not installed; tip: install "
                         f"{_PIP_NAMES[library]}")


def _import(library):
    """The library's module; a one-line ``ValueError`` when it is installed but does not import (a torchvision built
    for another torch, typically)."""
    try:
        return importlib.import_module(_LIBRARIES[library])
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"ckptnorm: {library} is installed but cannot be imported ({type(exc).__name__}: {first}); "
                         f"tip: install {_PIP_NAMES[library]}") from None


def _torchvision(name, kwargs):
    import inspect

    torchvision = _import("torchvision")
    names = torchvision.models.list_models()
    if name not in names:
        raise ValueError(f"ckptnorm: torchvision has no model {name!r}{_close(name, names)}; tip: see "
                         "torchvision.models.list_models()")
    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    config = {"weights": None}
    if "weights_backbone" in params:
        config["weights_backbone"] = None  # segmentation / detection: no backbone download either
    config.update(kwargs)
    return builder(**config)


def _timm(name, kwargs):
    timm = _import("timm")
    if not timm.is_model(name):
        raise ValueError(f"ckptnorm: timm has no model {name!r}{_close(name, timm.list_models())}; tip: see "
                         "timm.list_models('PATTERN*')")
    return timm.create_model(name, pretrained=False, **kwargs)


def _smp(arch, encoder, kwargs):
    smp = _import("smp")
    archs = sorted(smp.MODEL_ARCHITECTURES_MAPPING.values(), key=str)
    arch_names = {a.__name__.lower(): a.__name__ for a in archs}
    if arch.lower() not in arch_names:
        raise ValueError(f"ckptnorm: segmentation_models_pytorch has no architecture {arch!r}; tip: use one of "
                         f"{', '.join(sorted(arch_names.values()))}")
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders and not encoder.startswith("tu-"):
        raise ValueError(f"ckptnorm: segmentation_models_pytorch has no encoder {encoder!r}"
                         f"{_close(encoder, encoders)}; tip: see segmentation_models_pytorch.encoders."
                         "get_encoder_names(), or use tu-NAME for a timm encoder")
    return smp.create_model(arch_names[arch.lower()], encoder_name=encoder, encoder_weights=None, **kwargs)


def _fits(model, x) -> bool:
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, AssertionError, IndexError):
        return False
    return True


def build_model(spec, input_shape=None, *, batch=2, seed=0, **kwargs):
    """``(model, example_input)`` for ``spec`` (see the module docstring); ``kwargs`` go to the library's builder
    (e.g. ``aux_loss=True`` for torchvision's segmentation models, ``num_classes=10``).

    ``input_shape``: the example input's shape (checked: a one-line ``ValueError`` if the model rejects it); by
    default ``batch x 3 x S x S`` with the smallest working S of ``INPUT_SIDES``.  ``seed`` seeds the weights and
    the input.  The model comes back in training mode, float32, on the CPU.
    """
    parsed = parse_spec(spec)
    check_spec(spec)
    library = parsed[0]
    torch.manual_seed(seed)
    try:
        if library == "torchvision":
            model = _torchvision(parsed[1], kwargs)
        elif library == "timm":
            model = _timm(parsed[1], kwargs)
        else:
            model = _smp(parsed[1], parsed[2], kwargs)
    except TypeError as exc:  # an unknown keyword argument of the builder
        raise ValueError(f"ckptnorm: cannot build {spec!r}: {str(exc).splitlines()[0]}; tip: check the keyword "
                         "arguments passed to build_model") from None
    generator = torch.Generator().manual_seed(seed + 1)
    model.eval()
    try:
        if input_shape is not None:
            shape = tuple(int(d) for d in input_shape)
            x = torch.randn(shape, generator=generator)
            if not _fits(model, x):
                raise ValueError(f"ckptnorm: input {'x'.join(map(str, shape))} does not fit model {spec!r}; tip: "
                                 "omit the input shape to get the smallest that works")
            return model, x
        for side in INPUT_SIDES:
            x = torch.randn((batch, 3, side, side), generator=generator)
            if _fits(model, x):
                return model, x
        raise ValueError(f"ckptnorm: no input {batch}x3xSxS with S in {INPUT_SIDES[0]}..{INPUT_SIDES[-1]} fits model "
                         f"{spec!r}; tip: pass input_shape")
    finally:
        model.train()


# -- outputs and the training loss ------------------------------------------------------------------------------
def flatten_outputs(out) -> list:
    """The tensors of a model output, depth first: tensors, tuples/lists, dicts (values in order), objects with a
    ``.logits`` attribute; anything else (None, numbers, strings) is skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    logits = getattr(out, "logits", None)
    return flatten_outputs(logits) if logits is not None else []


def training_loss(out):
    """The loss of a training step on ``out`` (see the module docstring); ``None`` when ``out`` holds no
    floating-point tensor."""
    total = None
    for t in flatten_outputs(out):
        if not t.is_floating_point():
            continue
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if t.ndim == 2 and t.shape[1] > 1:  # classifier logits: cross-entropy against fixed labels
            target = torch.arange(t.shape[0], device=t.device) * 7919 % t.shape[1]
            part = torch.nn.functional.cross_entropy(t, target)
        else:
            part = t.square().mean()
        total = part if total is None else total + part
    return total
