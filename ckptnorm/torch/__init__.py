"""PyTorch adapter: ``batch_norm_act``, drop-in ``BatchNormAct*d`` modules and their synchronized versions
(``SyncBatchNormAct*d``, ``convert_sync``), saved-memory accounting, model conversion (``find_sites``, ``convert``),
the memory-budget planner (``plan``) and the comparison (``compare``)."""
from ._arrays import use_backend
from ._recompute import SavedTensorsCounter, pack_hook, unpack_hook
from .compare import Comparison, compare
from .compiled import COMPILE_OPTIONS
from .convert import ConversionReport, SiteDecision, convert, convert_sync
from .equivalence import Equivalence, check_equivalence
from .function import BatchNormActFunction, batch_norm_act
from .modules import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    SyncBatchNormAct1d,
    SyncBatchNormAct2d,
    SyncBatchNormAct3d,
)
from .planner import Plan, PlanEntry, plan
from .sites import Site, SiteDiscoveryWarning, find_sites
from .sync import ProcessGroupReducer, SyncBatchNormError, SyncFallbackWarning

__all__ = ["batch_norm_act", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormActFunction",
           "SavedTensorsCounter", "pack_hook", "unpack_hook", "use_backend",
           "convert", "ConversionReport", "SiteDecision", "find_sites", "Site", "SiteDiscoveryWarning",
           "plan", "Plan", "PlanEntry", "compare", "Comparison", "COMPILE_OPTIONS",
           "SyncBatchNormAct1d", "SyncBatchNormAct2d", "SyncBatchNormAct3d", "convert_sync", "ProcessGroupReducer",
           "SyncBatchNormError", "SyncFallbackWarning", "check_equivalence", "Equivalence"]
