"""CUDA kernels (numba-cuda), installed as ``ckptnorm._cuda``.

Not implemented yet: the CUDA backend is the next milestone.  Until then CUDA tensors are rejected by
``ckptnorm.torch`` with a clear error, and ``ckptnorm.backends.get_backend("cuda")`` raises.
"""
