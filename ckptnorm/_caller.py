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


def _package_dirs():
    """The folders of ckptnorm and, when it is loaded, torch (each ending with a separator)."""
    return tuple(os.path.dirname(os.path.abspath(sys.modules[name].__file__)) + os.sep
                 for name in ("ckptnorm", "torch") if name in sys.modules)


def warn_at_caller(message, category):
    """``warnings.warn(message, category)`` with the stack level of the first frame outside ckptnorm and torch."""
    internal = _package_dirs()
    frame, level = sys._getframe(1), 2  # level 2: warn_at_caller's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
