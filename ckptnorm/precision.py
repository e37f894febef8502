"""inplace_abn's precision rule (``strategies.InplaceABN``) as one compiled pass over the channels.

Channel c may keep z alone when ``0 < |gamma_c| < inf`` and ``|beta_c| + max|r_c| <= (budget - 1) |gamma_c|``
(budget = 2**MAX_LOST_BITS; r the residual, 0 without one).  The rule runs on the host at every training forward
of inplace_abn: as NumPy expressions it takes about ten array operations, several microseconds each on a small
layer, and as this loop one call.  Imported on first use, so that ``import ckptnorm`` does not load Numba.
"""
from __future__ import annotations

import math

from numba import njit


@njit(cache=True, nogil=True)
def first_lossy_channel(gamma, beta, residual_abs, has_residual, budget):
    """The first channel that breaks the rule, or -1.  ``residual_abs``: max|r| per channel, read only when
    ``has_residual`` (otherwise a stand-in, so that both cases share one compiled signature).  A NaN anywhere
    breaks the rule (every comparison with NaN is false)."""
    for c in range(gamma.shape[0]):
        g = abs(gamma[c])
        slack = abs(beta[c]) + (residual_abs[c] if has_residual else 0.0)
        if not (g > 0.0 and g < math.inf and slack <= (budget - 1.0) * g):
            return c
    return -1
