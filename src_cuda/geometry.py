"""Launch geometry of the numba-cuda kernels (``kernels.py``): named constants, the host-side grid sizes (they
depend on the shape only, so reductions are deterministic), and the device helpers for indexing and for folding
partial sums.  Numba's disk cache of ``kernels.py`` does not notice edits here: clear ``src_cuda/__pycache__``.
"""
from __future__ import annotations

from numba import cuda
from numba.cuda import int64

from ckptnorm.backends.storage import widen

# -- launch geometry ------------------------------------------------------------------------------------------------
# 256 threads = 8 warps per block: enough to hide memory latency at full occupancy (8 such blocks fill an SM's
# 2048 threads) and a shared-memory fold of 256 float64 values per quantity (2 KiB) that costs two barriers.
THREADS_PER_BLOCK = 256
# Elementwise kernels give each thread at least this many elements (fewer, fatter threads amortize the index set-up,
# as PyTorch's elementwise loops do) ...
ELEMENTWISE_ITEMS_PER_THREAD = 4
# ... and use at most this many blocks (about 30 per SM on a 132-SM H100: several full waves on any current GPU);
# larger tensors are covered by a grid-stride loop.
ELEMENTWISE_MAX_BLOCKS = 4096
# Reductions split a channel over another block only when each thread still gets this many elements: the block's
# fold (two barriers) and its partial stay a small fraction of the work.
REDUCE_ITEMS_PER_THREAD = 16
# Reductions stop splitting channels once the grid has about this many blocks (8 resident blocks per SM on a
# 132-SM GPU: a full wave); more blocks would only add partials.
REDUCE_TARGET_BLOCKS = 1024
# Hard cap on partials per channel: the finalize kernel folds them serially, one thread per channel.
REDUCE_MAX_PARTIALS = 256
# A launch with less work than one full block gets only the threads that have work, rounded up to whole warps
# (at least one warp): the same work on a GPU, and a fraction of the threads for the simulator, which runs each
# thread as a Python thread.
WARP_SIZE = 32
# A reduction block covers a tile of channels, THREADS_PER_BLOCK // tile lanes (threads) per channel (fewer when a
# channel has fewer rows, see WARP_SIZE).
# Channels-last: a warp reads up to 32 consecutive channels of a row (coalesced); fewer channels than 32 shrink the
# tile to the next power of 2, so that no lanes idle.
NSC_MAX_CHANNEL_TILE = 32
# "ncs": a channel's rows are contiguous, so a warp reads 32 consecutive rows of one channel; when a channel has
# few rows (small N*S) a block takes up to 8 channels (still >= 32 lanes each) instead of idling most threads.
NCS_MAX_CHANNEL_TILE = 8
# In-block fold: first LANE_FAN lanes of each channel each fold every LANE_FAN-th lane, then lane 0 folds those.
LANE_FAN = 16

# Quantities of the stats partials: sum(x - shift), sum((x - shift)^2), min(x), max(x) (the last two only with_range).
_Q_MIN = 2
_Q_MAX = 3

_jit = dict(cache=True)


# -- host-side geometry (depends on the shape only: deterministic) --------------------------------------------------
def _whole_warps(threads):
    """``threads`` rounded up to whole warps: at least one, at most THREADS_PER_BLOCK."""
    return min(THREADS_PER_BLOCK, max(WARP_SIZE, -(-threads // WARP_SIZE) * WARP_SIZE))


def elementwise_launch(total):
    """``(blocks, threads per block)`` for an elementwise kernel over ``total`` elements."""
    per_block = THREADS_PER_BLOCK * ELEMENTWISE_ITEMS_PER_THREAD
    blocks = max(1, min(-(-total // per_block), ELEMENTWISE_MAX_BLOCKS))
    if blocks > 1:
        return blocks, THREADS_PER_BLOCK
    return 1, _whole_warps(-(-total // ELEMENTWISE_ITEMS_PER_THREAD))


def finalize_launch(channels):
    """``(blocks, threads per block)`` for a finalize kernel: one thread per channel."""
    return max(1, -(-channels // THREADS_PER_BLOCK)), _whole_warps(channels)


def reduce_geometry(rows, channels, channels_last):
    """Return ``(tile, n_part, (blocks, threads per block))`` for a reduction over ``rows`` = N*S elements of each
    of ``channels``.

    A block covers ``tile`` consecutive channels with ``threads // tile`` lanes (threads) each, the kernels read it
    from ``blockDim``; each channel tile is split over ``n_part`` blocks, each writing one partial per channel.
    """
    tile = 1
    if channels_last:
        while tile < min(channels, NSC_MAX_CHANNEL_TILE):
            tile *= 2
    else:
        while tile < min(channels, NCS_MAX_CHANNEL_TILE) and THREADS_PER_BLOCK // (2 * tile) >= rows:
            tile *= 2
    lanes = THREADS_PER_BLOCK // tile
    # fewer rows than lanes: only the lanes that get a row, as a power of 2 (a block of whole warps), at least one
    # warp per block
    while lanes > 1 and lanes // 2 >= rows and tile * lanes > WARP_SIZE:
        lanes //= 2
    tiles = max(1, -(-channels // tile))
    n_part = -(-rows // (lanes * REDUCE_ITEMS_PER_THREAD))
    n_part = max(1, min(n_part, -(-REDUCE_TARGET_BLOCKS // tiles), REDUCE_MAX_PARTIALS))
    return tile, n_part, (tiles * n_part, tile * lanes)


# -- indexing helpers -----------------------------------------------------------------------------------------------
@cuda.jit(device=True, **_jit)
def _load(a, n, c, s, channels_last):
    """Element (n, c, s) of a memory-order activation view, widened to float64."""
    if channels_last:
        return widen(a[n, s, c])
    return widen(a[n, c, s])


@cuda.jit(device=True, **_jit)
def _split3(i, d1, d2):
    """Flat index -> coordinates (i0, i1, i2) in dims (., d1, d2)."""
    q = i // d2
    i2 = i - q * d2
    i0 = q // d1
    return i0, q - i0 * d1, i2


@cuda.jit(device=True, **_jit)
def _advance3(a0, a1, a2, b0, b1, b2, d1, d2):
    """(a0, a1, a2) + (b0, b1, b2) with carries, for a1, b1 < d1 and a2, b2 < d2."""
    a2 += b2
    if a2 >= d2:
        a2 -= d2
        a1 += 1
    a1 += b1
    if a1 >= d1:
        a1 -= d1
        a0 += 1
    return a0 + b0, a1, a2


@cuda.jit(device=True, **_jit)
def _thread_range():
    """This thread's first flat index and the grid stride, as int64."""
    start = int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x
    return start, int64(cuda.gridDim.x) * cuda.blockDim.x


@cuda.jit(device=True, **_jit)
def _dims(shape, channels_last):
    """(N, C, S) from a memory-order shape."""
    if channels_last:
        return shape[0], shape[2], shape[1]
    return shape[0], shape[1], shape[2]


@cuda.jit(device=True, **_jit)
def _reduce_coords(channels_last, tile, n_part, spatial):
    """Thread of a reduction -> (lane, tx, channel, partial index b, first row (n, s), row step (dn, ds)).

    Thread t holds lane ``lane`` of channel ``tx`` of the block's tile; its shared-memory slot is t.
    """
    t = int64(cuda.threadIdx.x)
    lanes = int64(cuda.blockDim.x) // tile
    if channels_last:
        lane = t // tile  # t = lane * tile + tx: a warp spans the tile's channels of consecutive rows
        tx = t - lane * tile
    else:
        tx = t // lanes  # t = tx * lanes + lane: a warp spans consecutive rows of one channel
        lane = t - tx * lanes
    blk = int64(cuda.blockIdx.x)
    tile_index = blk // n_part
    b = blk - tile_index * n_part
    spatial = max(spatial, int64(1))  # S = 0: no rows, callers test S > 0
    # rows b*lanes + lane, + n_part*lanes, ...: the n_part blocks of a tile interleave over the rows
    first = b * lanes + lane
    n = first // spatial
    step = n_part * lanes
    dn = step // spatial
    return lane, tx, tile_index * tile + tx, b, n, first - n * spatial, dn, step - dn * spatial


@cuda.jit(device=True, **_jit)
def _advance2(n, s, dn, ds, spatial):
    """(n, s) + (dn, ds) with carry, for s, ds < spatial."""
    s += ds
    if s >= spatial:
        s -= spatial
        n += 1
    return n + dn, s


@cuda.jit(device=True, **_jit)
def _combine(a, b, q):
    """Fold two partials of quantity q: min for _Q_MIN, max for _Q_MAX, sum otherwise."""
    if q == _Q_MIN:
        return min(a, b)
    if q == _Q_MAX:
        return max(a, b)
    return a + b


@cuda.jit(device=True, **_jit)
def _block_fold(sh, nq, channels_last, tile, lane, tx, part, c, channels, b):
    """Fold each channel's lanes of sh[q, :] in a fixed order; lane 0 writes part[q, c, b].

    Thread (lane, tx) must have stored its values in sh[q, t]; every thread of the block must call this (it holds
    the block's two barriers).
    """
    lanes = int64(cuda.blockDim.x) // tile
    fan = min(LANE_FAN, lanes)
    # slot of (lane, tx) is lane * ls + tx * ts, the thread index (see _reduce_coords)
    ls = tile if channels_last else int64(1)
    ts = int64(1) if channels_last else lanes
    cuda.syncthreads()
    # stage 1: lane l < fan folds lanes l, l + fan, l + 2*fan, ... (it alone reads and writes its own slot)
    if lane < fan:
        for q in range(nq):
            acc = sh[q, lane * ls + tx * ts]
            k = lane + fan
            while k < lanes:
                acc = _combine(acc, sh[q, k * ls + tx * ts], q)
                k += fan
            sh[q, lane * ls + tx * ts] = acc
    cuda.syncthreads()
    # stage 2: lane 0 folds lanes 0 .. fan-1 and writes the block's partial of its channel
    if lane == 0 and c < channels:
        for q in range(nq):
            acc = sh[q, tx * ts]
            for k in range(1, fan):
                acc = _combine(acc, sh[q, k * ls + tx * ts], q)
            part[q, c, b] = acc


@cuda.jit(device=True, **_jit)
def _fold_partials(part, q, c, n_part):
    """Fold the n_part partials of channel c, quantity q, in block order."""
    acc = part[q, c, 0]
    for b in range(1, n_part):
        acc = _combine(acc, part[q, c, b], q)
    return acc
