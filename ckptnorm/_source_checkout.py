"""A source checkout run without ``pip install`` (``PYTHONPATH=.``, as on a lent GPU machine that can install
nothing): there the CUDA kernels are ``src_cuda/`` beside the ``ckptnorm`` package, which an install maps to
``ckptnorm._cuda`` (setup.cfg's ``package_dir``).  ``add_cuda_finder`` lets ``import ckptnorm._cuda`` find them.
"""
from __future__ import annotations

import importlib.util
import os
import sys


class SourceTreeCuda:
    """A meta-path finder for ``ckptnorm._cuda`` only, appended after every other finder: an installed or editable
    ``ckptnorm._cuda`` always wins."""

    def __init__(self, directory):
        self.directory = directory

    def find_spec(self, name, path=None, target=None):
        if name != "ckptnorm._cuda":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(self.directory, "__init__.py"),
                                                      submodule_search_locations=[self.directory])


def add_cuda_finder():
    """Append the finder when ``src_cuda/`` lies beside the package (a source checkout; never in an install)."""
    directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src_cuda")
    if os.path.isfile(os.path.join(directory, "__init__.py")) and not any(
            isinstance(finder, SourceTreeCuda) for finder in sys.meta_path):
        sys.meta_path.append(SourceTreeCuda(directory))
