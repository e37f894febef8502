"""One measured training step, shared by ``compare``, ``plan`` and the benchmarks (``benchmarks/``).

A step is: gradients cleared, forward, ``ckptnorm.torch.zoo.training_loss`` of the outputs (every output tensor of
tuples, lists and dicts; cross-entropy for a classifier's logits, the mean of squares otherwise), backward.  Every
tool times and counts that same step, so that a plan is chosen on the step the comparison shows.

* ``saved_bytes``: exact bytes kept for backward by the step's forward and loss (``SavedTensorsCounter``: each storage
  once, rematerialization in effect, the model's parameters and buffers and the inputs excluded);
* ``median_times``: median step time of several models, round-robin (interleaved, so slow drifts of a shared
  machine cancel in their ratios), with a device synchronization around each CUDA step;
* ``rss`` / ``release_free_memory``: the process's resident set, and freed heap memory handed back to the OS
  before reading it (with ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment big buffers go back at once).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import time

import torch

from ._recompute import SavedTensorsCounter
from .zoo import training_loss

__all__ = ["as_inputs", "median_times", "release_free_memory", "rss", "saved_bytes", "training_step"]


def as_inputs(example_inputs) -> tuple:
    """The model's positional inputs as a tuple (a single tensor becomes a 1-tuple)."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def training_step(model, inputs, *, counter=None, probe=None, tool="compare"):
    """One step (module docstring).  ``counter``: a ``SavedTensorsCounter`` entered around forward and loss.
    ``probe``: called between the loss and backward (what is held for backward is alive then).  ``tool`` names
    the caller in the error raised when the model returns no floating-point tensor."""
    model.zero_grad(set_to_none=True)
    with counter if counter is not None else contextlib.nullcontext():
        out = model(*inputs)
        loss = training_loss(out)
    del out
    if loss is None:
        raise TypeError(f"ckptnorm: {tool} needs a model output with floating-point tensors (a tensor, or tuples, "
                        "lists or dicts of them); tip: wrap the model so that it returns its output tensors")
    if probe is not None:
        probe()
    loss.backward()


def saved_bytes(model, inputs, *, tool="compare") -> int:
    """Exact bytes kept for backward by one step of ``model`` (module docstring); runs that step."""
    counter = SavedTensorsCounter(exclude=[model, *[t for t in inputs if isinstance(t, torch.Tensor)]])
    training_step(model, inputs, counter=counter, tool=tool)
    return counter.saved_bytes


def _device_of(inputs):
    return next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))


def median_times(models, inputs, repeats, *, setups=None, tool="compare") -> list:
    """Median step time of each model over ``repeats`` round-robin rounds.  ``setups[k]()`` (if given) runs before
    model k's step, untimed, and returns the model to step (a candidate swapped into a shared copy)."""
    device = _device_of(inputs)
    cuda = device.type == "cuda"
    times = [[] for _ in models]
    for _ in range(repeats):
        for k, m in enumerate(models):
            if setups is not None:
                m = setups[k]()
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            training_step(m, inputs, tool=tool)
            if cuda:
                torch.cuda.synchronize(device)
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def rss():
    """Resident set size of this process in bytes (``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory():
    """Hand the heap's free memory back to the OS (glibc ``malloc_trim``), so that RSS shows what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
