"""Warnings attributed to the user's line: the first frame outside ckptnorm and torch.

A warning raised deep in a layer's call (strategy -> autograd Function -> module) with a fixed ``stacklevel``
points at whichever frame happens to sit that many levels up -- inside autograd or ``nn.Module.__call__`` -- and
the path there differs between the module, the functional call and a converted model.  Walking out of both
packages finds the line the user wrote, whatever the path.
"""
from __future__ import annotations

import os
import sys
import warnings

_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules["ckptnorm"],))


def _torch_dir():
    torch = sys.modules.get("torch")
    return None if torch is None else os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def warn_at_caller(message, category):
    """``warnings.warn(message, category)`` with the stack level of the first frame outside ckptnorm and torch."""
    internal = _INTERNAL + tuple(d for d in (_torch_dir(),) if d is not None)
    frame, level = sys._getframe(1), 2  # level 2: warn_at_caller's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
