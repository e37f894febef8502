"""PyTorch adapter: ``batch_norm_act``, drop-in ``BatchNormAct*d`` modules, and saved-memory accounting."""
from ._arrays import use_backend
from ._recompute import SavedTensorsCounter, pack_hook, unpack_hook
from .convert import ConversionReport, SiteDecision, convert
from .function import BatchNormActFunction, batch_norm_act
from .modules import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .sites import Site, SiteDiscoveryWarning, find_sites

__all__ = ["batch_norm_act", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormActFunction",
           "SavedTensorsCounter", "pack_hook", "unpack_hook", "use_backend",
           "convert", "ConversionReport", "SiteDecision", "find_sites", "Site", "SiteDiscoveryWarning"]
