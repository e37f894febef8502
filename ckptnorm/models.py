"""Moved: the built-in models are ``ckptnorm.torch.models`` (they need PyTorch, and the core here does not).

``ckptnorm.models.NAME`` still works for one release and warns (``DeprecationWarning``).
"""
from __future__ import annotations

import warnings

_MOVED = ("preact_resnet", "postact_resnet", "get_model", "check_model_name", "MODEL_NAMES", "DEFAULT_MODEL")


def __getattr__(name):
    if name in _MOVED:
        warnings.warn(f"ckptnorm.models.{name} moved to ckptnorm.torch.models.{name}; tip: import it from there "
                      "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
        from .torch import models
        return getattr(models, name)
    raise AttributeError(f"module 'ckptnorm.models' has no attribute {name!r}")
