"""Synchronized BatchNorm over ``torch.distributed``: the ``Reducer`` the strategies call, and its helpers.

Each process of a data-parallel job holds part of the batch.  Synchronized BN normalizes with the statistics of
the whole batch, so every strategy exchanges per-channel values twice per training step (``ckptnorm.strategies``,
invariant 5):

* forward: one ``all_gather`` of this process's (count, mean, M2 = var * count) and, when a keep decision needs
  them, per-channel ranges; each process then merges the table in float64 with the exact two-level formula
  mean = sum(n_r mean_r) / n, M2 = sum(M2_r) + sum(n_r (mean_r - mean)^2) -- no sum of squares, so it stays
  accurate when |mean| >> std -- and every process gets bit-identical statistics (same table, same order).
  Gathering rather than all-reducing sums keeps each rank's mean, which that exact merge needs; a rank with an
  empty batch takes part with n_r = 0.
* backward: one ``all_reduce`` (sum) of (sum dy, sum dy * xhat), or (sum dy, sum dy * (y - beta)) from z, before
  the dx coefficients (skipped, on every process alike, when the layer's input needs no gradient).  dgamma and
  dbeta stay each process's share: DistributedDataParallel reduces parameter gradients itself.  ``checkpoint``
  recomputes its statistics in backward, so it gathers them a second time there.

Every process must see the same parameters (as DDP keeps them): ``inplace_abn``'s keep decision reads gamma and
beta, and the merged ranges, so that all processes run the same backward path.

Eval mode never communicates.  A collective that fails -- a process died, or stopped calling the layer and the
group's timeout ran out -- raises ``SyncBatchNormError`` ("ckptnorm: ...").  With NCCL the forward exchange waits
on the host (the merged count is needed there anyway) with the group's timeout, so it raises too; the backward
all-reduce stays asynchronous on the stream, as PyTorch's SyncBatchNorm does, and a failure there is ended by
NCCL's watchdog after the same timeout.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.distributed as dist

from .._caller import warn_at_caller
from ..channel_stats import Reducer
from . import _compat

__all__ = ["ProcessGroupReducer", "SyncBatchNormError", "SyncFallbackWarning", "EmptyBatchBackend",
           "reducer_for"]

_TIP = ("tip: read the other processes' output for the first error; every process must call the same "
        "synchronized layers in the same order (a process without data still calls them, with an empty batch)")


class SyncBatchNormError(RuntimeError):
    """A synchronized BatchNorm exchange failed (another process died, or timed out)."""


class SyncFallbackWarning(UserWarning):
    """A synchronized BatchNorm layer ran in training without torch.distributed: local statistics were used."""


class ProcessGroupReducer(Reducer):
    """``Reducer`` over a torch.distributed process group (gloo for CPU tensors, NCCL for CUDA tensors).

    Accepts per-channel NumPy arrays (the CPU backend's) or float64 tensors (the CUDA backend's) and returns the
    same kind.  One collective per call.
    """

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)

    # -- transport ----------------------------------------------------------------------------------------------
    def _run(self, what, collective, *args, wait_on_host):
        try:
            work = collective(*args, group=self.group, async_op=True)
            timeout = _compat.group_timeout(self.group, args[-1].device) if wait_on_host else None
            if timeout is not None:
                work.wait(timeout)
            else:
                work.wait()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SyncBatchNormError(
                f"ckptnorm: synchronized BatchNorm could not {what} with the other {self.world_size - 1} "
                f"process(es) of its group ({type(exc).__name__}: {first}); a process probably exited, crashed, "
                f"or stopped calling this layer until the group's timeout ran out; {_TIP}") from exc

    @staticmethod
    def _to_tensor(values):
        return values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values, np.float64))

    @staticmethod
    def _like(template, t):
        return t if isinstance(template, torch.Tensor) else t.numpy()

    # -- Reducer ------------------------------------------------------------------------------------------------
    def merge_stats(self, count, mean, var, extrema=()):
        device = mean.device if isinstance(mean, torch.Tensor) else torch.device("cpu")
        channels = len(mean)
        rows = 2 + 2 * len(extrema)
        local = torch.empty(1 + rows * channels, dtype=torch.float64, device=device)
        local[0] = count
        body = local[1:].view(rows, channels)
        if count:
            body[0] = self._to_tensor(mean)
            body[1] = self._to_tensor(var) * count
        else:  # an empty batch's statistics are undefined (NaN): it contributes nothing
            body[:2] = 0.0
        for i, (low, high) in enumerate(extrema):
            body[2 + 2 * i] = self._to_tensor(low)
            body[3 + 2 * i] = self._to_tensor(high)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self._run("exchange its batch statistics", dist.all_gather, gathered, local, wait_on_host=True)
        table = torch.stack(gathered)
        counts = table[:, :1]
        total = int(sum(table[:, 0].tolist()))  # host copy of one number per process: m is an int in the formulas
        if total <= 1:
            raise ValueError(f"ckptnorm: expected more than 1 value per channel when training, got {total} over "
                             f"{self.world_size} processes; tip: use a larger batch, or eval mode")
        parts = table[:, 1:].view(self.world_size, rows, channels)
        means = parts[:, 0]
        merged_mean = (counts * means).sum(0) / total
        merged_var = (parts[:, 1].sum(0) + (counts * (means - merged_mean) ** 2).sum(0)) / total
        merged_extrema = tuple((self._like(low, parts[:, 2 + 2 * i].amin(0)),
                                self._like(high, parts[:, 3 + 2 * i].amax(0)))
                               for i, (low, high) in enumerate(extrema))
        return total, self._like(mean, merged_mean), self._like(var, merged_var), merged_extrema

    def sum_channels(self, *arrays):
        device = arrays[0].device if isinstance(arrays[0], torch.Tensor) else torch.device("cpu")
        stacked = torch.stack([self._to_tensor(a) for a in arrays]).to(device)
        self._run("sum its gradient statistics", dist.all_reduce, stacked, wait_on_host=device.type != "cuda")
        return tuple(self._like(a, row) for a, row in zip(arrays, stacked))


def reducer_for(module, process_group):
    """The reducer for one training forward of ``module``, or None: local BN.

    Not initialized: local statistics, with one ``SyncFallbackWarning`` per module.  A group of one process: local
    statistics, silently (they are the synchronized ones).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if not getattr(module, "_warned_local", False):
            module._warned_local = True
            warn_at_caller(
                f"ckptnorm: {type(module).__name__} runs in training without torch.distributed, so it normalizes "
                "with this process's batch only (local BatchNorm); tip: call torch.distributed.init_process_group "
                "before training, or use the BatchNormAct layers for single-process training",
                SyncFallbackWarning)
        return None
    if dist.get_world_size(process_group) == 1:
        return None
    return ProcessGroupReducer(process_group)


class EmptyBatchBackend:
    """Stands in for the backend on a process whose batch is empty (N = 0), so that it still takes part in every
    exchange: its statistics are placeholders (weight 0 in the merge), its sums zero, its elementwise passes
    nothing.  The kernels themselves are never called on empty arrays."""

    def __init__(self, backend, channels, device):
        self.backend, self.channels, self.device = backend, channels, device

    def _full(self, value):
        if self.device.type == "cpu":
            return np.full(self.channels, value)
        return torch.full((self.channels,), value, dtype=torch.float64, device=self.device)

    def channel_stats(self, x, layout, with_range=False):
        extrema = (self._full(np.inf), self._full(-np.inf)) if with_range else (None, None)
        return (self._full(0.0), self._full(0.0), *extrema)

    def normalize_act(self, *args, **kwargs):
        pass

    def reduce_from_input(self, *args, **kwargs):
        return self._full(0.0), self._full(0.0)

    def reduce_from_output(self, *args, **kwargs):
        return self._full(0.0), self._full(0.0)

    def dx_from_input(self, *args, **kwargs):
        pass

    def dx_from_output(self, *args, **kwargs):
        pass

    def update_running_stats(self, *args):
        self.backend.update_running_stats(*args)  # with the statistics of every process's batch

    def to_host(self, array):
        return self.backend.to_host(array)
