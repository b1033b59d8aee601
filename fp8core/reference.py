"""The numpy reference quantizers: the executable form of docs/numerics.md.

Plain numpy, written to be read next to the contract. Every backend must match
these functions bit-for-bit on codes, absmax and dequantized values. Step
numbers in comments refer to docs/numerics.md §3 (quantize) and §4 (dequantize).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from fp8core import _validation
from fp8core.blocks import plan_blocks
from fp8core.codebooks import (
    CANONICAL_NAN_BITS,
    F32_SMALLEST_NORMAL,
    Codebook,
    resolve_codebook,
)

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_global",
    "dequantize_global",
    "fake_quantize",
    "group_scales",
    "round_to_codes",
]

_F32 = np.float32
_CHUNK = 8192
_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


def _as_float_array(x: Any, argname: str = "x") -> np.ndarray:
    x = np.asarray(x)
    _validation.check_float_dtype(x.dtype.name, argname=argname)
    return x


def _out_dtype(dtype: Any) -> np.dtype:
    name = np.dtype(dtype).name
    _validation.check_float_dtype(name, argname="dtype")
    return _DTYPES[name]


def group_absmax(groups: np.ndarray) -> np.ndarray:
    """§3.2: max |x| per row of a (n_groups, size) float32 array.

    NaN anywhere in a group gives the canonical NaN; a float32 subnormal result is
    flushed to +0.
    """
    if groups.shape[1] == 0:
        return np.zeros(groups.shape[0], np.float32)
    absmax = np.max(np.abs(groups), axis=1)  # NaN-propagating
    absmax = np.where(absmax < F32_SMALLEST_NORMAL, _F32(0), absmax)
    absmax = np.where(np.isnan(absmax), CANONICAL_NAN_BITS.view(np.float32), absmax)
    return absmax.astype(np.float32)


def group_scales(absmax: np.ndarray, codebook: Codebook) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3.3: ``(finite, qscale, dscale)`` for float32 absmax values.

    ``a = clip(absmax, floor, ceiling)``; ``qscale = fl(M / a)``;
    ``dscale = fl(a * fl(1/M))``. Non-finite groups get ``qscale = 0`` (unused)
    and ``dscale = NaN``.
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    finite = np.isfinite(absmax)
    a = np.clip(np.where(finite, absmax, _F32(1)), codebook.scale_floor, codebook.scale_ceiling)
    qscale = np.where(finite, codebook.max / a, _F32(0)).astype(np.float32)
    dscale = np.where(finite, a * codebook.inv_max, _F32(np.nan)).astype(np.float32)
    return finite, qscale, dscale


def round_to_codes(scaled: np.ndarray, codebook: Codebook) -> np.ndarray:
    """§3.5: codes of float32 values already clamped to [−M, M].

    Native formats: ml_dtypes' own cast (round half to even). Tables: nearest
    entry, exact ties to the lower entry, equal entries to the lowest code.
    """
    if codebook.is_native:
        return scaled.astype(codebook.format.ml_dtype).view(np.uint8)
    values = codebook.values.astype(np.float64)
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order].reshape(1, -1)
    flat = scaled.reshape(-1, 1).astype(np.float64)
    codes = np.empty(flat.shape[0], np.uint8)
    for start in range(0, flat.shape[0], _CHUNK):  # bounded memory: chunk x 256 distances
        # nearest: the entry minimizing |s - v|; argmin takes the first minimum,
        # i.e. the lower value, then the lowest code (stable sort).
        distance = np.abs(flat[start:start + _CHUNK] - sorted_vals)
        codes[start:start + _CHUNK] = order[np.argmin(distance, axis=1)]
    return codes.reshape(scaled.shape)


def _quantize_groups(groups: np.ndarray, codebook: Codebook) -> tuple[np.ndarray, np.ndarray]:
    absmax = group_absmax(groups)                                     # §3.2
    finite, qscale, _ = group_scales(absmax, codebook)                # §3.3
    with np.errstate(invalid="ignore"):  # inf * 0 in non-finite groups, replaced below
        scaled = groups * qscale[:, None]                             # §3.4 fl(x * qscale)
    scaled = np.clip(scaled, -codebook.max, codebook.max)             # §3.4 saturate
    scaled = np.where(finite[:, None], scaled, _F32(0))
    codes = round_to_codes(scaled, codebook)                          # §3.5
    codes = np.where(finite[:, None], codes, np.uint8(codebook.fill_code))  # §3.6
    return codes.astype(np.uint8), absmax


def _dequantize_groups(codes: np.ndarray, absmax: np.ndarray, codebook: Codebook) -> np.ndarray:
    _, _, dscale = group_scales(absmax, codebook)                     # §4.1
    values = codebook.values256[codes]                                # §4.2
    with np.errstate(invalid="ignore"):  # NaN/inf codes and NaN scales are expected here
        return values * dscale[:, None]                               # §4.3 fl(v * dscale)


def _blocks(x32: np.ndarray, blocksize: int) -> np.ndarray:
    plan = plan_blocks(x32.size, blocksize)
    flat = np.concatenate([x32.reshape(-1), np.zeros(plan.pad, np.float32)])
    return flat.reshape(plan.n_blocks, plan.blocksize)


def quantize_blockwise(x: Any, codebook: Any, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize with one absmax per block of the row-major flattening of ``x``.

    Args:
      x: float16 / bfloat16 / float32 / float64 array, any shape.
      codebook: format name or alias, legacy name, :class:`Codebook` or 256 values.
      blocksize: elements per block (the last block may be partial).

    Returns:
      ``(codes, absmax)``: uint8 codes shaped like ``x``, float32 absmax of shape
      ``(ceil(x.size / blocksize),)``.

    Numerics (docs/numerics.md): upcast to float32; absmax NaN-propagating,
    subnormal flushed; ``qscale = fl(M / clip(absmax))``; ``fl(x * qscale)``
    clamped to [−M, M]; round half to even (native) or ties-to-lower (tables);
    groups with NaN/inf absmax store the fill code.
    """
    x = _as_float_array(x)
    codebook = resolve_codebook(codebook)
    _validation.check_blocksize(blocksize)
    x32 = x.astype(np.float32)                                        # §3.1
    codes, absmax = _quantize_groups(_blocks(x32, blocksize), codebook)
    return codes.reshape(-1)[: x.size].reshape(x.shape), absmax


def dequantize_blockwise(codes: Any, absmax: Any, codebook: Any, blocksize: int,
                         dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_blockwise`: ``fl(value[code] * dscale)`` cast to ``dtype``.

    Groups whose absmax is NaN or ±inf dequantize to NaN; codes with no value
    (sub-byte formats, codes ≥ 2**bits) decode to NaN.
    """
    codes = np.asarray(codes)
    absmax = np.asarray(absmax)
    codebook = resolve_codebook(codebook)
    _validation.check_codes_dtype(codes.dtype.name)
    plan = plan_blocks(codes.size, blocksize)
    _validation.check_absmax(absmax.dtype.name, absmax.shape, (plan.n_blocks,))
    out_dtype = _out_dtype(dtype)
    padded = np.concatenate([codes.reshape(-1), np.zeros(plan.pad, np.uint8)])
    groups = padded.reshape(plan.n_blocks, plan.blocksize)
    y = _dequantize_groups(groups, absmax, codebook)
    return y.reshape(-1)[: codes.size].reshape(codes.shape).astype(out_dtype)  # §4.4


def quantize_global(x: Any, codebook: Any) -> tuple[np.ndarray, np.ndarray]:
    """Quantize with one absmax for the whole tensor.

    Returns ``(codes, absmax)`` with uint8 codes shaped like ``x`` and a 0-d
    float32 absmax (0 for an empty tensor). Numerics as :func:`quantize_blockwise`.
    """
    x = _as_float_array(x)
    codebook = resolve_codebook(codebook)
    x32 = x.astype(np.float32).reshape(1, -1)
    codes, absmax = _quantize_groups(x32, codebook)
    return codes.reshape(x.shape), absmax.reshape(())


def dequantize_global(codes: Any, absmax: Any, codebook: Any, dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_global`."""
    codes = np.asarray(codes)
    absmax = np.asarray(absmax)
    codebook = resolve_codebook(codebook)
    _validation.check_codes_dtype(codes.dtype.name)
    _validation.check_absmax(absmax.dtype.name, absmax.shape, ())
    out_dtype = _out_dtype(dtype)
    y = _dequantize_groups(codes.reshape(1, -1), absmax.reshape(1), codebook)
    return y.reshape(codes.shape).astype(out_dtype)


def fake_quantize(x: Any, codebook: Any, blocksize: int | None = None) -> np.ndarray:
    """Quantize then dequantize, returning ``x``'s dtype.

    ``blocksize=None`` uses one absmax for the tensor; an int quantizes blockwise.
    """
    x = _as_float_array(x)
    if blocksize is None:
        codes, absmax = quantize_global(x, codebook)
        return dequantize_global(codes, absmax, codebook, x.dtype)
    codes, absmax = quantize_blockwise(x, codebook, blocksize)
    return dequantize_blockwise(codes, absmax, codebook, blocksize, x.dtype)
