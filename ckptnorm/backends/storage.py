"""Storage formats of activation arrays, and the two conversions every kernel load and store goes through.

Kernels compute in float64; only loads and stores see how an activation is stored.  Four storage formats, told
apart by the array's element type alone (so that the choice is made when a kernel is compiled, never per element):

    float64, float32   IEEE binary64 / binary32, as is
    uint16             IEEE binary16 (float16, "fp16") bits: Numba's CPU target has no float16 type
    int16              bfloat16 bits (the top half of a float32): NumPy has no bfloat16 type

Adapters pass half-precision activations as 16-bit integer views of the same bits (``torch.float16`` as uint16,
``torch.bfloat16`` as int16); the signedness is only a tag for the format.

``widen(v)``          one loaded element -> float64, exactly (every value of every format is a float64).
``narrow(y, like)``   float64 -> an element of ``like``'s storage format (``like`` is the destination array),
                      rounded once, to nearest with ties to even; out-of-range values become +-inf, tiny ones
                      subnormals or +-0, NaN stays NaN (quiet, sign and the payload's top bits kept).

Both are plain Python functions (which Numba's CUDA simulator runs, and tests may call) with a Numba overload keyed
on the element type, which Numba's CPU and CUDA targets compile: float32/float64 are a plain conversion (their
kernels compile to the same vector code as with a direct ``np.float64(v)``); the 16-bit formats are integer bit
manipulation, written once for both formats (``_half_to_float64``/``_half_from_float64``, parameterized by the
format's field widths) as Python functions that both run in Python (on NumPy scalars) and are compiled as they
are; only the two bit-reinterpretation helpers have a separate compiled form (an LLVM bitcast).

Correct inf/NaN/subnormal handling needs IEEE semantics: never compile these with the fastmath flags ``nnan``,
``ninf`` or ``afn`` (the reductions' ``reassoc``/``contract``, which callees inherit, are harmless: no expression
here can be reassociated or contracted into a different result).

Numba inlines these into every kernel but checks only the kernel module's source for staleness of its on-disk
cache: after editing this file, delete the kernels' cache (``ckptnorm/backends/__pycache__``).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

# The element types an activation array may have, in the order of the table above.
STORAGE_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int16))

# -- bit reinterpretation: Python versions (NumPy scalar views) and their compiled twins -------------------------


def _float64_bits(value):
    """The IEEE bits of a float64 as an int64 (negative when the sign bit is set)."""
    return np.float64(value).view(np.int64)


def _float64_from_bits(bits):
    """The float64 with these IEEE bits; ``0 <= bits < 2**63`` (a non-negative value or NaN)."""
    return np.int64(bits).view(np.float64)


def _bitcast_codegen(source_type, target_llvm_type):
    """Lowering of a bit reinterpretation: the argument converted to ``source_type``, then its bits retyped."""
    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[0], signature.args[0], source_type)
        return builder.bitcast(value, target_llvm_type)
    return codegen


@intrinsic
def _bits_of_float64(typingctx, value):
    if not isinstance(value, types.Float):
        return None
    return types.int64(value), _bitcast_codegen(types.float64, ir.IntType(64))


@intrinsic
def _float64_of_bits(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None
    return types.float64(bits), _bitcast_codegen(types.int64, ir.DoubleType())


@overload(_float64_bits)
def _float64_bits_compiled(value):
    return lambda value: _bits_of_float64(value)


@overload(_float64_from_bits)
def _float64_from_bits_compiled(bits):
    return lambda bits: _float64_of_bits(bits)


# -- 16-bit binary formats: 1 sign bit, 15 - f exponent bits (bias b), f fraction bits ---------------------------
# binary16: f = 10, b = 15;  bfloat16: f = 7, b = 127 (float32's exponent).  The constants below are derived from
# (f, b) with integer operations that the compiler folds once these are inlined with literal arguments.
# Both conversions are branch-free (every case computed, the right one selected), so that loops over them
# vectorize; the cases that are not selected are computed on clamped or harmless operands, never overflowing.
FP16 = (10, 15)
BF16 = (7, 127)
_FLOAT64_EXPONENT_BIAS = 1023
_FLOAT64_INF_BITS = 0x7FF0_0000_0000_0000


def _half_to_float64(half, fraction_bits, bias):
    """16-bit pattern (an int in [0, 65536)) of the format (fraction_bits, bias) -> float64, exactly."""
    exponent_max = (1 << (15 - fraction_bits)) - 1
    exponent = (half >> fraction_bits) & exponent_max
    fraction = half & ((1 << fraction_bits) - 1)
    # zero or subnormal: fraction units of 2**(1 - bias - fraction_bits).  A power of two whose float64 spacing is
    # that unit, plus the fraction in its low bits, minus the power of two: exact, and no int -> float conversion.
    grid_bits = (_FLOAT64_EXPONENT_BIAS + 53 - bias - fraction_bits) << 52
    tiny = _float64_from_bits(grid_bits + fraction) - _float64_from_bits(grid_bits)
    # normal, inf or NaN: the same fraction bits at the top of float64's fraction, the exponent re-biased
    field = 0x7FF if exponent == exponent_max else exponent + (_FLOAT64_EXPONENT_BIAS - bias)
    other = _float64_from_bits((field << 52) | (fraction << (52 - fraction_bits)))
    magnitude = tiny if exponent == 0 else other
    return -magnitude if half >= 0x8000 else magnitude


def _half_from_float64(value, fraction_bits, bias):
    """float64 -> 16-bit pattern (an int in [0, 65536)) of the format (fraction_bits, bias), rounded once, to
    nearest even; too large: inf; NaN: a quiet NaN with the payload's top bits."""
    dropped = 52 - fraction_bits  # float64 fraction bits rounded off
    bits = _float64_bits(value)
    magnitude = bits & 0x7FFF_FFFF_FFFF_FFFF
    infinity = ((1 << (15 - fraction_bits)) - 1) << fraction_bits
    min_normal = (_FLOAT64_EXPONENT_BIAS + 1 - bias) << 52
    # From the midpoint between the largest finite value (fraction all ones, exponent bias) and the next power of
    # two, values round to inf (ties go to even, and that fraction is odd): the midpoint has one more 1 bit.
    overflow = ((_FLOAT64_EXPONENT_BIAS + bias) << 52) | (((1 << (fraction_bits + 1)) - 1) << (dropped - 1))
    # normal result: round the dropped bits to nearest even by adding just under half a unit plus the lowest kept
    # bit (a carry out of the fraction correctly bumps the exponent), then re-bias the exponent
    clamped = min(max(magnitude, min_normal), overflow)
    lowest_kept = (clamped >> dropped) & 1
    normal = ((clamped + (1 << (dropped - 1)) - 1 + lowest_kept) >> dropped) - (
        (_FLOAT64_EXPONENT_BIAS - bias) << fraction_bits)
    # subnormal result (k units of 2**(1 - bias - fraction_bits); k = 2**fraction_bits is the smallest normal, whose
    # bits are also k): adding a power of two whose float64 spacing is that unit makes the FPU round |value| to the
    # unit, to nearest even; k is then the difference of the bits.  |value| is clamped (in bits) so that a NaN
    # never reaches the addition (the Python version would warn about a signaling one).
    grid_bits = (_FLOAT64_EXPONENT_BIAS + 53 - bias - fraction_bits) << 52
    small = _float64_from_bits(min(magnitude, min_normal))
    tiny = _float64_bits(small + _float64_from_bits(grid_bits)) - grid_bits
    nan = infinity | (1 << (fraction_bits - 1)) | ((magnitude >> dropped) & ((1 << fraction_bits) - 1))
    result = normal if magnitude >= min_normal else tiny
    result = infinity if magnitude >= overflow else result
    result = nan if magnitude > _FLOAT64_INF_BITS else result
    return result | ((bits >> 48) & 0x8000)  # float64's sign bit moved to bit 15


# The two conversions above are compiled as written (their Python bodies are valid Numba code): an overload whose
# implementation is the function itself.
@overload(_half_to_float64)
def _half_to_float64_compiled(half, fraction_bits, bias):
    return _half_to_float64


@overload(_half_from_float64)
def _half_from_float64_compiled(value, fraction_bits, bias):
    return _half_from_float64


# -- the two conversions the kernels use -------------------------------------------------------------------------
def _unsupported(storage):
    return TypingError(f"ckptnorm: activations stored as {storage} are not supported; tip: pass float64, float32, "
                       "float16 as a uint16 view of its bits, or bfloat16 as an int16 view")


def widen(value):
    """One loaded activation element -> float64, exactly (Python version: dispatches on the NumPy scalar type)."""
    if isinstance(value, np.uint16):
        return _half_to_float64(np.int64(value), *FP16)
    if isinstance(value, np.int16):
        return _half_to_float64(np.int64(value) & 0xFFFF, *BF16)
    if isinstance(value, (float, np.float32, np.float64)):
        return np.float64(value)
    raise TypeError(str(_unsupported(type(value).__name__)))


def narrow(value, like):
    """float64 ``value`` -> an element of the storage format of the array ``like`` (Python version)."""
    dtype = like.dtype
    if dtype == np.uint16:
        return np.uint16(_half_from_float64(value, *FP16))
    if dtype == np.int16:
        return np.int64(_half_from_float64(value, *BF16)).astype(np.int16)  # the bits as they are (65535 -> -1)
    if dtype in (np.float32, np.float64):
        return dtype.type(value)
    raise TypeError(str(_unsupported(dtype)))


@overload(widen)
def _widen_compiled(value):
    if value in (types.float64, types.float32):
        return lambda value: np.float64(value)
    if value == types.uint16:
        return lambda value: _half_to_float64(np.int64(value), *FP16)
    if value == types.int16:
        return lambda value: _half_to_float64(np.int64(value) & 0xFFFF, *BF16)
    raise _unsupported(value)


@overload(narrow)
def _narrow_compiled(value, like):
    storage = getattr(like, "dtype", like)
    if storage == types.float64:
        return lambda value, like: np.float64(value)
    if storage == types.float32:
        return lambda value, like: np.float32(value)
    if storage == types.uint16:
        return lambda value, like: np.uint16(_half_from_float64(value, *FP16))
    if storage == types.int16:
        # the bits as they are (65535 -> -1): an integer cast to a narrower type keeps the low bits
        return lambda value, like: np.int16(_half_from_float64(value, *BF16))
    raise _unsupported(storage)

