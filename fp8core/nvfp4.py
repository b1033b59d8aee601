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
    "ENGINE_RULES",
    "check_engine_rule",
    "engine_scales",
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


# ------------------------------------------------- the operand engine's rules (§13.5)
#: Scale rules of :class:`fp8core.recipe.OperandRule` that are NVFP4 (§13.5), and the
#: variant of the public functions' chain each one runs (always with the per-tensor scale).
ENGINE_RULES: dict[str, str] = {"nvfp4": "torchao", "nvfp4_te": "te"}
#: The granularities an engine rule takes: 1x16 blocks along the contraction axis, or 16x16
#: tiles (orientation-free, for weights).
ENGINE_GRANULARITIES: tuple[str, ...] = ("block(16)", "tile(16)")


def check_engine_rule(format_name: str, granularity: Any, scale: str) -> None:
    """ValueError unless ``format_name`` is float4_e2m1fn and ``granularity`` block(16) or
    tile(16) (:class:`fp8core.recipe.OperandRule` calls this for the NVFP4 rules)."""
    if format_name != ELEMENT_FORMAT:
        raise ValueError(
            f"OperandRule.scale={scale!r} is an NVFP4 block scale, but OperandRule.format is "
            f"{format_name}; NVFP4 elements are {ELEMENT_FORMAT} only")
    if granularity.kind not in ("block", "tile") or granularity.size != 16:
        raise ValueError(
            f"OperandRule.scale={scale!r} is an NVFP4 block scale: granularity must be "
            f"{' or '.join(ENGINE_GRANULARITIES)} (1x16 blocks along the contraction axis, or "
            f"16x16 tiles for weights), got {granularity}")


def engine_scales(absmax: Any, variant: str
                  ) -> tuple[np.float32, np.ndarray, np.ndarray, np.ndarray]:
    """The NVFP4 scales of an operand from its absmax grid (§13.5): ``(t, block_bytes, r,
    dscale)``.

    ``absmax`` holds every block's (or tile's) ``max |x|`` of one operand — the engine's
    §3.2 form: +0 for a float32-subnormal maximum, the canonical NaN for a NaN block. The
    tensor amax is ``A = max(absmax)`` (NaN-propagating; 0 for an empty grid), then the
    float32 chain of :func:`fp8core.reference.quantize_nvfp4` (``per_tensor_scale=True``)
    for ``variant`` (``"torchao"`` / ``"te"``) step for step:

    * ``t``: the float32 tensor scale (NaN as ``0x7FC00000``);
    * ``block_bytes``: uint8 ``float8_e4m3fn`` byte of each block's scale ``s``
      (0x7F for a NaN block), shaped like ``absmax``;
    * ``r``: float32 per-block multiplier applied before rounding (``code = e2m1(clamp(
      fl(x · r), −6, 6))``; a NaN product is stored as code 0); 0 in NaN blocks;
    * ``dscale``: ``fl(t · s)``, the decode multiplier (canonical NaN in NaN blocks).

    Pure numpy on float32, no flush; one rounding per step (round half to even).
    """
    m = np.asarray(absmax, np.float32)
    one, f32max = np.float32(1), np.float32(np.finfo(np.float32).max)
    e4m3 = ml_dtypes.float8_e4m3fn
    nan32 = np.uint32(0x7FC00000).view(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        amax = np.float32(np.max(m)) if m.size else np.float32(0)
        if variant == "torchao":
            t = amax / TENSOR_SCALE_DIVISOR
            t = one if t == 0 else t
            s = np.clip((m / E2M1_MAX) / t, E4M3_TINY, E4M3_MAX).astype(e4m3)
            r = (one / t) / s.astype(np.float32)
        elif variant == "te":
            S = np.minimum(TENSOR_SCALE_DIVISOR / amax, f32max)
            S = one if S == 0 else S
            t = one / S
            d = np.minimum(m * (S * (one / E2M1_MAX)), f32max)
            s = np.clip(d, -E4M3_MAX, E4M3_MAX).astype(e4m3)
            r = np.minimum(one / (s.astype(np.float32) * t), f32max)
        else:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
        sv = s.astype(np.float32)
        nan_block = np.isnan(sv)
        dscale = np.where(nan_block, nan32, np.float32(t) * sv).astype(np.float32)
    block_bytes = np.where(nan_block, np.uint8(E4M3_NAN_BYTE), s.view(np.uint8)).astype(np.uint8)
    r = np.where(nan_block, np.float32(0), r).astype(np.float32)
    t = nan32 if np.isnan(t) else np.float32(t)
    return t, block_bytes, r, dscale
