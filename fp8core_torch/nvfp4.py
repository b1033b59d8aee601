"""NVFP4 quantization in torch ops (docs/numerics.md §13): the float32 sequence of
:func:`fp8core.reference.quantize_nvfp4` step for step, bit-identical to it (and so to
torchao 0.18's ``nvfp4_quantize`` on its inputs). The constants, variants and argument
checks are :mod:`fp8core.nvfp4`'s; every constant enters as a float32 tensor on the
input's device (a CUDA division by a Python scalar is a multiply by its reciprocal)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch

import fp8core.nvfp4 as _nv
from fp8core_torch.config import check_float_tensor, check_tensor, dtype_name

__all__ = ["quantize_nvfp4", "dequantize_nvfp4"]

_F32MAX = float(np.finfo(np.float32).max)
_E2M1_VALUES = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
_E2M1_VALUES.setflags(write=False)
#: made once at import: traced code (torch.compile) must not run numpy or ml_dtypes
_E2M1_VALUES_T = torch.from_numpy(_E2M1_VALUES.copy())
_SIX, _E4MAX, _TINY, _DIV = (float(v) for v in (_nv.E2M1_MAX, _nv.E4M3_MAX, _nv.E4M3_TINY,
                                                  _nv.TENSOR_SCALE_DIVISOR))
_ROUND_TABLE = tuple((float(m), bool(u)) for m, u in zip(*_nv.e2m1_round_table()[:2]))


def _c(v: Any, device: torch.device) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float32, device=device)


def _round_e2m1(s: torch.Tensor) -> torch.Tensor:
    """Codes of float32 ``s`` in [−6, 6], half to even (:func:`fp8core.nvfp4.e2m1_round_table`),
    the sign bit (−0 included) as bit 3; NaN → 0."""
    m = s.abs()
    idx = torch.zeros(s.shape, dtype=torch.uint8, device=s.device)
    for mid, tie_up in _ROUND_TABLE:
        mj = _c(mid, s.device)
        idx += (m >= mj if tie_up else m > mj).to(torch.uint8)
    sign = torch.signbit(s).to(torch.uint8) << 3
    return torch.where(torch.isnan(s), torch.zeros_like(idx), idx | sign)


def quantize_nvfp4(x: torch.Tensor, *, block_size: int = 16, axis: int = -1,
                   per_tensor_scale: bool = True, variant: str = "torchao"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantization (§13), bit-identical to :func:`fp8core.quantize_nvfp4`.

    Returns ``(codes, block_scales, tensor_scale)``: uint8 e2m1 codes shaped like ``x``,
    uint8 e4m3 bytes of :func:`fp8core.nvfp4.scales_shape` (one per 1x16 block along ``axis``,
    or per 16x16 tile with ``block_size=(16, 16)``), a 0-d float32 tensor. The
    numerics (variants ``"torchao"`` / ``"te"``, NaN and zero handling) are the
    reference's docstring. Not differentiable.

    Raises:
      TypeError / ValueError: as :func:`fp8core.quantize_nvfp4`.
    """
    check_float_tensor(x, "x")
    ax = _nv.check_quantize_args(tuple(x.shape), block_size, axis, per_tensor_scale, variant)
    dev = x.device
    x32 = x.detach().to(torch.float32)
    tiled = _nv.is_tiled(block_size)
    if tiled:                                              # (row_tiles, col_tiles, 256)
        rows, cols = x32.shape
        rt, ct = -(-rows // 16), -(-cols // 16)
        t = torch.nn.functional.pad(x32, (0, ct * 16 - cols, 0, rt * 16 - rows))
        blocks = t.reshape(rt, 16, ct, 16).permute(0, 2, 1, 3).reshape(rt, ct, 256)
    else:
        t = x32.movedim(ax, -1)
        n = t.shape[-1]
        nb = -(-n // block_size)
        if nb * block_size != n:
            t = torch.nn.functional.pad(t, (0, nb * block_size - n))
        blocks = t.reshape(*t.shape[:-1], nb, block_size)
    one, f32max = _c(1, dev), _c(_F32MAX, dev)
    six, e4max, tiny = _c(_SIX, dev), _c(_E4MAX, dev), _c(_TINY, dev)
    if blocks.numel():
        m = blocks.abs().amax(dim=-1)                      # NaN-propagating
        amax = x32.abs().max()
    else:
        m = torch.zeros(blocks.shape[:-1], dtype=torch.float32, device=dev)
        amax = _c(0, dev)
    if variant == "torchao":
        b = torch.div(m, six)
        if per_tensor_scale:
            ts = torch.div(amax, _c(_DIV, dev))
            ts = torch.where(ts == 0, one, ts)
            s8 = torch.clamp(torch.div(b, ts), tiny, e4max).to(torch.float8_e4m3fn)
            r = torch.div(torch.div(one, ts), s8.to(torch.float32))
        else:
            ts = one
            s8 = torch.clamp(b, tiny, e4max).to(torch.float8_e4m3fn)
            r = torch.div(one, s8.to(torch.float32))
    else:
        S = one
        if per_tensor_scale:
            S = torch.minimum(torch.div(_c(_DIV, dev), amax), f32max)
            S = torch.where(S == 0, one, S)
        ts = torch.div(one, S)
        mult = S * torch.div(one, six)
        d = torch.minimum(m * mult, f32max)
        s8 = torch.clamp(d, -e4max, e4max).to(torch.float8_e4m3fn)
        r = torch.minimum(torch.div(one, s8.to(torch.float32) * ts), f32max)
    scaled = torch.clamp(blocks * r.unsqueeze(-1), -six, six)
    codes = _round_e2m1(scaled)
    sv = s8.to(torch.float32)
    sbytes = s8.view(torch.uint8).masked_fill(torch.isnan(sv), _nv.E4M3_NAN_BYTE)
    codes = torch.where(torch.isnan(sv).unsqueeze(-1), torch.zeros_like(codes), codes)
    ts = torch.where(torch.isnan(ts), _c(float("nan"), dev), ts).reshape(())
    if tiled:
        codes = codes.reshape(rt, ct, 16, 16).permute(0, 2, 1, 3).reshape(rt * 16, ct * 16)
        return codes[:rows, :cols].contiguous(), sbytes.contiguous(), ts
    codes = codes.reshape(*codes.shape[:-2], nb * block_size)[..., :n]
    return codes.movedim(-1, ax).contiguous(), sbytes.movedim(-1, ax).contiguous(), ts


def dequantize_nvfp4(codes: torch.Tensor, block_scales: torch.Tensor, tensor_scale: Any, *,
                     block_size: int = 16, axis: int = -1,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`: ``fl(value[code] · fl(t · s))`` cast once to
    ``dtype``; bit-identical to :func:`fp8core.dequantize_nvfp4`. ``tensor_scale`` is a
    0-d float32 tensor (or a Python float, taken as float32)."""
    check_tensor(codes, "codes")
    check_tensor(block_scales, "block_scales")
    if type(tensor_scale) is float:
        tensor_scale = _c(tensor_scale, codes.device)
    check_tensor(tensor_scale, "tensor_scale")
    ax = _nv.check_dequantize_args(dtype_name(codes.dtype), tuple(codes.shape),
                                   dtype_name(block_scales.dtype), tuple(block_scales.shape),
                                   dtype_name(tensor_scale.dtype), tuple(tensor_scale.shape),
                                   block_size, axis)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes must be float4_e2m1fn codes (0 … 15)")
    s = block_scales.view(torch.float8_e4m3fn).to(torch.float32)
    total = tensor_scale.to(codes.device) * s
    if _nv.is_tiled(block_size):
        total = total.repeat_interleave(16, dim=0).repeat_interleave(16, dim=1)
        total = total[:codes.shape[0], :codes.shape[1]]
    else:
        total = total.repeat_interleave(block_size, dim=ax).narrow(ax, 0, codes.shape[ax])
    vals = _E2M1_VALUES_T.to(codes.device)[codes.to(torch.int64)]
    y = vals * total
    # canonical NaN after the cast (torch's float32 → bfloat16 cast makes NaN 0xFFFF)
    return y.to(dtype).masked_fill(torch.isnan(y), float("nan"))


# ------------------------------------------- the operand engine's NVFP4 rules (§13.5)
def engine_scales(absmax: torch.Tensor, variant: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(finite, r, dscale)`` of :func:`fp8core.nvfp4.engine_scales` for a float32 absmax
    grid (one operand's blocks or tiles, any shape): the tensor amax is the grid's
    NaN-propagating max, then the same float32 steps; ``finite`` is False in NaN blocks."""
    dev = absmax.device
    m = absmax.to(torch.float32)
    one, f32max = _c(1, dev), _c(_F32MAX, dev)
    six, e4max, tiny = _c(_SIX, dev), _c(_E4MAX, dev), _c(_TINY, dev)
    amax = m.max() if m.numel() else _c(0, dev)          # NaN-propagating
    if variant == "torchao":
        ts = torch.div(amax, _c(_DIV, dev))
        ts = torch.where(ts == 0, one, ts)
        s = torch.clamp(torch.div(torch.div(m, six), ts), tiny, e4max).to(torch.float8_e4m3fn)
        r = torch.div(torch.div(one, ts), s.to(torch.float32))
    else:
        S = torch.minimum(torch.div(_c(_DIV, dev), amax), f32max)
        S = torch.where(S == 0, one, S)
        ts = torch.div(one, S)
        d = torch.minimum(m * (S * torch.div(one, six)), f32max)
        s = torch.clamp(d, -e4max, e4max).to(torch.float8_e4m3fn)
        r = torch.minimum(torch.div(one, s.to(torch.float32) * ts), f32max)
    sv = s.to(torch.float32)
    finite = ~torch.isnan(sv)
    nan = _c(float("nan"), dev)
    return finite, torch.where(finite, r, _c(0, dev)), torch.where(finite, ts * sv, nan)


def engine_quantize(x: torch.Tensor, r: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Codes of float32 ``x`` under per-group multipliers ``r`` (broadcast against ``x``):
    ``e2m1(clamp(fl(x · r), −6, 6))``, code 0 for a NaN product and in NaN blocks."""
    six = _c(_SIX, x.device)
    codes = _round_e2m1(torch.clamp(x * r, -six, six))
    return codes.masked_fill(~finite, 0)


def engine_decode(codes: torch.Tensor, dscale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fl(value[code] · dscale)`` cast once to ``dtype``, NaN as the canonical NaN."""
    vals = _E2M1_VALUES_T.to(codes.device)[codes.to(torch.int64)]
    y = vals * dscale
    return y.to(dtype).masked_fill(torch.isnan(y), float("nan"))
