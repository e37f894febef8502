"""Test session set-up.

Without a CUDA GPU, the CUDA kernels run under Numba's CUDA simulator, so that the README's single test command
exercises them on a CPU-only machine.  Numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so this must
happen here, before any test module imports numba.
"""
import os

import pytest


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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: outside the quick tier, `python -m pytest -m \"not slow\"` (given by "
        "pytest_collection_modifyitems below to every case of a test function but its first)")
    config.addinivalue_line(
        "markers", "serial: measures process RSS or wall time, or spawns process groups: run without other tests "
        "beside it (the README's test command runs these after the parallel part)")
    # CKPTNORM_COMPILE_REPORT=FILE: Numba compile time per test file and kernel family (tests/compile_report.py);
    # imported here, after NUMBA_ENABLE_CUDASIM is settled above.
    report_path = os.environ.get("CKPTNORM_COMPILE_REPORT")
    if report_path:
        from compile_report import CompileReport
        config.pluginmanager.register(CompileReport(report_path), "ckptnorm_compile_report")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config, items):
    """The quick tier: the first case of every test function (its first parametrization), so that every test,
    module and code path the suite has is reached once, with the fewest kernel specializations to compile; the
    other cases are ``slow``.  A whole test marked ``slow`` stays slow."""
    seen = set()
    for item in items:
        function = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        if function in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(function)
