"""ckptnorm: memory-saving BatchNorm + activation layers.

The core (this package) is framework-agnostic: activations, strategies, the float64 reference and the backends
import neither torch nor numba.cuda.  The PyTorch adapter lives in ``ckptnorm.torch``.
"""
from ._source_checkout import add_cuda_finder
from .activations import ACTIVATION_NAMES, Activation, get_activation
from .strategies import (STRATEGY_NAMES, Checkpoint, EfficientCheckpoint, InplaceABN, PrecisionFallbackWarning,
                         Standard, Strategy, get_strategy, register_strategy, strategy_names)

__version__ = "0.1.0"

add_cuda_finder()  # a source checkout without an install: ckptnorm._cuda is src_cuda/

__all__ = [
    "ACTIVATION_NAMES", "Activation", "get_activation",
    "STRATEGY_NAMES", "Strategy", "Standard", "Checkpoint", "EfficientCheckpoint", "InplaceABN",
    "PrecisionFallbackWarning", "get_strategy", "register_strategy", "strategy_names", "__version__",
]
