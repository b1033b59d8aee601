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
from fp8core import hadamard as _hadamard
from fp8core import mx as _mx
from fp8core import nvfp4 as _nvfp4
from fp8core import random as _random
from fp8core import recipe as _recipe
from fp8core.blocks import operand_matrix, plan_blocks, plan_operand, plan_tiles
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
    "quantize_tiles",
    "dequantize_tiles",
    "quantize_operand",
    "dequantize_operand",
    "fake_quantize_operand",
    "operand_scales",
    "linear_operands",
    "reduce_absmax",
    "quantize_mx",
    "dequantize_mx",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "stochastic_round_to_codes",
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


def group_scales(absmax: np.ndarray, codebook: Codebook, scale: str = "fp32"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3.3 / §9.2: ``(finite, qscale, dscale)`` for float32 absmax values.

    ``a = clip(absmax, floor, ceiling)``; ``q0 = fl(M / a)``. ``scale="fp32"``:
    ``qscale = q0``, ``dscale = fl(a * fl(1/M))``. ``"pow2"``: ``qscale`` = the largest
    power of two ≤ ``q0`` (its exponent bits); ``"pow2_torchao"``: that power of two, or
    the next one when ``q0 ≥ pow2_torchao_thresholds()[E]`` (torchao's float32
    ``exp2(floor(log2(q0)))``); both: ``dscale = 1 / qscale`` exactly. Non-finite groups
    get ``qscale = 0`` (unused) and ``dscale = NaN``.
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    if scale in _nvfp4.ENGINE_RULES:                                  # §13.5: the whole grid
        _, block_bytes, r, dscale = _nvfp4.engine_scales(absmax, _nvfp4.ENGINE_RULES[scale])
        return block_bytes != _nvfp4.E4M3_NAN_BYTE, r, dscale
    if scale in _mx.MX_SCALE_RULES:                                   # §11: e8m0 bytes
        return _mx.byte_scales(_mx.scale_bytes(absmax, codebook, _mx.mode_of(scale)),
                               _mx.mode_of(scale))
    finite = np.isfinite(absmax)
    a = np.clip(np.where(finite, absmax, _F32(1)), codebook.scale_floor, codebook.scale_ceiling)
    q0 = (codebook.max / a).astype(np.float32)
    if scale == "fp32":
        qscale, dscale = q0, (a * codebook.inv_max).astype(np.float32)
    else:
        e = (q0.view(np.uint32) >> 23) & np.uint32(0xFF)             # q0 is a normal float32
        if scale == "pow2_torchao":
            e = e + (q0 >= _recipe.pow2_torchao_thresholds()[e]).astype(np.uint32)
        elif scale != "pow2":
            raise ValueError(f"unknown scale rule {scale!r}")
        qscale = (e << np.uint32(23)).view(np.float32)
        dscale = ((np.uint32(254) - e) << np.uint32(23)).view(np.float32)  # exact 1/qscale
    qscale = np.where(finite, qscale, _F32(0)).astype(np.float32)
    dscale = np.where(finite, dscale, _F32(np.nan)).astype(np.float32)
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


def _quantize_groups(groups: np.ndarray, codebook: Codebook, scale: str = "fp32",
                     absmax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    if absmax is None:
        absmax = group_absmax(groups)                                 # §3.2
    else:                                                             # §10.2: reduced
        absmax = np.asarray(absmax, np.float32).reshape(groups.shape[0])
    finite, qscale, _ = group_scales(absmax, codebook, scale)         # §3.3
    with np.errstate(invalid="ignore"):  # inf * 0 in non-finite groups, replaced below
        scaled = groups * qscale[:, None]                             # §3.4 fl(x * qscale)
    scaled = np.clip(scaled, -codebook.max, codebook.max)             # §3.4 saturate
    scaled = np.where(finite[:, None], scaled, _F32(0))
    codes = round_to_codes(scaled, codebook)                          # §3.5
    codes = np.where(finite[:, None], codes, np.uint8(codebook.fill_code))  # §3.6
    if scale in _nvfp4.ENGINE_RULES:                                  # §13.5: fl(0 · inf) → 0
        codes = np.where(np.isnan(scaled), np.uint8(0), codes)
    return codes.astype(np.uint8), absmax


def _dequantize_groups(codes: np.ndarray, absmax: np.ndarray, codebook: Codebook,
                       scale: str = "fp32") -> np.ndarray:
    _, _, dscale = group_scales(absmax, codebook, scale)              # §4.1
    values = codebook.values256[codes]                                # §4.2
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf codes, NaN scales; MX inf blocks
        y = values * dscale[:, None]                                  # §4.3 fl(v * dscale)
    if scale in _nvfp4.ENGINE_RULES:                                  # §13.5: NaN as 0x7FC00000
        y = np.where(np.isnan(y), CANONICAL_NAN_BITS.view(np.float32), y)
    return y


#: A tensor smaller than one block is padded to at most this many elements (see below).
_LONE_BLOCK_PAD = 64


def _block_groups(flat: np.ndarray, blocksize: int, fill) -> np.ndarray:
    """The blocks of a 1-D ``flat`` as a ``(n_blocks, group size)`` array.

    Padding (``fill`` zeros) changes neither a block's absmax (§3) nor any other
    element's code, so its size is free to choose; it is bounded by the data here. With
    at least one full block, the partial last block is padded to a full one (less
    padding than data). A tensor smaller than one block is one group of
    ``max(numel, min(blocksize, 64))`` elements: 10 elements with ``blocksize=2**40``
    cost 64, not 2**40. (Both keep the shapes numpy's loops saw before, and so the sign
    numpy gives a NaN × NaN product in a non-finite block — numpy takes the first
    operand's NaN in short rows, the second's in long ones. The contract leaves NaN
    signs unspecified, but the golden vectors record them.)
    """
    plan = plan_blocks(flat.size, blocksize)
    if plan.n_blocks == 1 and plan.pad:
        size = max(flat.size, min(plan.blocksize, _LONE_BLOCK_PAD))
        return np.concatenate([flat, np.zeros(size - flat.size, flat.dtype)]).reshape(1, size)
    if plan.pad:
        flat = np.concatenate([flat, np.zeros(plan.pad, flat.dtype)])
    return flat.reshape(plan.n_blocks, plan.blocksize)


def _quantize_blocks(flat: np.ndarray, blocksize: int, codebook: Codebook, scale: str = "fp32"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_quantize_groups` over the blocks of a 1-D float32 ``flat``: ``(codes like
    flat, absmax per block)``."""
    codes, absmax = _quantize_groups(_block_groups(flat, blocksize, np.float32), codebook, scale)
    return codes.reshape(-1)[: flat.size], absmax


def _dequantize_blocks(codes: np.ndarray, absmax: np.ndarray, blocksize: int, codebook: Codebook,
                       scale: str = "fp32") -> np.ndarray:
    """:func:`_dequantize_groups` over the blocks of 1-D ``codes`` (float32, like codes)."""
    y = _dequantize_groups(_block_groups(codes, blocksize, np.uint8), absmax, codebook, scale)
    return y.reshape(-1)[: codes.size]


def quantize_blockwise(x: Any, codebook: Any, blocksize: int, *, rounding: str = "nearest",
                       seed: Any = None, stream: Any = 0, sr_bits: int = 8
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Quantize with one absmax per block of the row-major flattening of ``x``.

    Args:
      x: float16 / bfloat16 / float32 / float64 array, any shape.
      codebook: format name or alias, legacy name, :class:`Codebook` or 256 values.
      blocksize: elements per block (the last block may be partial).
      rounding: ``"nearest"`` or ``"stochastic"`` (§14: native formats; ``seed``
        required, ``stream`` and ``sr_bits`` as :class:`fp8core.recipe.OperandRule`).

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
    if rounding != "nearest" or sr_bits != 8:
        rule = _recipe.with_rounding(_recipe.OperandRule(codebook, _recipe.flat(blocksize)),
                                     rounding, sr_bits)
        if rule.is_stochastic:
            codes, absmax = quantize_operand(x.reshape(-1), rule, seed=seed, stream=stream)
            return codes.reshape(x.shape), absmax
    _random.check_seed(seed, required=False)
    _random.check_stream(stream)
    x32 = x.astype(np.float32)                                        # §3.1
    codes, absmax = _quantize_blocks(x32.reshape(-1), blocksize, codebook)
    return codes.reshape(x.shape), absmax


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
    y = _dequantize_blocks(codes.reshape(-1), absmax.reshape(-1), plan.blocksize, codebook)
    return y.reshape(codes.shape).astype(out_dtype)  # §4.4


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


# --------------------------------------------------------------- §9: recipes
def _tile_layout(plan) -> tuple[int, int, tuple[int, int]]:
    """``(tile_rows, tile_cols, padded shape)`` the reference lays the tiles out with.

    Zero padding changes no absmax (§3), so its size is free: the plan's own tiles, except
    where a tile dwarfs the array (one band or one tile column, padded size above
    4 × the data + 4096 elements — e.g. ``tile(2**40)``, which would otherwise allocate
    the whole tile): that dimension is clamped to ``max(dim, min(tile, 64))``, as
    :func:`_block_groups` does for a lone block. Ordinary tilings keep their padded shape
    (and so the NaN signs recorded in the golden vectors; see :func:`_block_groups`)."""
    gr, gc = plan.grid
    tr, tc = plan.tile_rows, plan.tile_cols
    pr, pc = plan.padded_shape
    if pr * pc > 4 * plan.rows * plan.cols + 4096:
        if gr == 1:
            tr = max(plan.rows, min(tr, _LONE_BLOCK_PAD))
        if gc == 1:
            tc = max(plan.cols, min(tc, _LONE_BLOCK_PAD))
    return tr, tc, (gr * tr, gc * tc)


def _tile_groups(a: np.ndarray, plan) -> np.ndarray:
    """(rows, cols) -> (n_groups, tile_rows * tile_cols), tiles in row-major grid order,
    edge tiles padded with zeros (which never change an absmax)."""
    gr, gc = plan.grid
    tr, tc, shape = _tile_layout(plan)
    padded = np.zeros(shape, a.dtype)
    padded[: plan.rows, : plan.cols] = a
    t = padded.reshape(gr, tr, gc, tc).transpose(0, 2, 1, 3)
    return t.reshape(gr * gc, tr * tc)


def _untile(groups: np.ndarray, plan) -> np.ndarray:
    gr, gc = plan.grid
    tr, tc, shape = _tile_layout(plan)
    t = groups.reshape(gr, gc, tr, tc).transpose(0, 2, 1, 3)
    return t.reshape(shape)[: plan.rows, : plan.cols]


def quantize_tiles(x: Any, codebook: Any, tile_rows: int, tile_cols: int, scale: str = "fp32"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a 2-D array with one absmax per ``tile_rows × tile_cols`` tile.

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x`` and the float32 absmax
    grid ``(ceil(rows / tile_rows), ceil(cols / tile_cols))``. Edge tiles may be partial.
    Numerics: §3 per tile, with the scale rule ``scale`` (§9.2).
    """
    x = _as_float_array(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    codebook = resolve_codebook(codebook)
    plan = plan_tiles(x.shape[0], x.shape[1], tile_rows, tile_cols)
    if plan.n_groups == 0:
        return np.zeros(x.shape, np.uint8), np.zeros(plan.grid, np.float32)
    codes, absmax = _quantize_groups(_tile_groups(x.astype(np.float32), plan), codebook, scale)
    return _untile(codes, plan), absmax.reshape(plan.grid)


def dequantize_tiles(codes: Any, absmax: Any, codebook: Any, tile_rows: int, tile_cols: int,
                     scale: str = "fp32", dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_tiles`: ``fl(value[code] * dscale)`` cast to ``dtype``."""
    codes = np.asarray(codes)
    absmax = np.asarray(absmax)
    codebook = resolve_codebook(codebook)
    _validation.check_codes_dtype(codes.dtype.name)
    plan = plan_tiles(codes.shape[0], codes.shape[1], tile_rows, tile_cols)
    _validation.check_absmax(absmax.dtype.name, absmax.shape, plan.grid)
    out_dtype = _out_dtype(dtype)
    if plan.n_groups == 0:
        return np.zeros(codes.shape, out_dtype)
    y = _dequantize_groups(_tile_groups(codes, plan), absmax.reshape(-1), codebook, scale)
    return _untile(y, plan).astype(out_dtype)


def reduce_absmax(absmaxes: Any) -> np.ndarray:
    """§10.2: the all-reduced amax of per-rank absmax values (stacked on axis 0): the
    maximum of their float32 bit patterns. Absmax values are +0, positive or the canonical
    NaN (§3.2), which order like their bits, so a NaN on any rank wins and the result does
    not depend on the order of the ranks."""
    a = np.ascontiguousarray(np.asarray(absmaxes, np.float32))
    return np.max(a.view(np.int32), axis=0).view(np.float32)


def quantize_operand(x: Any, rule: Any, *, axis: int = -1, absmax: Any = None,
                     seed: Any = None, stream: Any = 0) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a GEMM operand under an :class:`~fp8core.recipe.OperandRule` (§9).

    Args:
      x: float array; ``axis`` is its contraction axis (the last, or 0 of a 2-D array).
      rule: format, granularity, scale rule and rounding.
      absmax: for a ``tensor()`` rule only, the amax to form the scale from instead of
        ``x``'s own (§10.2: the :func:`reduce_absmax` of every rank's absmax, which a
        recipe's ``amax_reduction`` computes), 0-d or ``(1, 1)``; returned as given.
      seed, stream: ints in ``[0, 2**32)`` keying the random bits of a
        ``rounding="stochastic"`` rule (§14; ``seed`` required there, ignored by a
        nearest rule after validation).

    Returns:
      ``(codes, absmax)``: uint8 codes shaped like ``x``; float32 absmax shaped
      :attr:`fp8core.OperandPlan.scale_shape` in the operand's orientation (rows × groups
      along the contraction axis).
    """
    x = _as_float_array(x)
    rule = _recipe.check_rule(rule)
    if rule.is_stochastic:
        return _quantize_operand_sr(x, rule, axis, absmax, seed, stream)
    _random.check_seed(seed, required=False)
    _random.check_stream(stream)
    rows, cols, transposed = operand_matrix(x.shape, axis)
    plan = plan_operand(rows, cols, rule.granularity)
    m = x.T if transposed else x.reshape(rows, cols)
    if absmax is not None:
        absmax = np.asarray(absmax)
        _validation.check_given_absmax(rule, absmax.dtype.name, absmax.shape)
        codes, _ = _quantize_groups(m.astype(np.float32).reshape(1, -1), rule.format, rule.scale,
                                    absmax)
        codes = codes.reshape(rows, cols)
        return np.ascontiguousarray(codes.T if transposed else codes.reshape(x.shape)), \
            absmax.astype(np.float32).reshape(plan.scale_shape)
    if plan.kind == "flat":
        flat = np.ascontiguousarray(m).reshape(-1).astype(np.float32)
        if flat.size == 0:
            codes, absmax = np.zeros(0, np.uint8), np.zeros(plan.scale_shape, np.float32)
        else:
            codes, absmax = _quantize_blocks(flat, plan.flat.blocksize, rule.format, rule.scale)
        codes = codes.reshape(rows, cols)
    else:
        codes, absmax = quantize_tiles(m, rule.format, plan.tiles.tile_rows,
                                       plan.tiles.tile_cols, rule.scale)
    codes = codes.T if transposed else codes.reshape(x.shape)
    return np.ascontiguousarray(codes), absmax


def dequantize_operand(codes: Any, absmax: Any, rule: Any, *, axis: int = -1,
                       dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_operand` (§4 per group, cast once to ``dtype``)."""
    codes = np.asarray(codes)
    absmax = np.asarray(absmax)
    rule = _recipe.check_rule(rule)
    _validation.check_codes_dtype(codes.dtype.name)
    rows, cols, transposed = operand_matrix(codes.shape, axis)
    plan = plan_operand(rows, cols, rule.granularity)
    _validation.check_absmax(absmax.dtype.name, absmax.shape, plan.scale_shape)
    out_dtype = _out_dtype(dtype)
    m = codes.T if transposed else codes.reshape(rows, cols)
    if plan.kind == "flat":
        flat = np.ascontiguousarray(m).reshape(-1)
        fp = plan.flat
        y = _dequantize_blocks(flat, absmax.reshape(-1), fp.blocksize, rule.format, rule.scale)
        y = y.reshape(rows, cols).astype(out_dtype)
    else:
        y = dequantize_tiles(m, absmax, rule.format, plan.tiles.tile_rows, plan.tiles.tile_cols,
                             rule.scale, out_dtype)
    return np.ascontiguousarray(y.T if transposed else y.reshape(codes.shape))


def fake_quantize_operand(x: Any, rule: Any, *, axis: int = -1, seed: Any = None,
                          stream: Any = 0) -> np.ndarray:
    """``dequantize_operand(quantize_operand(x))`` in ``x``'s dtype."""
    x = _as_float_array(x)
    codes, absmax = quantize_operand(x, rule, axis=axis, seed=seed, stream=stream)
    return dequantize_operand(codes, absmax, rule, axis=axis, dtype=x.dtype)


# ------------------------------------------------------ §14: stochastic rounding
#: Float32 inputs below this magnitude (subnormals) round toward zero under stochastic
#: rounding: XLA:CPU reads them as ±0, so they may never round away (§14).
_F32_TINY = F32_SMALLEST_NORMAL


def stochastic_round_to_codes(scaled: np.ndarray, rand: np.ndarray, codebook: Codebook,
                              sr_bits: int, toward_zero: np.ndarray | None = None) -> np.ndarray:
    """§14: codes of float32 ``scaled`` (finite, clamped to [−M, M]) rounded
    stochastically with the random ints ``rand`` (``0 ≤ rand < 2**sr_bits``, like
    ``scaled``) — gfloat's ``RoundMode.Stochastic`` (``srbits=rand``,
    ``srnumbits=sr_bits``).

    With ``q`` the quantum of ``|s|``'s binade (``2**(max(e, emin) − mbits)``, ``e`` the
    float32 exponent of ``|s|``; subnormals of the format by their own quantum),
    ``n = floor(|s| / q)`` (the lower neighbour ``lo = n·q``), ``δ = |s|/q − n`` and
    ``D = rint(δ · 2**sr_bits)`` (half to even; exact float32 throughout):
    round away from zero (to ``(n + 1)·q``) iff ``D + rand ≥ 2**sr_bits`` — probability
    ``D / 2**sr_bits``. The sign is ``s``'s (the −0 code where the format has one; a
    ``fnuz`` zero is +0). ``toward_zero`` (bool, like ``scaled``): elements that never
    round away. The code is built from ``n`` and the binade: no second rounding.
    """
    fmt = codebook.format
    mbits = int(fmt.mantissa_bits)
    emin = int(np.log2(fmt.smallest_normal))
    b = np.ascontiguousarray(scaled, np.float32).view(np.uint32)
    mag = (b & np.uint32(0x7FFFFFFF)).view(np.float32)
    e = ((b >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    e_eff = np.maximum(e, emin)
    inv_q = ((mbits - e_eff + 127).astype(np.uint32) << np.uint32(23)).view(np.float32)
    frac = (mag * inv_q).astype(np.float32)                     # exact: a power of two
    n = np.floor(frac)
    d = ((frac - n) * np.float32(2.0 ** sr_bits)).astype(np.float32)   # exact
    up = (np.rint(d) + np.asarray(rand).astype(np.float32)) >= np.float32(2.0 ** sr_bits)
    if toward_zero is not None:
        up &= ~toward_zero
    magcode = ((e_eff - emin) << mbits) + n.astype(np.int32) + up.astype(np.int32)
    negative = (b >> np.uint32(31)).astype(bool)
    if not fmt.has_negative_zero:
        negative &= magcode != 0
    codes = magcode | np.where(negative, 1 << (fmt.total_bits - 1), 0)
    return codes.astype(np.uint8)


def expand_to_elements(per_group: np.ndarray, plan) -> np.ndarray:
    """A per-group array (``plan.scale_shape``) broadcast to the operand's
    ``(rows, cols)`` elements."""
    rows, cols = plan.rows, plan.cols
    if plan.kind == "flat":
        b = plan.flat.blocksize
        return np.repeat(per_group.reshape(-1), b)[: rows * cols].reshape(rows, cols)
    t = plan.tiles
    g = per_group.reshape(t.grid)
    return np.repeat(np.repeat(g, t.tile_rows, axis=0), t.tile_cols, axis=1)[:rows, :cols]


def _quantize_operand_sr(x: np.ndarray, rule, axis: int, absmax: Any, seed: Any, stream: Any
                         ) -> tuple[np.ndarray, np.ndarray]:
    """§14: :func:`quantize_operand` of a stochastic rule. The absmax and scales are the
    nearest rule's (§3.2, §3.3); each element is scaled and saturated as §3.4, then
    rounded by :func:`stochastic_round_to_codes` with the random bits of its row-major
    index in ``x`` (:func:`fp8core.random.random_bits`)."""
    seed = _random.check_seed(seed)
    stream = _random.check_stream(stream)
    _random.check_elements(x.size)
    codes_n, absmax = quantize_operand(x, _recipe.nearest_rule(rule), axis=axis, absmax=absmax)
    if x.size == 0:
        return codes_n, absmax
    rows, cols, transposed = operand_matrix(x.shape, axis)
    plan = plan_operand(rows, cols, rule.granularity)
    rand = _random.random_bits(x.shape, seed, stream, rule.sr_bits)
    m, rm = (x.T, rand.T) if transposed else (x.reshape(rows, cols), rand.reshape(rows, cols))
    cb = rule.format
    finite, qscale, _ = group_scales(expand_to_elements(absmax, plan).reshape(-1), cb, rule.scale)
    x32 = np.ascontiguousarray(m, dtype=np.float32).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.clip(x32 * qscale, -cb.max, cb.max)                # §3.4
    scaled = np.where(finite, scaled, _F32(0)).astype(np.float32)
    tiny = ~(np.abs(x32) >= _F32_TINY)                                   # subnormal (or NaN)
    codes = stochastic_round_to_codes(scaled, rm.reshape(-1), cb, rule.sr_bits, tiny)
    codes = np.where(finite, codes, np.uint8(cb.fill_code)).reshape(rows, cols)
    return np.ascontiguousarray(codes.T if transposed else codes.reshape(x.shape)), absmax


def operand_scales(absmax: Any, rule: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(qscale, dscale)`` of stored absmax values under ``rule`` (§3.3, §9.2): the
    multiplier applied before rounding and the one applied after decoding."""
    rule = _recipe.check_rule(rule)
    _, qscale, dscale = group_scales(np.asarray(absmax, np.float32), rule.format, rule.scale)
    return qscale, dscale


def linear_operands(A: Any, B: Any, g: Any, recipe: Any, *, seed: Any = None,
                    stream: Any = 0) -> dict[str, np.ndarray | None]:
    """The quantized operand of every slot of a recipe, as the GEMMs use them (§9.1).

    ``A (..., K)``, ``B (K, N)``, ``g (..., N)`` (the output gradient; None: forward
    only). Returns float32 arrays in the GEMMs' own layouts — ``input`` (M, K),
    ``weight`` (K, N) [= Q(W)ᵀ], ``grad_output`` (M, N), ``weight_for_grad_input`` (K, N),
    ``input_for_grad_weight`` (M, K), ``grad_output_for_grad_weight`` (M, N) — so that
    ``out = input @ weight``, ``grad_A = grad_output @ weight_for_grad_inputᵀ`` and
    ``grad_B = input_for_grad_weightᵀ @ grad_output_for_grad_weight``. Every quantized
    value is in its tensor's own dtype first (X in A's, W in B's), then cast to A's
    dtype, exactly as the backends do; high-precision slots are the inputs themselves.
    With ``recipe.wgrad_transform`` the two wgrad operands are :func:`wgrad_rotated`
    (``(M', K)`` and ``(M', N)``, ``M'`` the tokens padded to a multiple of 16).
    A stochastic slot (§14.3) rounds with ``seed`` and stream
    ``fp8core.random.slot_stream(stream, j)`` (``j`` its index in ``SLOTS``), each element
    indexed row-major in the tensor as passed here: ``A2 (M, K)``, ``B (K, N)``,
    ``g2 (M, N)`` (or the rotated ``(M', ·)`` wgrad operands).
    """
    recipe = _recipe.get_recipe(recipe)
    recipe.check_seed(seed, stream, where="linear_operands")
    A = _as_float_array(A, "A")
    B = _as_float_array(B, "B")
    a_dtype = A.dtype if A.dtype != np.float64 else np.dtype(np.float32)
    A2 = A.reshape(-1, A.shape[-1])
    out: dict[str, np.ndarray | None] = {}

    def q(t, slot, axis, dtype):
        rule = recipe.rule(slot)
        if rule is None:
            return t.astype(dtype).astype(np.float32)
        keys = {}
        if rule.is_stochastic:
            keys = dict(seed=seed, stream=_random.slot_stream(stream, _recipe.SLOTS.index(slot)))
        return fake_quantize_operand(t, rule, axis=axis, **keys).astype(dtype).astype(np.float32)

    out["input"] = q(A2, "input", -1, a_dtype)
    out["weight"] = q(B, "weight", 0, a_dtype)
    if g is None:
        return out
    g2 = _as_float_array(g, "g").astype(a_dtype).reshape(-1, B.shape[1])
    out["grad_output"] = q(g2, "grad_output", -1, a_dtype)
    xw, gw = A2, g2
    if recipe.wgrad_transform is not None:                       # §12: rotate along M
        xw, gw = (wgrad_rotated(t, a_dtype) for t in (A2, g2))
    for slot, (t, axis) in {"weight_for_grad_input": (B, 1), "input_for_grad_weight": (xw, 0),
                            "grad_output_for_grad_weight": (gw, 0)}.items():
        src = recipe.source(slot)
        out[slot] = (out[_recipe.REUSE_SOURCE[slot]] if src == "reuse"
                     else q(t, slot, axis, a_dtype))
    return out


def random_hadamard_transform(x: Any, *, axis: int = -1) -> np.ndarray:
    """§12: ``x`` rotated in runs of 16 along ``axis`` by TransformerEngine's 16-point
    random Hadamard transform, in float32 (the length along ``axis`` must be a multiple
    of 16)."""
    return _hadamard.random_hadamard_transform(_as_float_array(x), axis=axis)


def wgrad_rotated(m: np.ndarray, dtype: Any) -> np.ndarray:
    """A wgrad operand ``(M, C)`` as ``wgrad_transform="rht16"`` feeds its GEMM: ``m``
    in ``dtype`` upcast to float32, zero tokens appended up to a multiple of 16, rotated
    along the tokens (float32 ``(M', C)``; quantized from there, or cast to ``dtype``
    for a high-precision slot)."""
    m = np.asarray(m).astype(dtype).astype(np.float32)
    pad = _hadamard.padded_length(m.shape[0]) - m.shape[0]
    if pad:
        m = np.concatenate([m, np.zeros((pad, m.shape[1]), np.float32)])
    return _hadamard.random_hadamard_transform(m, axis=0)


def quantize_mx(x: Any, element_format: Any, *, block_size: int = 32, axis: int = -1,
                scale_mode: str = "floor", rounding: str = "nearest", seed: Any = None,
                stream: Any = 0, sr_bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """OCP MX quantization (§11): blocks of ``block_size`` consecutive elements along
    ``axis`` (the last, or 0 of a 2-D array; a last partial block is allowed), one e8m0
    scale byte per block under ``scale_mode`` (torchao 0.18's ``floor``, ``ceil``,
    ``even``, ``rceil``), elements saturated and rounded half to even.

    Returns:
      ``(codes, scales)``: uint8 element codes shaped like ``x`` (a sub-byte format's bit
      pattern in the low bits, one per byte) and uint8 e8m0 bytes shaped like ``x`` with
      ``axis`` shortened to ``ceil(n / block_size)``. Equal to torchao's ``to_mx`` (codes
      unpacked) on its inputs, except the element codes of a block containing NaN (scale
      byte 255: the block decodes to NaN either way; here every code is the format's fill
      code). ``rounding="stochastic"``: elements rounded as §14 (``seed`` required).
    """
    x = _as_float_array(x)
    rule = _recipe.with_rounding(_mx.mx_rule(element_format, block_size, scale_mode),
                                 rounding, sr_bits)
    codes, absmax = quantize_operand(x, rule, axis=axis, seed=seed, stream=stream)
    scales = _mx.scale_bytes(absmax, rule.format, _mx.mode_of(rule.scale))
    return codes, _mx.scales_layout(scales, x.shape, axis)


def dequantize_mx(codes: Any, scales: Any, element_format: Any, *, block_size: int = 32,
                  axis: int = -1, dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_mx`: ``fl(value[code] · 2**(scale − 127))`` (exact in
    float32, subnormal results included), NaN where the scale byte is 255, cast once to
    ``dtype``."""
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    rule = _mx.mx_rule(element_format, block_size, "floor")
    _validation.check_codes_dtype(codes.dtype.name)
    _mx.check_scales(scales.dtype.name, tuple(scales.shape), tuple(codes.shape), block_size, axis)
    out_dtype = _out_dtype(dtype)
    s = _mx.expand_scales(_mx.e8m0_values(scales), codes.shape, block_size, axis)
    with np.errstate(invalid="ignore", over="ignore"):   # NaN blocks; 448 · 2**120 = inf
        y = rule.format.values256[codes] * s
    return y.astype(out_dtype)


# ---------------------------------------------------------------- NVFP4 (§13)
def _nvfp4_blocks(x32: np.ndarray, axis: int, block_size: Any) -> np.ndarray:
    """``(…, n_blocks, 16)``: ``x32`` with ``axis`` moved last, split into blocks; 16x16
    tiles: ``(row_tiles, col_tiles, 256)``, each tile's elements row-major. A partial last
    block or tile is padded with +0 (which changes no block's max)."""
    if _nvfp4.is_tiled(block_size):
        r, c = x32.shape
        rt, ct = -(-r // 16), -(-c // 16)
        t = np.zeros((rt * 16, ct * 16), np.float32)
        t[:r, :c] = x32
        return t.reshape(rt, 16, ct, 16).transpose(0, 2, 1, 3).reshape(rt, ct, 256)
    t = np.moveaxis(x32, axis, -1)
    n = t.shape[-1]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        t = np.concatenate([t, np.zeros(t.shape[:-1] + (pad,), np.float32)], axis=-1)
    return t.reshape(t.shape[:-1] + (nb, block_size))


def _nvfp4_unblock(codes: np.ndarray, shape: tuple[int, ...], axis: int, block_size: Any) -> np.ndarray:
    """Inverse of :func:`_nvfp4_blocks` (padding dropped)."""
    if _nvfp4.is_tiled(block_size):
        rt, ct, _ = codes.shape
        full = codes.reshape(rt, ct, 16, 16).transpose(0, 2, 1, 3).reshape(rt * 16, ct * 16)
        return np.ascontiguousarray(full[:shape[0], :shape[1]])
    n = shape[axis]
    flat = codes.reshape(codes.shape[:-2] + (codes.shape[-2] * codes.shape[-1],))[..., :n]
    return np.ascontiguousarray(np.moveaxis(flat, -1, axis))


def quantize_nvfp4(x: Any, *, block_size: int = 16, axis: int = -1, per_tensor_scale: bool = True,
                   variant: str = "torchao") -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVFP4 quantization (§13): ``float4_e2m1fn`` codes, one ``float8_e4m3fn`` block scale
    per ``block_size`` (16) consecutive elements along ``axis`` (the last, or 0 of a 2-D
    array; a last partial block is allowed) — or per 16x16 tile of a 2-D array with
    ``block_size=(16, 16)`` (TE's weight tiles; ``axis`` then changes nothing; ``m`` below
    is the tile's max) — and a float32 tensor scale.

    Every step is one float32 operation (round half to even), in this order; ``x`` is
    first cast to float32, ``m`` is a block's ``max |x|`` and ``A`` the tensor's (both
    NaN-propagating, no flush; ``A = 0`` for an empty ``x``):

    ``variant="torchao"`` (torchao 0.18 ``nvfp4_quantize``; ``per_tensor_scale=True`` is
    its two-level path fed ``per_tensor_amax_to_scale(A)``):
      ``b = m / 6``; two-level: ``t = A / 2688`` (``t = 1`` where that is 0: an all-zero
      tensor, where torchao divides 0 by 0), ``s = e4m3(clamp(b / t, 2**-6, 448))``,
      ``r = (1 / t) / s``; single-level: ``t = 1``, ``s = e4m3(clamp(b, 2**-6, 448))``,
      ``r = 1 / s``.
    ``variant="te"`` (TransformerEngine ``NVFP4QuantizerRef``, 1x16):
      ``S = min(2688 / A, FLT_MAX)``, ``S = 1`` where 0 (``S = 1`` without the per-tensor
      scale), ``t = 1 / S``, ``s = e4m3(clamp(min(m · (S · fl(1/6)), FLT_MAX), −448, 448))``
      (no lower clamp), ``r = min(1 / (s · t), FLT_MAX)``.
    Then codes ``= e2m1(clamp(x · r, −6, 6))`` (round half to even, −0 kept as code 8).

    NaN: a NaN in a block makes its scale byte 0x7F and every code of the block the fill
    code 0 (decodes to NaN); a NaN anywhere makes the tensor scale NaN with the per-tensor
    scale, so every block is NaN. An element whose scaled value is NaN (``0 · inf`` when
    ``r`` overflowed: tensor amax < 2688 · 2**-128) is stored as code 0.

    Returns:
      ``(codes, block_scales, tensor_scale)``: uint8 codes shaped like ``x`` (the 4-bit
      pattern in the low bits), uint8 e4m3 bytes of :func:`fp8core.nvfp4.scales_shape`,
      and the float32 ``t`` (1.0 without the per-tensor scale; NaN as ``0x7FC00000``).
    """
    x = _as_float_array(x)
    ax = _nvfp4.check_quantize_args(tuple(x.shape), block_size, axis, per_tensor_scale, variant)
    x32 = x.astype(np.float32)
    blocks = _nvfp4_blocks(x32, ax, block_size)
    one, f32max = _F32(1), _F32(np.finfo(np.float32).max)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m = np.max(np.abs(blocks), axis=-1) if blocks.size else np.zeros(blocks.shape[:-1], _F32)
        amax = _F32(np.max(np.abs(x32))) if x32.size else _F32(0)
        e4m3 = ml_dtypes.float8_e4m3fn
        if variant == "torchao":
            b = m / _nvfp4.E2M1_MAX
            if per_tensor_scale:
                t = amax / _nvfp4.TENSOR_SCALE_DIVISOR
                t = one if t == 0 else t
                s = np.clip(b / t, _nvfp4.E4M3_TINY, _nvfp4.E4M3_MAX).astype(e4m3)
                r = (one / t) / s.astype(_F32)
            else:
                t = one
                s = np.clip(b, _nvfp4.E4M3_TINY, _nvfp4.E4M3_MAX).astype(e4m3)
                r = one / s.astype(_F32)
        else:
            S = one
            if per_tensor_scale:
                S = np.minimum(_nvfp4.TENSOR_SCALE_DIVISOR / amax, f32max)
                S = one if S == 0 else S
            t = one / S
            mult = S * (one / _nvfp4.E2M1_MAX)
            d = np.minimum(m * mult, f32max)
            s = np.clip(d, -_nvfp4.E4M3_MAX, _nvfp4.E4M3_MAX).astype(e4m3)
            r = np.minimum(one / (s.astype(_F32) * t), f32max)
        scaled = np.clip(blocks * r[..., None].astype(_F32), -_nvfp4.E2M1_MAX, _nvfp4.E2M1_MAX)
    scaled = scaled.astype(_F32)
    codes = scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    sbytes = s.view(np.uint8).copy()
    nan_block = np.isnan(s.astype(_F32))
    sbytes[nan_block] = _nvfp4.E4M3_NAN_BYTE
    codes = np.where(nan_block[..., None] | np.isnan(scaled), np.uint8(0), codes)
    t = CANONICAL_NAN_BITS.view(np.float32) if np.isnan(t) else _F32(t)
    if not _nvfp4.is_tiled(block_size):
        sbytes = np.moveaxis(sbytes, -1, ax)
    return _nvfp4_unblock(codes, x.shape, ax, block_size), np.ascontiguousarray(sbytes), t


def dequantize_nvfp4(codes: Any, block_scales: Any, tensor_scale: Any, *, block_size: int = 16,
                     axis: int = -1, dtype: Any = np.float32) -> np.ndarray:
    """Inverse of :func:`quantize_nvfp4` (either variant): ``fl(value[code] · fl(t · s))``
    with ``s`` the e4m3 value of the block's byte (NaN for 0x7F / 0xFF), cast once to
    ``dtype``, NaN as the canonical ``0x7FC00000``. ``tensor_scale`` is a float32 scalar (a
    Python float is taken as float32)."""
    codes = np.asarray(codes)
    block_scales = np.asarray(block_scales)
    ts = np.asarray(_F32(tensor_scale) if type(tensor_scale) is float else tensor_scale)
    ax = _nvfp4.check_dequantize_args(codes.dtype.name, tuple(codes.shape), block_scales.dtype.name,
                                      tuple(block_scales.shape), ts.dtype.name, tuple(ts.shape),
                                      block_size, axis)
    out_dtype = _out_dtype(dtype)
    if np.any(codes > 15):
        raise ValueError("codes must be float4_e2m1fn codes (0 … 15)")
    with np.errstate(invalid="ignore", over="ignore"):
        total = ts.astype(_F32) * _nvfp4.e4m3_values()[block_scales]
        vals = codes.view(ml_dtypes.float4_e2m1fn).astype(_F32)
        if _nvfp4.is_tiled(block_size):
            total = np.repeat(np.repeat(total, 16, axis=0), 16, axis=1)[:codes.shape[0], :codes.shape[1]]
        else:
            total = _mx.expand_scales(total, codes.shape, block_size, ax)
        y = (vals * total).astype(_F32)
    y = np.where(np.isnan(y), CANONICAL_NAN_BITS.view(np.float32), y)
    return y.astype(out_dtype)
