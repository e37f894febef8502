"""Per-channel statistics of a BatchNorm call: of this batch, of the union of every process's batch
(``Reducer``, synchronized BN), and the running-average update.  No torch here; arrays are float64 per channel,
of the backend's kind (NumPy, or a framework's device arrays: arithmetic operators only).
"""
from __future__ import annotations

import math


def channel_count(shape, layout) -> int:
    return int(shape[1] if layout == "ncs" else shape[2])


def elements_per_channel(shape, layout) -> int:
    return math.prod(shape) // channel_count(shape, layout)


def batch_statistics(backend, x, layout, eps, with_range=False):
    """Return (mean, var, invstd, xmin, xmax) of the batch, float64 per channel (range only ``with_range``)."""
    mean, var, xmin, xmax = backend.channel_stats(x, layout, with_range)
    return mean, var, (var + eps) ** -0.5, xmin, xmax


class Reducer:
    """Combines per-channel values across the processes of a synchronized BatchNorm (data-parallel training).

    A framework adapter implements it with its collectives (``ckptnorm.torch.sync.ProcessGroupReducer``:
    torch.distributed).  Arrays are float64 per channel, of the backend's kind (NumPy, or the framework's device
    arrays); results must be of the same kind and identical on every process.
    """

    def merge_stats(self, count, mean, var, extrema=()):
        """Statistics of the union of every process's batch: ``(count, mean, var, extrema)``.

        ``count`` (int), ``mean`` and the biased ``var`` describe this process's batch (count may be 0: then mean
        and var are ignored); ``extrema`` is a tuple of per-channel ``(low, high)`` pairs merged by min and max.
        One exchange per call.  The returned count is an int, the same on every process.
        """
        raise NotImplementedError

    def sum_channels(self, *arrays):
        """Per-channel arrays summed over the processes (one exchange for all of them), as a tuple."""
        raise NotImplementedError


def merged_statistics(backend, x, layout, eps, reducer, with_range=False, residual_range=None):
    """Batch statistics over every process's batch: ``(count, mean, var, invstd, xmin, xmax, residual_range)``.

    One exchange: this process's (count, mean, var), the range of x when ``with_range`` and ``residual_range``
    (the per-channel (min, max) of a residual, or None) travel together.
    """
    count = elements_per_channel(x.shape, layout)
    mean, var, xmin, xmax = backend.channel_stats(x, layout, with_range)
    extrema = ((xmin, xmax),) if with_range else ()
    if residual_range is not None:
        extrema += (tuple(residual_range),)
    count, mean, var, extrema = reducer.merge_stats(count, mean, var, extrema)
    if with_range:
        (xmin, xmax), extrema = extrema[0], extrema[1:]
    if residual_range is not None:
        residual_range = extrema[0]
    return count, mean, var, (var + eps) ** -0.5, xmin, xmax, residual_range


def updated_running_stats(running_mean, running_var, mean, var, count, factor):
    """New running statistics: (1 - factor) * running + factor * batch, with the unbiased variance (m / (m - 1)).

    All arguments float64 per channel; arithmetic operators only (device arrays welcome), so that the kernels
    compile this very function for scalars too (``backends.channel_math``, ``Backend.update_running_stats``).
    """
    unbiased = var * (count / (count - 1)) if count > 1 else var
    return (1.0 - factor) * running_mean + factor * mean, (1.0 - factor) * running_var + factor * unbiased
