"""NVFP4 quantization in XLA (docs/numerics.md §13): the float32 sequence of
:func:`fp8core.reference.quantize_nvfp4` step for step, jit-compiled. Constants,
variants and argument checks are :mod:`fp8core.nvfp4`'s.

XLA:CPU flushes float32 subnormals (operands and results). Two places are written so
that flushing changes nothing: a subnormal input element is multiplied as
``(x · 2**64) · (r · 2**-64)`` (the first factor by integer arithmetic on the bits,
:func:`fp8core_jax.quantize._mul_pow2`; the second exact for ``r ≥ 2**-62``, else the
product is far below e2m1's half-step either way), and the TE variant's tensor scale of
an all-zero tensor (``1 / FLT_MAX``, a float32 subnormal) is a constant. With these the
result is the reference's for every input whose tensor amax is 0 or ≥ 2**-100 (then no
other step of the chain meets a subnormal, §13.4); below that, XLA:CPU's flushing may
change the scale chain.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

import fp8core.nvfp4 as _nv
from fp8core_jax.quantize import _check_x, _dtype_name, _mul_pow2

__all__ = ["quantize_nvfp4", "dequantize_nvfp4"]

_F32 = np.float32
_F32MAX = _F32(np.finfo(np.float32).max)
_TE_ZERO_T = _F32(1) / _F32MAX          # fl(1 / FLT_MAX): subnormal, flushed by XLA:CPU
_E2M1_VALUES = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
_CANON_NAN = np.uint32(0x7FC00000).view(np.float32)


def _div(a: jax.Array, b: Any) -> jax.Array:
    """``fl(a / b)``, a true division. XLA's simplifier rewrites a division by a constant or
    by a broadcast scalar (``A / c``, ``A / broadcast(t)``) into a multiply by the rounded
    reciprocal, which is off by an ulp for about a quarter of the inputs; a divisor of
    ``a``'s full shape behind an optimization barrier stays a division."""
    a = jnp.asarray(a, jnp.float32)
    return a / lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, jnp.float32), a.shape))


def _round_e2m1(s: jax.Array) -> jax.Array:
    """Codes of float32 ``s`` in [−6, 6], half to even (:func:`fp8core.nvfp4.e2m1_round_table`);
    the sign bit (−0 included) as bit 3; NaN → 0."""
    mid, tie_up, _ = _nv.e2m1_round_table()
    m = jnp.abs(s)
    idx = jnp.zeros(s.shape, jnp.uint8)
    for j in range(mid.size):
        idx = idx + (m >= mid[j] if tie_up[j] else m > mid[j]).astype(jnp.uint8)
    sign = (lax.bitcast_convert_type(s, jnp.uint32) >> 31).astype(jnp.uint8) << 3
    return jnp.where(jnp.isnan(s), jnp.uint8(0), idx | sign)


@functools.partial(jax.jit, static_argnames=("block_size", "axis", "per_tensor_scale", "variant"))
def _quantize(x, block_size, axis, per_tensor_scale, variant):
    x32 = x.astype(jnp.float32)
    tiled = _nv.is_tiled(block_size)
    if tiled:                                              # (row_tiles, col_tiles, 256)
        rows, cols = x32.shape
        rt, ct = -(-rows // 16), -(-cols // 16)
        t = jnp.pad(x32, [(0, rt * 16 - rows), (0, ct * 16 - cols)])
        blocks = t.reshape(rt, 16, ct, 16).transpose(0, 2, 1, 3).reshape(rt, ct, 256)
    else:
        t = jnp.moveaxis(x32, axis, -1)
        n = t.shape[-1]
        nb = -(-n // block_size)
        if nb * block_size != n:
            t = jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, nb * block_size - n)])
        blocks = t.reshape(*t.shape[:-1], nb, block_size)
    one = _F32(1)
    if blocks.size:
        # NaN-propagating maxima (XLA:CPU's max reduction may drop a NaN)
        m = jnp.where(jnp.any(jnp.isnan(blocks), axis=-1), jnp.nan, jnp.max(jnp.abs(blocks), axis=-1))
        amax = jnp.where(jnp.any(jnp.isnan(x32)), jnp.nan, jnp.max(jnp.abs(x32)))
    else:
        m = jnp.zeros(blocks.shape[:-1], jnp.float32)
        amax = jnp.float32(0)
    if variant == "torchao":
        b = _div(m, _nv.E2M1_MAX)
        if per_tensor_scale:
            ts = _div(amax, _nv.TENSOR_SCALE_DIVISOR)
            ts = jnp.where(ts == 0, one, ts)
            s8 = jnp.clip(_div(b, ts), _nv.E4M3_TINY, _nv.E4M3_MAX).astype(jnp.float8_e4m3fn)
            r = (one / ts) / s8.astype(jnp.float32)
        else:
            ts = jnp.float32(1)
            s8 = jnp.clip(b, _nv.E4M3_TINY, _nv.E4M3_MAX).astype(jnp.float8_e4m3fn)
            r = one / s8.astype(jnp.float32)
    else:
        S = jnp.float32(1)
        if per_tensor_scale:
            S = jnp.minimum(_nv.TENSOR_SCALE_DIVISOR / amax, _F32MAX)
            S = jnp.where(S == 0, one, S)
        ts = one / S                 # fl(1 / FLT_MAX) is subnormal: its bits are set below
        mult = S * (one / _nv.E2M1_MAX)
        d = jnp.minimum(m * mult, _F32MAX)
        s8 = jnp.clip(d, -_nv.E4M3_MAX, _nv.E4M3_MAX).astype(jnp.float8_e4m3fn)
        r = jnp.minimum(one / (s8.astype(jnp.float32) * ts), _F32MAX)
    r = jnp.broadcast_to(r[..., None], blocks.shape)
    bits = lax.bitcast_convert_type(blocks, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    sub = (bits != 0) & (bits < jnp.uint32(0x00800000))
    lift = sub & (r >= _F32(2.0 ** -62))
    xs = jnp.where(lift, _mul_pow2(blocks, jnp.int32(64)), blocks)
    rs = jnp.where(lift, r * _F32(2.0 ** -64), r)
    scaled = jnp.clip(xs * rs, -_nv.E2M1_MAX, _nv.E2M1_MAX)
    codes = _round_e2m1(scaled)
    sv = s8.astype(jnp.float32)
    nan_block = jnp.isnan(sv)
    sbytes = jnp.where(nan_block, jnp.uint8(_nv.E4M3_NAN_BYTE), lax.bitcast_convert_type(s8, jnp.uint8))
    codes = jnp.where(nan_block[..., None], jnp.uint8(0), codes)
    ts_bits = lax.bitcast_convert_type(jnp.asarray(ts, jnp.float32), jnp.uint32)
    ts_bits = jnp.where(jnp.isnan(ts), jnp.uint32(0x7FC00000), ts_bits)
    if variant == "te":
        ts_bits = jnp.where(S == _F32MAX, jnp.uint32(_TE_ZERO_T.view(np.uint32)), ts_bits)
    ts = lax.bitcast_convert_type(ts_bits, jnp.float32).reshape(())
    if tiled:
        codes = codes.reshape(rt, ct, 16, 16).transpose(0, 2, 1, 3).reshape(rt * 16, ct * 16)
        return codes[:rows, :cols], sbytes, ts
    codes = codes.reshape(*codes.shape[:-2], nb * block_size)[..., :n]
    return jnp.moveaxis(codes, -1, axis), jnp.moveaxis(sbytes, -1, axis), ts


def quantize_nvfp4(x: Any, *, block_size: int = 16, axis: int = -1, per_tensor_scale: bool = True,
                   variant: str = "torchao") -> tuple[jax.Array, jax.Array, jax.Array]:
    """NVFP4 quantization (§13), bit-identical to :func:`fp8core.quantize_nvfp4` (XLA:CPU
    included, for a tensor amax of 0 or ≥ 2**-100: module docstring). Keywords static.

    Returns ``(codes, block_scales, tensor_scale)``: uint8 e2m1 codes shaped like ``x``,
    uint8 e4m3 bytes of :func:`fp8core.nvfp4.scales_shape` (one per 1x16 block along ``axis``,
    or per 16x16 tile with ``block_size=(16, 16)``), a 0-d float32 array. Not
    differentiable (``x`` enters through ``stop_gradient``).

    Raises:
      TypeError / ValueError: as :func:`fp8core.quantize_nvfp4`.
    """
    x = _check_x(x)
    ax = _nv.check_quantize_args(tuple(x.shape), block_size, axis, per_tensor_scale, variant)
    bs = tuple(block_size) if _nv.is_tiled(block_size) else block_size
    return _quantize(lax.stop_gradient(x), bs, ax, per_tensor_scale, variant)


@functools.partial(jax.jit, static_argnames=("block_size", "axis", "dtype"))
def _dequantize(codes, block_scales, tensor_scale, block_size, axis, dtype):
    s = lax.bitcast_convert_type(block_scales, jnp.float8_e4m3fn).astype(jnp.float32)
    total = tensor_scale * s
    if _nv.is_tiled(block_size):
        total = jnp.repeat(jnp.repeat(total, 16, axis=0), 16, axis=1)[:codes.shape[0], :codes.shape[1]]
    else:
        total = jnp.repeat(total, block_size, axis=axis)
        total = lax.slice_in_dim(total, 0, codes.shape[axis], axis=axis)
    vals = jnp.asarray(_E2M1_VALUES)[codes.astype(jnp.int32)]
    y = vals * total
    return jnp.where(jnp.isnan(y), _CANON_NAN, y).astype(dtype)


def dequantize_nvfp4(codes: Any, block_scales: Any, tensor_scale: Any, *, block_size: int = 16,
                     axis: int = -1, dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_nvfp4`: ``fl(value[code] · fl(t · s))`` cast once to
    ``dtype``, bit-identical to :func:`fp8core.dequantize_nvfp4` when ``fl(t · s)`` and the
    products are float32 normals or zero (always for a tensor amax of 0 or ≥ 2**-100)."""
    codes = jnp.asarray(codes) if not hasattr(codes, "dtype") else codes
    block_scales = jnp.asarray(block_scales) if not hasattr(block_scales, "dtype") else block_scales
    if type(tensor_scale) is float:
        tensor_scale = jnp.float32(tensor_scale)
    tensor_scale = jnp.asarray(tensor_scale) if not hasattr(tensor_scale, "dtype") else tensor_scale
    ax = _nv.check_dequantize_args(np.dtype(codes.dtype).name, tuple(codes.shape),
                                   np.dtype(block_scales.dtype).name, tuple(block_scales.shape),
                                   np.dtype(tensor_scale.dtype).name, tuple(tensor_scale.shape),
                                   block_size, axis)
    name = _dtype_name(dtype)
    if not isinstance(codes, jax.core.Tracer) and codes.size and int(jnp.max(codes)) > 15:
        raise ValueError("codes must be float4_e2m1fn codes (0 … 15)")
    bs = tuple(block_size) if _nv.is_tiled(block_size) else int(block_size)
    return _dequantize(codes, block_scales, tensor_scale, bs, ax, name)


# ------------------------------------------- the operand engine's NVFP4 rules (§13.5)
def engine_scales(absmax: jax.Array, variant: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(finite, r, dscale)`` of :func:`fp8core.nvfp4.engine_scales` for one operand's
    float32 absmax grid (the engine's §3.2 form: 0 or ≥ 2**-126, so no subnormal enters):
    the tensor amax is the grid's max with NaN taken from an explicit ``isnan``, then the
    same float32 steps; ``finite`` is False in NaN blocks. Under XLA:CPU's flushing the
    bits equal the reference's for a tensor amax of 0 or ≥ 2**-100 (§13.4; TE's all-zero
    tensor scale is subnormal, but every block's ``s`` is then 0, so neither ``r`` nor
    ``dscale`` depends on it)."""
    m = absmax.astype(jnp.float32)
    one = _F32(1)
    if m.size:
        amax = jnp.where(jnp.any(jnp.isnan(m)), jnp.float32(np.nan), jnp.max(m))
    else:
        amax = jnp.float32(0)
    if variant == "torchao":
        ts = _div(amax, _nv.TENSOR_SCALE_DIVISOR)
        ts = jnp.where(ts == 0, one, ts)
        s8 = jnp.clip(_div(_div(m, _nv.E2M1_MAX), ts), _nv.E4M3_TINY, _nv.E4M3_MAX).astype(jnp.float8_e4m3fn)
        r = (one / ts) / s8.astype(jnp.float32)
    else:
        S = jnp.minimum(_nv.TENSOR_SCALE_DIVISOR / amax, _F32MAX)
        S = jnp.where(S == 0, one, S)
        ts = one / S
        d = jnp.minimum(m * (S * (one / _nv.E2M1_MAX)), _F32MAX)
        s8 = jnp.clip(d, -_nv.E4M3_MAX, _nv.E4M3_MAX).astype(jnp.float8_e4m3fn)
        r = jnp.minimum(one / (s8.astype(jnp.float32) * ts), _F32MAX)
    sv = s8.astype(jnp.float32)
    finite = ~jnp.isnan(sv)
    return finite, jnp.where(finite, r, _F32(0)), jnp.where(finite, ts * sv, _CANON_NAN)


def engine_quantize(x: jax.Array, r: jax.Array, finite: jax.Array) -> jax.Array:
    """Codes of float32 ``x`` under multipliers ``r`` and block flags ``finite`` (both
    broadcast against ``x``): ``e2m1(clamp(fl(x · r), −6, 6))``, code 0 for a NaN product
    and in NaN blocks; a float32-subnormal ``x`` multiplied as ``(x · 2**64) · (r · 2**-64)``
    (module docstring)."""
    codes = _round_e2m1(engine_scaled(x, r))
    return jnp.where(jnp.broadcast_to(finite, x.shape), codes, jnp.uint8(0))


def engine_scaled(x: jax.Array, r: jax.Array) -> jax.Array:
    """``clamp(fl(x · r), −6, 6)`` with a float32-subnormal ``x`` multiplied as
    ``(x · 2**64) · (r · 2**-64)`` (XLA:CPU would read it as ±0; the product is the same
    single rounding), ``r`` broadcast against ``x`` — also the stochastic path's scaling."""
    r = jnp.broadcast_to(r, x.shape)
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    lift = (bits != 0) & (bits < jnp.uint32(0x00800000)) & (r >= _F32(2.0 ** -62))
    xs = jnp.where(lift, _mul_pow2(x, jnp.int32(64)), x)
    rs = jnp.where(lift, r * _F32(2.0 ** -64), r)
    return jnp.clip(xs * rs, -_nv.E2M1_MAX, _nv.E2M1_MAX)


def engine_decode(codes: jax.Array, dscale: jax.Array) -> jax.Array:
    """float32 ``fl(value[code] · dscale)``, NaN as the canonical NaN."""
    y = jnp.asarray(_E2M1_VALUES)[codes.astype(jnp.int32)] * dscale
    return jnp.where(jnp.isnan(y), _CANON_NAN, y)
