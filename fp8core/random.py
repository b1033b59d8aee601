"""The counter-based generator of stochastic rounding (docs/numerics.md §14).

One definition that numpy (uint32), torch (int64 holding uint32 values, masked), XLA
(uint32) and C (``uint32_t``) compute identically, so a seed gives the same bits in
every backend and path. There is no state: the bits of an element are a pure function of
``(seed, stream, index)``.

Definition (all arithmetic modulo 2**32)::

    mix32(v) = lowbias32 finalizer (Chris Wellons' hash-prospector, bias ≈ 0.17):
        v ^= v >> 16;  v *= 0x7FEB352D;  v ^= v >> 15;  v *= 0x846CA68B;  v ^= v >> 16
    k1 = mix32(seed ^ 0x243F6A88)                 # per call: key from the seed
    k2 = mix32(k1 ^ stream ^ 0x85A308D3)          # per call: key from seed and stream
    u(i) = mix32(mix32(i ^ k1) ^ k2)              # per element, i the element index
    bits_r(i) = u(i) >> (32 - r)                  # the top r bits, 0 ≤ bits < 2**r

``mix32`` is a bijection of uint32, so for one ``(seed, stream)`` the 32-bit values of
distinct indices are distinct. ``seed`` and ``stream`` are ints in ``[0, 2**32)``; the
index ``i`` is the row-major (C-order) position of the element in the array **as passed
to the quantizer** (its logical shape, before any transposition to the operand's
orientation), so it must be below 2**32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MIX_MUL1", "MIX_MUL2", "SEED_SALT", "STREAM_SALT", "MAX_ELEMENTS",
           "mix32", "keys", "random_uint32", "random_bits", "check_seed", "check_stream",
           "check_sr_bits", "check_elements", "check_key_array", "SLOT_STREAMS", "slot_stream",
           "layer_seed"]

MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
SEED_SALT = 0x243F6A88      # the first 32 bits of pi's fraction
STREAM_SALT = 0x85A308D3    # the next 32
#: Indices are uint32: a stochastically rounded array holds fewer elements than this.
MAX_ELEMENTS = 2**32
_U32 = np.uint32


def mix32(v: np.ndarray) -> np.ndarray:
    """The lowbias32 finalizer of uint32 ``v`` (elementwise, wrapping)."""
    v = np.asarray(v, dtype=_U32)
    with np.errstate(over="ignore"):
        v = v ^ (v >> _U32(16))
        v = (v * _U32(MIX_MUL1)).astype(_U32)
        v = v ^ (v >> _U32(15))
        v = (v * _U32(MIX_MUL2)).astype(_U32)
        v = v ^ (v >> _U32(16))
    return v


def _int_field(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int in [0, 2**32), got {type(value).__name__}: "
                        f"{value!r}")
    value = int(value)
    if not 0 <= value < 2**32:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value}")
    return value


def check_seed(seed: Any, *, required: bool = True) -> int | None:
    """``seed`` as an int in ``[0, 2**32)``; ``None`` is a ValueError naming ``seed``
    when ``required`` (a stochastic rule), else returned."""
    if seed is None:
        if required:
            raise ValueError("seed is required for rounding='stochastic' (an int in "
                             "[0, 2**32)); got None")
        return None
    return _int_field(seed, "seed")


def check_key_array(dtype_name: str, shape: tuple[int, ...], name: str) -> None:
    """A framework array given as ``seed`` / ``stream`` (traced in JAX, a buffer in
    torch): a 0-d integer array, its value taken modulo 2**32."""
    if not (dtype_name.startswith("int") or dtype_name.startswith("uint")) or tuple(shape) != ():
        raise TypeError(f"{name} must be an int in [0, 2**32) or a 0-d integer array, got a "
                        f"{dtype_name} array of shape {tuple(shape)}")


def check_stream(stream: Any) -> int:
    """``stream`` as an int in ``[0, 2**32)``."""
    return _int_field(stream, "stream")


def check_sr_bits(sr_bits: Any, argname: str = "sr_bits") -> int:
    """``sr_bits`` as an int in 1…23 (23: the float32 comparison stays exact)."""
    if isinstance(sr_bits, bool) or not isinstance(sr_bits, (int, np.integer)):
        raise TypeError(f"{argname} must be an int in 1..23, got {type(sr_bits).__name__}: "
                        f"{sr_bits!r}")
    if not 1 <= int(sr_bits) <= 23:
        raise ValueError(f"{argname} must be an int in 1..23, got {int(sr_bits)}")
    return int(sr_bits)


def check_elements(n: int) -> None:
    """ValueError when an array has too many elements for uint32 indices."""
    if n >= MAX_ELEMENTS:
        raise ValueError(f"stochastic rounding indexes elements with uint32: x has {n} "
                         f"elements, at most {MAX_ELEMENTS - 1} allowed")


def keys(seed: int, stream: int) -> tuple[int, int]:
    """``(k1, k2)``, the per-call keys of ``(seed, stream)`` (Python ints)."""
    k1 = int(mix32(np.array(seed ^ SEED_SALT, _U32)))
    k2 = int(mix32(np.array(k1 ^ stream ^ STREAM_SALT, _U32)))
    return k1, k2


def random_uint32(shape: tuple[int, ...], seed: int, stream: int = 0) -> np.ndarray:
    """``u(i)`` for every element of an array of ``shape``, ``i`` its row-major index."""
    n = int(np.prod(shape, dtype=np.int64))
    check_elements(n)
    k1, k2 = keys(seed, stream)
    i = np.arange(n, dtype=np.uint64).astype(_U32)
    return mix32(mix32(i ^ _U32(k1)) ^ _U32(k2)).reshape(shape)


def random_bits(shape: tuple[int, ...], seed: int, stream: int = 0, r: int = 8) -> np.ndarray:
    """The top ``r`` bits of :func:`random_uint32` (uint32 values in ``[0, 2**r)``)."""
    return random_uint32(shape, seed, stream) >> _U32(32 - r)


#: Streams per matmul call: slot ``j`` of :data:`fp8core.recipe.SLOTS` of a call with
#: stream ``t`` draws from stream ``t·8 + j`` (mod 2**32), so consecutive steps and the six
#: slots never share random bits.
SLOT_STREAMS = 8


def slot_stream(stream: int, slot_index: int) -> int:
    """The stream slot ``slot_index`` (0..5, :data:`fp8core.recipe.SLOTS` order) of a
    matmul called with ``stream`` draws from: ``(stream·8 + slot_index) mod 2**32``."""
    return (int(stream) * SLOT_STREAMS + int(slot_index)) % 2**32


def layer_seed(seed: Any, name: str) -> int:
    """The seed :func:`convert_to_fp8` (both backends) gives the layer named ``name`` (its
    PyTorch module path — ``fp8core_jax.transfer``'s name for an NNX layer — so the two
    frameworks agree): ``mix32(seed ^ crc32(name))``."""
    import zlib
    seed = check_seed(seed)
    return int(mix32(np.array((seed ^ zlib.crc32(name.encode())) & 0xFFFFFFFF, _U32)))
