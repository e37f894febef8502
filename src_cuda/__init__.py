"""CUDA kernels (numba-cuda), installed as ``ckptnorm._cuda``.

* ``kernels`` -- ``@cuda.jit`` kernels for every primitive of ``ckptnorm.backends.base.Backend``, both memory-order
  layouts ("ncs", "nsc"), float32/float64 activations or fp16/bf16 ones as uint16/int16 bit views
  (``ckptnorm/backends/storage.py``) with float64 arithmetic, and two-level deterministic reductions (per-block
  partials folded in a fixed order, no float atomics).  Compiled lazily on first launch: importing them needs no
  GPU, driver or simulator.
* ``backend`` -- ``CUDABackend(allocate=None, stream=0)``: launches on ``stream``, takes every buffer it needs from
  ``allocate`` and never waits for the device (``get_backend("cuda")``; the PyTorch adapter builds one per tensor
  device with PyTorch's allocator and current stream).

Without a GPU, Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set by tests/conftest.py) runs the same kernels.
"""
