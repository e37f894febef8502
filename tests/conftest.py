"""Test session set-up.

Without a CUDA GPU, the CUDA kernels run under Numba's CUDA simulator, so that the README's single test command
exercises them on a CPU-only machine.  Numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so this must
happen here, before any test module imports numba.
"""
import os


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

# tests/zoo (torchvision, timm and smp models: a separate job in .ci/run, its own environment) is not part of the
# README's `python -m pytest`; run it as `python -m pytest tests/zoo`.
collect_ignore = ["zoo"]
