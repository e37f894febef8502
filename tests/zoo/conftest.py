"""The zoo suite: torchvision, timm and segmentation-models-pytorch models converted under every strategy and checked
against the original in float64 (``ckptnorm.torch.check_equivalence``).

Not part of the README's ``python -m pytest`` (tests/conftest.py leaves this directory out); run it as
``python -m pytest tests/zoo`` in an environment with torch, its torchvision, and ``pip install -e ".[test,zoo]"``.
``.ci/run`` does so with ``CKPTNORM_ZOO=1``, which turns a missing zoo library into an error instead of a skip:
the zoo job cannot pass without running the models.
"""
import importlib
import os

import pytest

REQUIRED = os.environ.get("CKPTNORM_ZOO") == "1"
LIBRARIES = ("torchvision", "timm", "segmentation_models_pytorch")


def pytest_configure(config):
    if not REQUIRED:
        return
    for name in LIBRARIES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a torchvision built for another torch (RuntimeError, OSError)
            raise pytest.UsageError(
                f"ckptnorm: CKPTNORM_ZOO=1 but {name} cannot be imported ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); tip: pip install torch==2.14.1 "
                "torchvision==0.29.1, then pip install -e '.[test,zoo]'") from None


def pytest_terminal_summary(terminalreporter):
    """With CKPTNORM_ZOO_RECORD=FILE: the per-model table of what the checks found (sites, saving, error)."""
    path = os.environ.get("CKPTNORM_ZOO_RECORD")
    if not path or not os.path.exists(path):
        return
    from zoo_cases import summary
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines:
        terminalreporter.write_sep("=", "zoo: sites, saved bytes (float64, test batch) and float64 error per model")
        terminalreporter.write_line(summary(lines))
