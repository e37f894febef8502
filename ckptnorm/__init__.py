"""ckptnorm: memory-saving BatchNorm + activation layers.

The core (this package) is framework-agnostic: activations, strategies, the float64 reference and the backends
import neither torch nor numba.cuda.  The PyTorch adapter lives in ``ckptnorm.torch``.
"""
from .activations import ACTIVATION_NAMES, Activation, get_activation
from .strategies import (STRATEGY_NAMES, Checkpoint, EfficientCheckpoint, InplaceABN, PrecisionFallbackWarning,
                         Standard, Strategy, get_strategy, register_strategy)

__version__ = "0.1.0"


class _SourceTreeCuda:
    """Finds ``ckptnorm._cuda`` in a source checkout run without ``pip install`` (``PYTHONPATH=.``, as on a lent GPU
    machine that cannot install anything): there the CUDA kernels are ``src_cuda/`` beside this package, which an
    install maps to ``ckptnorm._cuda`` (setup.cfg's ``package_dir``).  Consulted after every other finder, so an
    installed or editable ``ckptnorm._cuda`` always wins."""

    def __init__(self, directory):
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        if name != "ckptnorm._cuda":
            return None
        import importlib.util
        import os
        return importlib.util.spec_from_file_location(name, os.path.join(self.directory, "__init__.py"),
                                                      submodule_search_locations=[self.directory])


def _find_source_tree_cuda():
    import os
    import sys
    directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src_cuda")
    if os.path.isfile(os.path.join(directory, "__init__.py")) and not any(
            isinstance(finder, _SourceTreeCuda) for finder in sys.meta_path):
        sys.meta_path.append(_SourceTreeCuda(directory))


_find_source_tree_cuda()

__all__ = [
    "ACTIVATION_NAMES", "Activation", "get_activation",
    "STRATEGY_NAMES", "Strategy", "Standard", "Checkpoint", "EfficientCheckpoint", "InplaceABN",
    "PrecisionFallbackWarning", "get_strategy", "register_strategy", "__version__",
]
