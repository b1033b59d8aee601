"""NVFP4: ``float4_e2m1fn`` elements in blocks of 16 along an axis (or 16x16 tiles of a 2-D
array), one ``float8_e4m3fn`` block scale per block and one float32 tensor scale
(docs/numerics.md §13).

Two named variants of the float32 scale chain (the exact sequences are in §13 and in
:func:`fp8core.reference.quantize_nvfp4`, the executable form):

* ``"torchao"`` — torchao 0.18's ``nvfp4_quantize`` (``per_tensor_scale`` from
  ``per_tensor_amax_to_scale``): ``tensor_scale = amax / 2688``; the block scale
  ``fl(fl(max|x| / 6) / tensor_scale)`` clamped to ``[2**-6, 448]`` (e4m3's smallest
  normal up to its max) then rounded to e4m3; elements times
  ``fl(fl(1 / tensor_scale) / block_scale)``.
* ``"te"`` — TransformerEngine's reference quantizer (``NVFP4QuantizerRef``):
  ``S_enc = min(2688 / amax, FLT_MAX)`` (``1`` if 0), ``tensor_scale = fl(1 / S_enc)``;
  the block scale ``fl(max|x| · fl(S_enc · fl(1/6)))`` clamped to ``[−448, 448]`` only
  (no lower clamp: a small block's scale may round to e4m3 zero) then rounded once to
  e4m3; elements times ``min(fl(1 / fl(block_scale · tensor_scale)), FLT_MAX)``.

Both decode with ``fl(value[code] · fl(tensor_scale · block_scale))``. This module holds
the constants, the variants, argument validation and shapes; it imports numpy and
ml_dtypes only.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from fp8core import _validation
from fp8core import mx as _mx

__all__ = [
    "BLOCK_SIZES",
    "VARIANTS",
    "ELEMENT_FORMAT",
    "SCALE_FORMAT",
    "E2M1_MAX",
    "E4M3_MAX",
    "E4M3_TINY",
    "TENSOR_SCALE_DIVISOR",
    "E4M3_NAN_BYTE",
    "TILE",
    "is_tiled",
    "check_quantize_args",
    "check_dequantize_args",
    "scales_shape",
    "e2m1_round_table",
    "e4m3_values",
]

#: Block sizes NVFP4 allows: 16 (1x16 blocks along ``axis``; torchao asserts 16, TE's 1D tiles)
#: and ``(16, 16)`` (16x16 tiles of a 2-D array, one scale per tile: TE's weight tiles).
BLOCK_SIZES: tuple = (16, (16, 16))
TILE = (16, 16)
#: The scale chains implemented (module docstring).
VARIANTS: tuple[str, ...] = ("torchao", "te")
ELEMENT_FORMAT = "float4_e2m1fn"
SCALE_FORMAT = "float8_e4m3fn"
#: 6.0, 448.0 and 2**-6 (e4m3's smallest normal: torchao's ``E4M3_EPS``) from ml_dtypes.
E2M1_MAX = np.float32(ml_dtypes.finfo(ml_dtypes.float4_e2m1fn).max)
E4M3_MAX = np.float32(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
E4M3_TINY = np.float32(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).tiny)
#: ``448 · 6``: the tensor amax maps to the largest block scale times the largest element.
TENSOR_SCALE_DIVISOR = np.float32(float(E4M3_MAX) * float(E2M1_MAX))
#: The block-scale byte of a NaN block (e4m3's positive NaN, canonical whatever NaN's sign).
E4M3_NAN_BYTE = 0x7F


def _check_block_size(block_size: Any, shape: tuple[int, ...]) -> None:
    if isinstance(block_size, (tuple, list)):
        if tuple(block_size) != TILE:
            raise ValueError(f"block_size must be one of 16, (16, 16) for NVFP4, got {block_size!r}")
        if len(shape) != 2:
            raise ValueError(f"block_size=(16, 16) tiles a 2-D array, got a {len(shape)}-D array")
        return
    _validation.check_blocksize(block_size, argname="block_size")
    if block_size != 16:
        raise ValueError(f"block_size must be one of 16, (16, 16) for NVFP4, got {block_size}")


def is_tiled(block_size: Any) -> bool:
    """``block_size=(16, 16)``: 16x16 tiles (the same tiles whatever ``axis``)."""
    return isinstance(block_size, (tuple, list))


def check_quantize_args(x_shape: tuple[int, ...], block_size: Any, axis: Any, per_tensor_scale: Any,
                        variant: Any) -> int:
    """Validate ``quantize_nvfp4``'s keywords; return ``axis`` normalized to ``0 … ndim − 1``."""
    _check_block_size(block_size, x_shape)
    if not isinstance(per_tensor_scale, bool):
        raise TypeError(f"per_tensor_scale must be a bool, got {type(per_tensor_scale).__name__}: "
                        f"{per_tensor_scale!r}")
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    return _check_axis(x_shape, axis)


def _check_axis(shape: tuple[int, ...], axis: Any) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}: {axis!r}")
    nd = len(shape)
    if nd == 0:
        raise ValueError("x must have at least one dimension, got a 0-d array")
    allowed = {-1, nd - 1} | ({0, -2} if nd == 2 else set())
    if axis not in allowed:
        raise ValueError(f"axis must be -1 (the last), or 0 of a 2-D array, got {axis} for "
                         f"a {nd}-D array")
    return axis % nd


def check_dequantize_args(codes_dtype: str, codes_shape: tuple[int, ...], scales_dtype: str,
                          scales_shape_: tuple[int, ...], tensor_scale_dtype: str,
                          tensor_scale_shape: tuple[int, ...], block_size: Any, axis: Any) -> int:
    """Validate ``dequantize_nvfp4``'s arguments; return the normalized axis."""
    _validation.check_codes_dtype(codes_dtype)
    _check_block_size(block_size, codes_shape)
    ax = _check_axis(codes_shape, axis)
    if scales_dtype != "uint8":
        raise TypeError(f"block_scales must be uint8 float8_e4m3fn bytes, got dtype {scales_dtype}")
    want = scales_shape(codes_shape, block_size, ax)
    if tuple(scales_shape_) != want:
        raise ValueError(f"block_scales must have shape {want} for codes of shape {codes_shape} "
                         f"(block_size={block_size}, axis={axis}), got {tuple(scales_shape_)}")
    if tensor_scale_dtype != "float32" or tuple(tensor_scale_shape) != ():
        raise TypeError(f"tensor_scale must be a float32 scalar, got dtype {tensor_scale_dtype} "
                        f"shape {tuple(tensor_scale_shape)}")
    return ax


def scales_shape(shape: tuple[int, ...], block_size: int, axis: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` shortened to ``ceil(n / block_size)`` (as MX); for 16x16 tiles
    ``(ceil(rows / 16), ceil(cols / 16))`` whatever ``axis``."""
    if is_tiled(block_size):
        return tuple(-(-n // 16) for n in shape)
    return _mx.scales_shape(shape, block_size, axis)


def e2m1_round_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(midpoints, tie_up, codes)`` for rounding a magnitude ``m`` in ``[0, 6]`` to e2m1,
    half to even, by compares: the index is ``Σ_j (m > mid_j) or (tie_up_j and m == mid_j)``
    and the magnitude code ``codes[index]`` (float32 midpoints between neighbouring
    magnitudes; a tie goes to the neighbour with an even code). The backends round with
    this; the reference casts with ml_dtypes (tested equal on every midpoint)."""
    codes = np.arange(8, dtype=np.uint8)
    mags = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    mid = ((mags[:-1] + mags[1:]) / 2).astype(np.float32)
    tie_up = (codes[1:] % 2 == 0)
    return mid, tie_up, codes


def e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 e4m3 bytes (NaN for 0x7F and 0xFF)."""
    return np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
