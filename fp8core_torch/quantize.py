"""Blockwise / global FP8 quantizers for torch, bit-identical to ``fp8core.reference``.

Numerics (docs/numerics.md), shared by every function here:

* inputs are upcast to float32 first (float64 rounds to nearest-even float32);
* absmax per group, NaN-propagating (canonical NaN ``0x7FC00000``), a subnormal
  absmax is stored as +0; ``a = clip(absmax, FLOOR, CEIL)``;
  ``qscale = fl(M / a)`` — one float32 tensor/tensor division per group (never
  ``python_float / tensor``: torch evaluates that as ``reciprocal(a) * M``, a
  double rounding) — and ``dscale = fl(a * fl(1/M))``;
* ``s = clip(fl(x * qscale), -M, M)``, then round: native formats round half to
  even (see :func:`_round_native_`), tables go to the nearest entry with ties to
  the lower entry (``searchsorted`` over :attr:`Codebook.thresholds`);
* non-finite groups store the fill code and dequantize to NaN;
* dequantized values are ``fl(value[code] * dscale)`` in float32, cast once to
  the output dtype.

Memory is O(n): no (n x 256) distance tensor. On CPU, native formats go through
fp8core's fused C kernel (:mod:`fp8core._kernel`: one pass per block, codes and
values written directly; a ``fp8core::quantize`` custom op under ``torch.compile``)
when it is built; elsewhere (CUDA, tables, or ``FP8CORE_KERNEL=0``) the torch ops
below run. In eager mode, formats torch has
(float8_e4m3fn, e5m2 and their fnuz variants) are rounded by torch's own cast
after the clamp (tested equal to ml_dtypes on every midpoint); others use the
float32 arithmetic rounding. Under ``torch.compile`` the arithmetic float32 ops
run unchunked and inductor fuses them.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

import fp8core
import fp8core.mx
import fp8core.random
import fp8core.nvfp4
import fp8core.recipe
from fp8core import _kernel as _fp8q
from fp8core import _validation
from fp8core.blocks import operand_matrix, plan_blocks, plan_operand, plan_tiles
from fp8core_torch import _pool
from fp8core_torch import nvfp4 as _tnv
from fp8core_torch.config import (
    ARITH,
    CodebookTensors,
    QuantSpec,
    check_float_tensor,
    check_tensor,
    codebook_tensors,
    dtype_name,
    resolve_spec,
)

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_global",
    "dequantize_global",
    "fake_quantize",
    "quantize_operand",
    "dequantize_operand",
    "fake_quantize_operand",
]

#: Smallest eager chunk (elements). Large tensors are cut into at most
#: _MAX_CHUNKS chunks: every op on a chunk is one OpenMP parallel region, and on a
#: loaded machine each region can cost a scheduler time slice (~8 ms measured).
#: With the float8-cast rounding, 16M elements: idle, 4 chunks were 1.15-1.8x
#: faster than 1 (fp32 / bf16: smaller scratch, fewer page faults); under load
#: (another process on one core) 1 chunk was 1.1-1.8x faster than 4. 4 is kept.
_CHUNK = 1 << 20
_MAX_CHUNKS = 4
_F32_SMALLEST_NORMAL = 2.0**-126
_F32_EXP_MASK = 0x7F800000


# ------------------------------------------------------------------ primitives
def _upcast(x: torch.Tensor) -> torch.Tensor:
    """§2: float64 is rounded to float32 before anything else; others stay (exact later)."""
    return x.to(torch.float32) if x.dtype == torch.float64 else x


def _absmax_rows(x2d: torch.Tensor) -> torch.Tensor:
    """§3.2 for each row: max |x| (NaN-propagating), subnormal -> +0, NaN -> 0x7FC00000.

    ``max(amax, -amin)`` reads the data twice without an |x| temporary; both
    reductions are exact in x's own dtype and propagate NaN.
    """
    a = torch.maximum(torch.amax(x2d, dim=1), torch.amin(x2d, dim=1).neg())
    a = a.to(torch.float32)
    a = torch.where(a < _F32_SMALLEST_NORMAL, 0.0, a)
    return a.masked_fill(torch.isnan(a), float("nan"))  # float32(nan) is 0x7FC00000


def _absmax_all(flat: torch.Tensor) -> torch.Tensor:
    return _absmax_rows(flat.view(1, -1)).view(())


def _finish_absmax_bits(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int16 magnitude bits of a float16/bfloat16 absmax -> float32 absmax (§3.2)."""
    a = m.view(dtype).to(torch.float32)
    a = torch.where(a < _F32_SMALLEST_NORMAL, 0.0, a)
    return a.masked_fill(torch.isnan(a), float("nan"))


def _absmax_rows_bits(x2d: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """:func:`_absmax_rows` of a contiguous float16/bfloat16 ``x2d`` through its bits:
    ``max(bits & 0x7FFF)`` per row, written piecewise into the int16 scratch ``buf``
    (one masking pass + one int16 reduction instead of a float amax + amin; 16M bf16:
    3.5 ms vs 5.4 ms). Positive floats order like their bit patterns, and NaN's
    magnitude bits exceed inf's, so the max bits are those of max |x| (NaN if any).
    """
    rows, cols = x2d.shape
    bits = x2d.view(torch.int16)
    cap = buf.numel()
    if cols <= cap:
        step = cap // cols
        parts = []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            t = torch.bitwise_and(bits[r0:r1], 0x7FFF, out=buf[:(r1 - r0) * cols].view(r1 - r0, cols))
            parts.append(torch.amax(t, dim=1))
        m = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:  # rows longer than the scratch: column pieces, then the max of the maxima
        parts = []
        for c0 in range(0, cols, cap):
            c1 = min(cols, c0 + cap)
            t = buf[:rows * (c1 - c0)].view(rows, c1 - c0)
            torch.bitwise_and(bits[:, c0:c1], 0x7FFF, out=t)
            parts.append(torch.amax(t, dim=1, keepdim=True))
        m = torch.amax(torch.cat(parts, dim=1), dim=1)
    return _finish_absmax_bits(m, x2d.dtype)


def _scales(absmax: torch.Tensor, spec: QuantSpec, scale: str = "fp32"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§3.3 / §4.1 / §9.2: ``(finite, qscale, dscale)``; non-finite groups get dscale = NaN.

    ``"pow2"`` / ``"pow2_torchao"``: qscale is q0's power of two (plus one binade where
    q0 reaches the torchao threshold), dscale its exact reciprocal, both from the bits."""
    if scale in _MX_RULES:
        return _mx_scales(absmax, spec, fp8core.mx.mode_of(scale))
    if scale in fp8core.nvfp4.ENGINE_RULES:                  # §13.5: the whole grid
        return _tnv.engine_scales(absmax, fp8core.nvfp4.ENGINE_RULES[scale])
    finite = torch.isfinite(absmax)
    a = torch.where(finite, absmax, 1.0).clamp(spec.scale_floor, spec.scale_ceiling)
    # fl(M / a): a tensor/tensor division. `spec.max / a` would be reciprocal(a) * M.
    qscale = torch.div(torch.full_like(a, spec.max), a)
    if scale == "fp32":
        dscale = torch.where(finite, a * spec.inv_max, float("nan"))
        return finite, qscale, dscale
    e = torch.bitwise_right_shift(qscale.view(torch.int32), 23)     # q0 > 0 is a normal
    if scale == "pow2_torchao":
        thr = _pow2_thresholds(absmax.device)[e.reshape(-1).long()].view(e.shape)  # 1-D gather
        e = e + (qscale >= thr).to(torch.int32)
    elif scale != "pow2":
        raise ValueError(f"unknown scale rule {scale!r}")
    qscale = torch.bitwise_left_shift(e, 23).view(torch.float32)
    dscale = torch.where(finite, torch.bitwise_left_shift(254 - e, 23).view(torch.float32),
                         float("nan"))
    return finite, qscale, dscale


_MX_RULES = frozenset(fp8core.mx.MX_SCALE_RULES)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2**e`` for int ``e`` in [-127, 127], from the bits (2**-127 is subnormal)."""
    e = e.to(torch.int32)
    bits = torch.where(e >= -126, torch.bitwise_left_shift(e + 127, 23),
                       torch.bitwise_left_shift(torch.ones_like(e), (e + 149).clamp(min=0)))
    return bits.view(torch.float32)


def _mx_scales(absmax: torch.Tensor, spec: QuantSpec, mode: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§11: the e8m0 byte of each block (a search of the absmax bits in fp8core.mx's
    byte table; NaN → 255), then ``(finite, qscale, dscale)`` as fp8core.mx.byte_scales."""
    b = _mx_bytes(absmax, spec, mode).to(torch.int32)
    finite = b != fp8core.mx.E8M0_NAN
    if mode == "rceil":                                   # 1 for byte 0 (torchao, TE)
        qexp = torch.where(b == 0, 0, 127 - b)
    else:                                                 # divisor max(2**(b-127), 2**-126)
        qexp = 127 - b.clamp(min=1)
    qscale = torch.where(finite, _pow2(qexp.clamp(-127, 127)), 0.0)
    dscale = torch.where(finite, _pow2((b - 127).clamp(-127, 127)), float("nan"))
    return finite, qscale, dscale


def _mx_bytes(absmax: torch.Tensor, spec: QuantSpec, mode: str) -> torch.Tensor:
    """uint8 e8m0 bytes of float32 ``absmax`` (§3.2 form) under ``mode``."""
    thr, values = _mx_table(spec.codebook.format.name, mode, absmax.device)
    bits = absmax.contiguous().view(torch.int32)
    b = values[torch.searchsorted(thr, bits, right=True) - 1]
    return torch.where(torch.isnan(absmax), fp8core.mx.E8M0_NAN, b).to(torch.uint8)


#: fp8core.mx.byte_table of every MX element format and mode as tensors, made once at
#: import (as _POW2_THRESHOLDS below: traced code under torch.compile must not run numpy
#: or ml_dtypes — dynamo cannot trace ml_dtypes.finfo)
_MX_TABLES = {(fmt, mode): tuple(torch.from_numpy(t.astype(dt)) for t, dt in zip(
                  fp8core.mx.byte_table(fmt, mode), (np.int32, np.int64)))
              for fmt in fp8core.mx.MX_ELEMENT_FORMATS for mode in fp8core.mx.SCALE_MODES}


@functools.lru_cache(maxsize=64)
def _mx_table(fmt: str, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    thr, values = _MX_TABLES[fmt, mode]
    return thr.to(device), values.to(device)


#: fp8core.recipe.pow2_torchao_thresholds() as a tensor, made once at import (under
#: torch.compile the traced code then only moves it, never runs numpy)
_POW2_THRESHOLDS = torch.from_numpy(fp8core.recipe.pow2_torchao_thresholds().copy())


@functools.lru_cache(maxsize=16)
def _pow2_thresholds(device: torch.device) -> torch.Tensor:
    return _POW2_THRESHOLDS.to(device)


def _round_native_(s: torch.Tensor, spec: QuantSpec, k: torch.Tensor | None = None,
                   sign_src: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 ``s`` (already in [-M, M]) in place to the format, half to even.

    With e = max(binade of |s|, binade of the format's smallest normal) and
    K = 2**(e + 23 - mantissa_bits), the float32 ulp on [K, 2K) is exactly the
    format's quantum at |s|, and |s| < 2K, so ``fl(|s| + K) - K`` is |s| rounded to
    the format by float32's own round-half-to-even (K is an even multiple of the
    quantum, so float32's "even" is the format's "even"); the subtraction is exact.

    Signs, two equivalent forms (both tested):
    * ``sign_src`` given (float32 input of a format with −0): round |s| and copy
      the sign of ``sign_src`` (x, same sign as s) — one copysign;
    * otherwise K carries s's sign (round to nearest is symmetric), which makes a
      negative value rounding to zero come out +0 — right for fnuz formats;
      formats with −0 then take the sign back from K (never zero).

    Verified bit for bit against ml_dtypes on every float32 midpoint and its
    neighbours (tests). ``k`` is an optional int32 scratch tensor shaped like ``s``.
    """
    if sign_src is not None:
        s.abs_()
    if k is None:
        k = torch.bitwise_and(s.view(torch.int32), _F32_EXP_MASK)
    else:
        torch.bitwise_and(s.view(torch.int32), _F32_EXP_MASK, out=k)
    k.clamp_(spec.k_min_bits, spec.k_max_bits).add_(spec.k_shift_bits)
    kf = k.view(torch.float32)
    if sign_src is not None:
        s.add_(kf).sub_(kf)
        return torch.copysign(s, sign_src, out=s)
    kf.copysign_(s)
    s.add_(kf).sub_(kf)
    if spec.has_negative_zero:
        s.copysign_(kf)
    return s


#: torch's float8 -> float32 cast is scalar code for the e4m3 formats (~4x slower
#: than a float32 pass); their values are decoded through float16 bit patterns instead.
_E4M3_F16_SCALE = {"float8_e4m3fn": 2.0**8, "float8_e4m3fnuz": 2.0**7}


def _decode_cast_into_(s: torch.Tensor, q: torch.Tensor, spec: QuantSpec,
                       dscale: torch.Tensor, fold: bool = True) -> torch.Tensor:
    """Write the float32 values of the float8 tensor ``q`` into ``s``; return the
    dscale to multiply ``s`` by so that the product is ``fl(value[code] * dscale)``.

    e4m3 (bias b): the code's 7 magnitude bits shifted left by 7 are the float16
    bit pattern of ``value * 2**(b - 15)`` — normals and subnormals alike, exactly —
    and the sign-extended int8 code puts the sign in bit 15 once bit 14 is cleared.
    Then ``fl(v' * (dscale * 2**(15 - b))) = fl(value * dscale)``: the scaling by a
    power of two is exact (v' >= 2**-17 is a float32 normal, dscale * 2**8 <
    FLT_MAX) and the exact products are equal. NaN codes (only in non-finite groups,
    whose dscale is NaN) decode to finite values; the product is NaN either way.

    ``fold=False`` (power-of-two scale rules, whose dscale may exceed FLT_MAX / 2**8):
    ``s`` is scaled by ``2**(15 - b)`` in place (exact: it is ``value``) and dscale is
    returned unchanged.
    """
    scale = _E4M3_F16_SCALE.get(spec.name) if spec.mantissa_bits == 3 else None
    if scale is None:
        s.copy_(q)                                           # exact
        return dscale
    h = q.view(torch.int8).to(torch.int16)
    h.bitwise_left_shift_(7).bitwise_and_(-0x4001)           # clear bit 14 (0xBFFF)
    s.copy_(h.view(torch.float16))                           # exact
    if not fold:
        s.mul_(scale)                                        # exact: value[code]
        return dscale
    return dscale * scale


def _decode(codes: torch.Tensor, spec: QuantSpec, tabs: CodebookTensors | None) -> torch.Tensor:
    """§4.2: float32 value of each uint8 code (NaN for codes without a value)."""
    if spec.torch_dtype is not None:
        return codes.view(spec.torch_dtype).to(torch.float32)
    return tabs.values256[codes.to(torch.int64)]


def _kernel(
    xc: torch.Tensor,
    qscale: torch.Tensor,
    dscale: torch.Tensor,
    finite: torch.Tensor,
    spec: QuantSpec,
    tabs: CodebookTensors | None,
    vout: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    want_codes: bool,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: str = "fp32",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Quantize one piece ``xc`` (rows, cols) with (rows, 1) scales (``scale``: the rule
    that made them).

    Returns (values, codes); values are written into ``vout`` when given.
    ``scratch`` = (float32, int32) flat buffers of at least rows*cols elements
    (eager chunk loop); without it temporaries are allocated (compile path).
    The scales are never 0-d: a 0-d float32 operand would not promote a
    bfloat16 ``xc`` and the multiply would round in bfloat16.
    """
    if scratch is None:
        s = torch.mul(xc, qscale)                            # §3.4 fl(x * qscale), in float32
        k = None
    else:
        size = xc.numel()
        # a float32 output is its own scratch: rounded in place, then scaled in place
        use_out = vout is not None and vout.dtype == torch.float32 and spec.plan == ARITH
        s = vout if use_out else scratch[0][:size].view(xc.shape)
        k = scratch[1][:size].view(xc.shape) if scratch[1] is not None else None
        if xc.dtype == torch.float32:
            torch.mul(xc, qscale, out=s)
        else:  # exact upcast, then a float32 multiply (faster than a mixed-dtype mul)
            s.copy_(xc)
            torch.mul(s, qscale, out=s)
    s.clamp_(-spec.max, spec.max)                            # §3.4 saturate before rounding
    codes = None
    if scratch is not None and spec.torch_dtype is not None:
        # eager, a format torch has: torch's own cast rounds half to even with the
        # −0 rule (tested equal to ml_dtypes on every midpoint and neighbour); two
        # passes instead of the ~7 of _round_native_. NaN (non-finite groups) casts
        # to a NaN code, overwritten by the fill code below, and decodes to NaN.
        q = s.to(spec.torch_dtype)
        if want_codes:
            codes = q.view(torch.uint8)
        vals = None
        if out_dtype is not None:
            dscale = _decode_cast_into_(s, q, spec, dscale,  # s = value[code] (or scaled)
                                        fold=scale == "fp32")
            vals = s
    elif spec.plan == ARITH:
        # §3.5 half to even, −0 rule (sign copied from a float32 x when the format has −0)
        sign_src = xc if (k is not None and spec.has_negative_zero
                          and xc.dtype == torch.float32) else None
        _round_native_(s, spec, k, sign_src)
        vals = s
        if want_codes:
            if spec.torch_dtype is not None:                 # s is representable: exact cast
                codes = s.to(spec.torch_dtype).view(torch.uint8)
            else:
                idx = torch.searchsorted(tabs.thresholds, s)
                codes = tabs.sorted_codes[idx]
                if spec.negzero_code is not None:
                    codes = torch.where(
                        torch.signbit(s) & (codes == spec.zero_code), spec.negzero_code, codes
                    )
                codes = codes.to(torch.uint8)
    else:
        idx = torch.searchsorted(tabs.thresholds, s)         # §3.5 nearest, ties to lower
        vals = tabs.sorted_values[idx] if out_dtype is not None else None
        if want_codes:
            codes = tabs.sorted_codes[idx].to(torch.uint8)
    if codes is not None:
        codes = codes.masked_fill_(~finite, spec.fill_code)  # §3.6
    if out_dtype is None:
        return None, codes
    if vout is not None:  # computed in float32, rounded once to vout's dtype (§4.3, §4.4)
        if vals is vout:
            vout.mul_(dscale)
        elif vout.dtype == torch.float32 or vals is not s:
            torch.mul(vals, dscale, out=vout)
        else:  # in place in the scratch, then one cast (faster than a mixed-dtype mul)
            vout.copy_(torch.mul(s, dscale, out=s))
        return vout, codes
    return torch.mul(vals, dscale).to(out_dtype), codes


def _chunk_elems(n: int) -> int:
    return max(_CHUNK, -(-n // _MAX_CHUNKS))


def _pieces_blockwise(n: int, blocksize: int, chunked: bool):
    """(start, rows, cols) pieces of the row-major flattening: full blocks as rows,
    then the partial tail as one row (no padding copy)."""
    nfull = n // blocksize
    rows_per = max(1, _chunk_elems(n) // blocksize) if chunked else max(nfull, 1)
    for r0 in range(0, nfull, rows_per):
        rows = min(rows_per, nfull - r0)
        yield r0, r0 * blocksize, rows, blocksize
    tail = n - nfull * blocksize
    if tail:
        yield nfull, nfull * blocksize, 1, tail


def _pieces_global(n: int, chunked: bool):
    step = _chunk_elems(n) if chunked else n
    for start in range(0, n, step):
        yield start, min(step, n - start)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_NOT_BUILT_WARNED = False


def _warn_not_built() -> bool:
    """Say once that the kernel is missing (a CPU tensor would have used it); False."""
    global _NOT_BUILT_WARNED
    if not _NOT_BUILT_WARNED and not torch.compiler.is_compiling():
        _NOT_BUILT_WARNED = True
        warnings.warn(_fp8q.not_built_warning("fp8core_torch", "the torch ops"), RuntimeWarning,
                      stacklevel=4)
    return False


def _kernel_ok(x: torch.Tensor, spec: QuantSpec | None, dtypes=_KERNEL_DTYPES) -> bool:
    """Whether the fused C kernel can take ``x``: a plain CPU tensor of one of
    ``dtypes`` and a native codebook (``spec=None``: any codebook, for decoding)."""
    if _fp8q._LIB is None and _fp8q.ENABLED and x.device.type == "cpu":
        return _warn_not_built()
    return (_fp8q.available()
            and x.device.type == "cpu"
            and x.dtype in dtypes
            and (spec is None or _fp8q.supports(spec.codebook))
            # traced: the custom op takes it (dynamo may not even read .layout inside an
            # autograd.Function); eager: raw pointers need a plain strided tensor
            and (torch.compiler.is_compiling()
                 or (x.layout == torch.strided
                     and not torch._C._functorch.is_functorch_wrapped_tensor(x))))


def _qdq_kernel(x: torch.Tensor, spec: QuantSpec, blocksize: int | None, *,
                out_dtype: torch.dtype | None, want_codes: bool, scale: str = "fp32"
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """:func:`_qdq` through the C kernel (same contract, same bits; see fp8q.c).
    A float64 output is the float32 result widened (exact). Under ``torch.compile``
    the call goes through the ``fp8core::quantize`` custom op (opaque to inductor).
    Outputs come from :mod:`fp8core_torch._pool` (no page faults for repeated sizes)."""
    if out_dtype is not None and out_dtype not in _KERNEL_DTYPES:
        vals, codes, absmax = _qdq_kernel(x, spec, blocksize, out_dtype=torch.float32,
                                          want_codes=want_codes, scale=scale)
        return vals.to(out_dtype), codes, absmax
    x = x.detach()
    if torch.compiler.is_compiling():
        vals, codes, absmax = _quantize_op(x, spec.codebook.name, blocksize or 0,
                                           out_dtype or torch.float32, out_dtype is not None,
                                           want_codes, scale)
    else:
        vals, codes, absmax = _quantize_impl(x, spec.codebook, blocksize, out_dtype, want_codes,
                                             scale)
    return (vals if out_dtype is not None else None), (codes if want_codes else None), absmax


def _quantize_impl(x: torch.Tensor, codebook, blocksize: int | None, out_dtype: torch.dtype | None,
                   want_codes: bool, scale: str = "fp32"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat blocks / global of ``x`` through the kernel: flat ``(values, codes, absmax)``,
    an unwanted output empty (the custom op's fixed return type)."""
    flat = x.reshape(1, -1).contiguous()
    how = ("flat", blocksize) if blocksize else ("global",)
    v, c, a = _kernel_quantize(flat, codebook, how, scale, out_dtype, want_codes)
    return _or_empty(v, out_dtype or torch.float32), _or_empty(c, torch.uint8), a


def _or_empty(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return t if t is not None else torch.empty(0, dtype=dtype)


@torch.library.custom_op("fp8core::quantize", mutates_args=(), device_types="cpu")
def _quantize_op(x: torch.Tensor, fmt: str, blocksize: int, out_dtype: torch.dtype,
                 want_vals: bool, want_codes: bool, scale: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C kernel as a torch op (for torch.compile): flat ``(values, codes, absmax)``;
    ``blocksize=0`` is global; unwanted outputs are empty. ``fmt`` names a native format."""
    return _quantize_impl(x, fp8core.resolve_codebook(fmt), blocksize or None,
                          out_dtype if want_vals else None, want_codes, scale)


@_quantize_op.register_fake
def _(x, fmt, blocksize, out_dtype, want_vals, want_codes, scale):
    n = x.numel()
    return (x.new_empty(n if want_vals else 0, dtype=out_dtype),
            x.new_empty(n if want_codes else 0, dtype=torch.uint8),
            x.new_empty(plan_blocks(n, blocksize).n_blocks if blocksize else (),
                        dtype=torch.float32))


def _qdq(
    x: torch.Tensor,
    spec: QuantSpec,
    tabs: CodebookTensors | None,
    blocksize: int | None,
    *,
    out_dtype: torch.dtype | None,
    want_codes: bool,
    scale: str = "fp32",
    absmax_in: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The quantizer. ``x``: float16/bfloat16/float32 (float64 already rounded).

    Returns ``(values in out_dtype or None, uint8 codes or None, absmax)``, values and
    codes flat. ``blocksize=None`` is global quantization (0-d absmax); ``absmax_in``
    (global only) a given 0-d float32 amax used instead of ``x``'s own (§10.2).
    """
    x = x.detach()
    flat = x.reshape(-1)
    n = flat.numel()
    if n and absmax_in is None and scale in _fp8q.SCALE_RULE_CODES and _kernel_ok(x, spec):
        return _qdq_kernel(x, spec, blocksize, out_dtype=out_dtype, want_codes=want_codes,
                           scale=scale)
    dev = x.device
    compiling = torch.compiler.is_compiling()
    chunked = not compiling and n > _CHUNK
    scratch = None
    if not compiling and spec.plan == ARITH and n:
        size = min(n, max(_chunk_elems(n), blocksize or 0))
        scratch = (torch.empty(size, dtype=torch.float32, device=dev),
                   torch.empty(size, dtype=torch.int32, device=dev)
                   if spec.torch_dtype is None else None)
    # eager float16/bfloat16: absmax from the bits, through the float32 scratch
    abuf = (scratch[0].view(torch.int16) if scratch is not None
            and flat.dtype in (torch.float16, torch.bfloat16) and flat.is_contiguous() else None)
    if blocksize is None:
        if absmax_in is not None:
            absmax = absmax_in.to(device=dev, dtype=torch.float32).reshape(())
        elif not n:
            absmax = torch.zeros((), dtype=torch.float32, device=dev)
        elif abuf is not None:
            absmax = _absmax_rows_bits(flat.view(1, -1), abuf).view(())
        else:
            absmax = _absmax_all(flat)
    else:
        absmax = torch.empty(plan_blocks(n, blocksize).n_blocks, dtype=torch.float32, device=dev)
    if n == 0:
        vals = torch.empty(0, dtype=out_dtype, device=dev) if out_dtype is not None else None
        codes = torch.empty(0, dtype=torch.uint8, device=dev) if want_codes else None
        return vals, codes, absmax

    if compiling:  # functional: inductor fuses, no chunk loop in the graph
        vparts, cparts, aparts = [], [], []
        if blocksize is None:
            fin, qs, ds = (t.view(1, 1) for t in _scales(absmax, spec, scale))
            v, c = _kernel(flat.view(1, n), qs, ds, fin, spec, tabs, None, out_dtype, want_codes)
            vparts.append(v), cparts.append(c)
        else:
            for _, start, rows, cols in _pieces_blockwise(n, blocksize, False):
                xc = flat[start:start + rows * cols].view(rows, cols)
                am = _absmax_rows(xc)
                fin, qs, ds = _scales(am, spec, scale)
                v, c = _kernel(xc, qs[:, None], ds[:, None], fin[:, None], spec, tabs, None,
                               out_dtype, want_codes)
                vparts.append(v), cparts.append(c), aparts.append(am)
            absmax = torch.cat(aparts)
        vals = torch.cat([v.reshape(-1) for v in vparts]) if out_dtype is not None else None
        codes = torch.cat([c.reshape(-1) for c in cparts]) if want_codes else None
        return vals, codes, absmax

    vals = torch.empty(n, dtype=out_dtype, device=dev) if out_dtype is not None else None
    codes = torch.empty(n, dtype=torch.uint8, device=dev) if want_codes else None
    if blocksize is None:
        fin, qs, ds = (t.view(1, 1) for t in _scales(absmax, spec, scale))
        for start, size in _pieces_global(n, chunked):
            xc = flat[start:start + size].view(1, size)
            vout = vals[start:start + size].view(1, size) if vals is not None else None
            _, c = _kernel(xc, qs, ds, fin, spec, tabs, vout, out_dtype, want_codes, scratch,
                           scale)
            if c is not None:
                codes[start:start + size].view(1, size).copy_(c)
    else:
        # all scales first (one amax + one amin pass, a few (n_blocks,) ops), so the
        # chunk loop below is elementwise only
        nfull = n // blocksize
        rows_absmax = _absmax_rows if abuf is None else (lambda t: _absmax_rows_bits(t, abuf))
        if nfull:
            absmax[:nfull] = rows_absmax(flat[:nfull * blocksize].view(nfull, blocksize))
        if n > nfull * blocksize:
            absmax[nfull:] = rows_absmax(flat[nfull * blocksize:].view(1, -1))
        fin, qs, ds = (t[:, None] for t in _scales(absmax, spec, scale))
        for r0, start, rows, cols in _pieces_blockwise(n, blocksize, chunked):
            size = rows * cols
            xc = flat[start:start + size].view(rows, cols)
            vout = vals[start:start + size].view(rows, cols) if vals is not None else None
            _, c = _kernel(xc, qs[r0:r0 + rows], ds[r0:r0 + rows], fin[r0:r0 + rows], spec, tabs,
                           vout, out_dtype, want_codes, scratch, scale)
            if c is not None:
                codes[start:start + size].view(rows, cols).copy_(c)
    return vals, codes, absmax


def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, spec: QuantSpec,
                tabs: CodebookTensors | None, blocksize: int | None,
                dtype: torch.dtype, scale: str = "fp32") -> torch.Tensor:
    """§4: ``fl(value[code] * dscale)`` per group, cast once to ``dtype``."""
    flat = codes.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if (dtype in _KERNEL_DTYPES and scale in _fp8q.SCALE_RULE_CODES
            and _kernel_ok(flat, None, (torch.uint8,))):
        am = absmax.reshape(-1).to(torch.float32)                   # any codebook
        if not torch.compiler.is_compiling():
            return _dequantize_impl(flat, am, spec.codebook, blocksize, dtype,
                                    scale).view(codes.shape)
        if spec.by_name:
            return _dequantize_op(flat, am, spec.codebook.name, blocksize or 0, dtype,
                                  scale).view(codes.shape)
    _, _, dscale = _scales(absmax.reshape(-1), spec, scale)
    if blocksize is None:
        y = _decode_scaled(flat, spec, tabs, dscale, scale)
    else:
        nfull = n // blocksize
        parts = []
        if nfull:
            parts.append(_decode_scaled(flat[:nfull * blocksize].view(nfull, blocksize), spec, tabs,
                                        dscale[:nfull, None], scale).view(-1))
        if n > nfull * blocksize:
            parts.append(_decode_scaled(flat[nfull * blocksize:], spec, tabs, dscale[nfull], scale))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y.to(dtype).view(codes.shape)


def _dequantize_impl(codes: torch.Tensor, absmax: torch.Tensor, codebook, blocksize: int | None,
                     dtype: torch.dtype, scale: str = "fp32") -> torch.Tensor:
    """:func:`_dequantize` of flat CPU ``codes`` through the C kernel (any codebook)."""
    how = ("flat", blocksize) if blocksize else ("global",)
    return _kernel_dequantize(codes.reshape(1, -1).contiguous(), absmax.contiguous(), codebook,
                              how, scale, dtype)


@torch.library.custom_op("fp8core::dequantize", mutates_args=(), device_types="cpu")
def _dequantize_op(codes: torch.Tensor, absmax: torch.Tensor, fmt: str, blocksize: int,
                   dtype: torch.dtype, scale: str) -> torch.Tensor:
    """The C kernel's dequantize as a torch op (for torch.compile); ``blocksize=0`` is global."""
    return _dequantize_impl(codes, absmax, fp8core.resolve_codebook(fmt), blocksize or None, dtype,
                            scale)


@_dequantize_op.register_fake
def _(codes, absmax, fmt, blocksize, dtype, scale):
    return codes.new_empty(codes.numel(), dtype=dtype)


def _decode_scaled(codes: torch.Tensor, spec: QuantSpec, tabs: CodebookTensors | None,
                   dscale: torch.Tensor, scale: str = "fp32") -> torch.Tensor:
    """float32 ``fl(value[code] * dscale)`` (``dscale`` broadcasts against ``codes``).
    Eager, torch formats: through :func:`_decode_cast_into_` (torch's e4m3 -> float32
    cast is scalar code on CPU)."""
    if spec.torch_dtype is None or torch.compiler.is_compiling():
        return _decode(codes, spec, tabs) * dscale
    v = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    ds = _decode_cast_into_(v, codes.view(spec.torch_dtype), spec, dscale, fold=scale == "fp32")
    return v.mul_(ds)


# ------------------------------------------------------------ tiles (§9.3)
def _absmax_tiles(x4: torch.Tensor) -> torch.Tensor:
    """§3.2 per tile of a ``(gr, th, gc, tw)`` view: NaN-propagating max |x| -> (gr, gc)."""
    a = torch.maximum(torch.amax(x4, dim=(1, 3)), torch.amin(x4, dim=(1, 3)).neg())
    a = a.to(torch.float32)
    a = torch.where(a < _F32_SMALLEST_NORMAL, 0.0, a)
    return a.masked_fill(torch.isnan(a), float("nan"))


def _tiled(x: torch.Tensor, plan) -> torch.Tensor:
    """``(rows, cols)`` -> ``(gr, th, gc, tw)``, zero-padded at partial edges only."""
    if plan.pad_rows or plan.pad_cols:
        x = torch.nn.functional.pad(x, (0, plan.pad_cols, 0, plan.pad_rows))
    gr, gc = plan.grid
    return x.contiguous().view(gr, plan.tile_rows, gc, plan.tile_cols)


def _untiled(t: torch.Tensor, plan) -> torch.Tensor:
    return t.reshape(plan.padded_shape)[: plan.rows, : plan.cols]


def _qdq_tiles(p: torch.Tensor, spec: QuantSpec, tabs: CodebookTensors | None, tile_rows: int,
               tile_cols: int, *, out_dtype: torch.dtype | None, want_codes: bool,
               scale: str = "fp32") -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Quantize a row-major ``(R, C)`` tensor (float16/bfloat16/float32) in
    ``tile_rows × tile_cols`` tiles: ``(values (R, C) or None, codes (R, C) or None,
    absmax grid)``, the grid from :func:`fp8core.plan_tiles` (the only tile arithmetic)."""
    p = p.detach()
    plan = plan_tiles(p.shape[0], p.shape[1], tile_rows, tile_cols)
    if plan.n_groups == 0:
        return (p.new_empty(p.shape, dtype=out_dtype) if out_dtype is not None else None,
                p.new_empty(p.shape, dtype=torch.uint8) if want_codes else None,
                p.new_zeros(plan.grid, dtype=torch.float32))
    if scale in _fp8q.SCALE_RULE_CODES and _kernel_ok(p, spec):
        return _qdq_tiles_kernel(p, spec, tile_rows, tile_cols, out_dtype=out_dtype,
                                 want_codes=want_codes, scale=scale)
    x4 = _tiled(p, plan)
    absmax = _absmax_tiles(x4)
    gr, gc = plan.grid
    fin, qs, ds = (t.view(gr, 1, gc, 1) for t in _scales(absmax, spec, scale))
    if scale in fp8core.nvfp4.ENGINE_RULES:                  # §13.5: e2m1 by compares
        c = _tnv.engine_quantize(x4.to(torch.float32), qs, fin)
        v = _tnv.engine_decode(c, ds, out_dtype) if out_dtype is not None else None
        c = c if want_codes else None
    else:
        v, c = _kernel(x4, qs, ds, fin, spec, tabs, None, out_dtype, want_codes)
    return (None if v is None else _untiled(v, plan)), (None if c is None else _untiled(c, plan)), absmax


def _qdq_tiles_kernel(p, spec, tile_rows, tile_cols, *, out_dtype, want_codes, scale):
    if out_dtype is not None and out_dtype not in _KERNEL_DTYPES:
        v, c, a = _qdq_tiles_kernel(p, spec, tile_rows, tile_cols, out_dtype=torch.float32,
                                    want_codes=want_codes, scale=scale)
        return v.to(out_dtype), c, a
    if torch.compiler.is_compiling():
        v, c, a = _quantize_tiles_op(p, spec.codebook.name, tile_rows, tile_cols, scale,
                                     out_dtype or torch.float32, out_dtype is not None, want_codes)
    else:
        v, c, a = _quantize_tiles_impl(p, spec.codebook, tile_rows, tile_cols, scale, out_dtype,
                                       want_codes)
    shape = p.shape
    return (v.view(shape) if out_dtype is not None else None), (c.view(shape) if want_codes else None), a


def _quantize_tiles_impl(p: torch.Tensor, codebook, tile_rows: int, tile_cols: int, scale: str,
                         out_dtype: torch.dtype | None, want_codes: bool):
    v, c, a = _kernel_quantize(p.contiguous(), codebook, ("tiles", tile_rows, tile_cols), scale,
                               out_dtype, want_codes)
    return _or_empty(v, out_dtype or torch.float32), _or_empty(c, torch.uint8), a


@torch.library.custom_op("fp8core::quantize_tiles", mutates_args=(), device_types="cpu")
def _quantize_tiles_op(p: torch.Tensor, fmt: str, tile_rows: int, tile_cols: int, scale: str,
                       out_dtype: torch.dtype, want_vals: bool, want_codes: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C kernel's tile quantizer as a torch op (for torch.compile); flat outputs."""
    return _quantize_tiles_impl(p, fp8core.resolve_codebook(fmt), tile_rows, tile_cols, scale,
                                out_dtype if want_vals else None, want_codes)


@_quantize_tiles_op.register_fake
def _(p, fmt, tile_rows, tile_cols, scale, out_dtype, want_vals, want_codes):
    n = p.numel()
    plan = plan_tiles(p.shape[0], p.shape[1], tile_rows, tile_cols)
    return (p.new_empty(n if want_vals else 0, dtype=out_dtype),
            p.new_empty(n if want_codes else 0, dtype=torch.uint8),
            p.new_empty(plan.grid, dtype=torch.float32))


def _dequantize_tiles(codes: torch.Tensor, absmax: torch.Tensor, spec: QuantSpec,
                      tabs: CodebookTensors | None, tile_rows: int, tile_cols: int,
                      dtype: torch.dtype, scale: str = "fp32") -> torch.Tensor:
    """§4 per tile of a row-major ``(R, C)`` code tensor, cast once to ``dtype``."""
    plan = plan_tiles(codes.shape[0], codes.shape[1], tile_rows, tile_cols)
    if plan.n_groups == 0:
        return codes.new_empty(codes.shape, dtype=dtype)
    if (dtype in _KERNEL_DTYPES and scale in _fp8q.SCALE_RULE_CODES
            and _kernel_ok(codes, None, (torch.uint8,))):
        if not torch.compiler.is_compiling():
            return _dequantize_tiles_impl(codes, absmax, spec.codebook, tile_rows, tile_cols,
                                          dtype, scale)
        if spec.by_name:
            return _dequantize_tiles_op(codes, absmax, spec.codebook.name, tile_rows, tile_cols,
                                        dtype, scale)
    gr, gc = plan.grid
    _, _, dscale = _scales(absmax.reshape(gr, gc), spec, scale)
    if scale in fp8core.nvfp4.ENGINE_RULES:                  # §13.5: canonical NaN
        return _untiled(_tnv.engine_decode(_tiled(codes, plan), dscale.view(gr, 1, gc, 1), dtype),
                        plan)
    y = _decode(_tiled(codes, plan), spec, tabs) * dscale.view(gr, 1, gc, 1)
    return _untiled(y, plan).to(dtype)


def _dequantize_tiles_impl(codes, absmax, codebook, tile_rows, tile_cols, dtype, scale):
    codes = codes.contiguous()
    return _kernel_dequantize(codes, absmax.contiguous().to(torch.float32), codebook,
                              ("tiles", tile_rows, tile_cols), scale, dtype).view(codes.shape)


@torch.library.custom_op("fp8core::dequantize_tiles", mutates_args=(), device_types="cpu")
def _dequantize_tiles_op(codes: torch.Tensor, absmax: torch.Tensor, fmt: str, tile_rows: int,
                         tile_cols: int, dtype: torch.dtype, scale: str) -> torch.Tensor:
    return _dequantize_tiles_impl(codes, absmax, fp8core.resolve_codebook(fmt), tile_rows,
                                  tile_cols, dtype, scale)


@_dequantize_tiles_op.register_fake
def _(codes, absmax, fmt, tile_rows, tile_cols, dtype, scale):
    return codes.new_empty(codes.shape, dtype=dtype)


# ------------------------------------------------------- GEMM operands (§9)
class QuantizedOperand(NamedTuple):
    """An operand as the backward keeps it: uint8 codes and absmax in the *physical*
    layout they were computed in, and how to decode them.

    ``how``: ``("global",)``, ``("flat", blocksize)`` or ``("tiles", tile_rows, tile_cols)``
    (physical tile); ``transposed``: the logical operand is ``codes.t()``."""

    codes: torch.Tensor
    absmax: torch.Tensor
    how: tuple
    transposed: bool


def _operand(m: torch.Tensor, rule, spec: QuantSpec, tabs: CodebookTensors | None, *,
             out_dtype: torch.dtype | None, want_codes: bool, absmax: torch.Tensor | None = None,
             kernel: bool = True, sr: tuple | None = None
             ) -> tuple[torch.Tensor | None, QuantizedOperand | None]:
    """Quantize the GEMM operand ``m`` (2-D, contraction axis last) under ``rule``.

    Returns (dequantized values shaped like ``m`` in ``out_dtype`` or None, the
    :class:`QuantizedOperand` when ``want_codes``). A transposed-contiguous ``m`` (a
    backward GEMM contracting over a row-major tensor's rows) is quantized in its
    memory layout with transposed tiles: no transposed copy of the data. Flat blocks
    follow the logical row-major order (bitsandbytes), so they need ``m`` contiguous.
    ``absmax``: a 0-d float32 amax for a ``tensor()`` rule instead of ``m``'s own (§10.2,
    the recipe's ``amax_reduction``). ``kernel=False``: the torch ops even where the C
    kernel could run. A stochastic rule is rejected here: it needs a seed
    (:func:`quantize_operand`). ``sr``: ``(seed, stream, sr_bits, transposed)`` (ints;
    ``transposed``: ``m`` is the transpose of the quantizer's input) — the nearest
    ``rule``'s groups and scales with §14's stochastic rounding on the C kernel, codes
    only; ``(None, None)`` when the kernel cannot take ``m`` (the caller rounds on torch
    ops)."""
    if rule.is_stochastic:
        raise ValueError(f"rule {rule} rounds stochastically: quantize it with "
                         f"quantize_operand(x, rule, seed=...) (or matmul_fp8(..., seed=))")
    rows, cols = m.shape
    plan = plan_operand(rows, cols, rule.granularity)
    x = _upcast(m)
    if plan.kind == "flat":
        phys, transposed, how = x.contiguous(), False, ("flat", plan.flat.blocksize)
    else:
        transposed = not x.is_contiguous() and x.t().is_contiguous()
        phys = x.t() if transposed else x.contiguous()
        if plan.is_global:
            how = ("global",)
        else:
            th, tw = plan.tiles.tile_rows, plan.tiles.tile_cols
            how = ("tiles", tw, th) if transposed else ("tiles", th, tw)
    use_kernel = (kernel and phys.numel() and (out_dtype is None or out_dtype in _KERNEL_DTYPES)
                  and not torch.compiler.is_compiling() and rule.scale in _fp8q.SCALE_RULE_CODES
                  and _kernel_ok(phys, spec))
    if sr is not None:
        if not use_kernel:
            return None, None
        c, a = _kernel_quantize_sr(phys, spec.codebook, how, rule.scale, sr, transposed, absmax)
        return None, QuantizedOperand(c.view(phys.shape), a, how, transposed)
    if use_kernel:
        # eager CPU: straight to the kernel (the generic wrappers cost ~2x the call itself
        # on small operands)
        v, c, a = _kernel_quantize(phys, spec.codebook, how, rule.scale, out_dtype, want_codes,
                                   absmax)
    elif how[0] == "tiles":
        v, c, a = _qdq_tiles(phys, spec, tabs, how[1], how[2], out_dtype=out_dtype,
                             want_codes=want_codes, scale=rule.scale)
    else:
        v, c, a = _qdq(phys, spec, tabs, how[1] if how[0] == "flat" else None,
                       out_dtype=out_dtype, want_codes=want_codes, scale=rule.scale,
                       absmax_in=absmax)
    if v is not None:
        v = v.view(phys.shape)
        v = v.t() if transposed else v
    q = QuantizedOperand(c.view(phys.shape), a, how, transposed) if want_codes else None
    return v, q


_DT_CODES = {getattr(torch, name): code for name, code in _fp8q.DTYPE_CODES.items()}


@functools.lru_cache(maxsize=4096)
def _eager_call(rows: int, cols: int, how: tuple) -> tuple:
    """(absmax shape, entry point name, its size arguments) of one operand's kernel call."""
    if how[0] == "tiles":
        return plan_tiles(rows, cols, how[1], how[2]).grid, "tiles", (rows, cols, how[1], how[2])
    n = rows * cols
    group = how[1] if how[0] == "flat" else n
    return ((plan_blocks(n, group).n_blocks,) if how[0] == "flat" else ()), "flat", (n, group)


def _kernel_quantize(phys: torch.Tensor, codebook, how: tuple, scale: str,
                     out_dtype: torch.dtype | None, want_codes: bool,
                     absmax_in: torch.Tensor | None = None):
    """One kernel call for a contiguous CPU 2-D ``phys`` quantized as ``how`` (a
    :class:`QuantizedOperand` layout), with the least Python around it (on a 32 x 64
    operand the keyword wrappers of :mod:`fp8core._kernel` cost more than the kernel).
    Returns (values or None, codes or None, absmax), flat outputs. Every eager and
    custom-op kernel quantization goes through here. ``absmax_in``: a given 0-d float32
    amax for ``how == ("global",)`` (``fp8q_quantize_given``), returned as the absmax."""
    rows, cols = phys.shape
    n = rows * cols
    grid, entry, sizes = _eager_call(rows, cols, how)
    vals = _pool.empty(n, out_dtype) if out_dtype is not None else None
    codes = _pool.empty(n, torch.uint8) if want_codes else None
    fmt = _fp8q._format_for(codebook, scale)
    if absmax_in is not None:   # fp8q_quantize_given: (n) in place of the sizes, absmax read
        absmax = absmax_in.to(torch.float32).contiguous().reshape(())
        entry, sizes, what = "quantize_given", (n,), "given absmax"
    else:
        absmax = torch.empty(grid, dtype=torch.float32)
        entry, what = ("quantize_tiles" if entry == "tiles" else "quantize"), how
    rc = _fp8q.call(entry, phys.data_ptr(), _DT_CODES[phys.dtype], *sizes, ctypes.byref(fmt),
                    None if codes is None else codes.data_ptr(),
                    None if vals is None else vals.data_ptr(),
                    _DT_CODES[out_dtype or torch.float32], absmax.data_ptr(),
                    torch.get_num_threads(), 1)
    if rc:
        raise ValueError(f"the C kernel rejected an operand of shape ({rows}, {cols}) "
                         f"({phys.dtype}, {what}, {codebook.name}, scale={scale})")
    return vals, codes, absmax


def _kernel_quantize_sr(phys: torch.Tensor, codebook, how: tuple, scale: str, sr: tuple,
                        phys_transposed: bool, absmax_in: torch.Tensor | None = None):
    """:func:`_kernel_quantize` with §14 stochastic rounding (``fp8q_quantize_sr`` /
    ``_given_sr`` / ``_tiles_sr``): (flat codes, absmax). ``sr = (seed, stream, sr_bits,
    transposed)``; ``phys`` is the transpose of the quantizer's input when exactly one of
    ``transposed`` and ``phys_transposed`` holds (the kernel then maps each element's
    position to its row-major index in the input)."""
    rows, cols = phys.shape
    n = rows * cols
    seed, stream, sr_bits, transposed = sr
    grid, entry, sizes = _eager_call(rows, cols, how)
    codes = _pool.empty(n, torch.uint8)
    fmt = _fp8q._format_for(codebook, scale)
    args = _fp8q.sr_args(seed, stream, sr_bits, rows, cols, transposed != phys_transposed)
    if absmax_in is not None:
        absmax = absmax_in.to(torch.float32).contiguous().reshape(())
        entry, sizes = "quantize_given_sr", (n,)
    else:
        absmax = torch.empty(grid, dtype=torch.float32)
        entry = "quantize_tiles_sr" if entry == "tiles" else "quantize_sr"
    rc = _fp8q.call(entry, phys.data_ptr(), _DT_CODES[phys.dtype], *sizes, ctypes.byref(fmt),
                    ctypes.byref(args), codes.data_ptr(), absmax.data_ptr(),
                    torch.get_num_threads(), 1)
    if rc:
        raise ValueError(f"the C kernel rejected a stochastic operand of shape ({rows}, {cols}) "
                         f"({phys.dtype}, {how}, {codebook.name}, scale={scale})")
    return codes, absmax


def _kernel_dequantize(codes: torch.Tensor, absmax: torch.Tensor, codebook, how: tuple,
                       scale: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse kernel call of :func:`_kernel_quantize` (contiguous 2-D uint8 ``codes``
    and contiguous float32 ``absmax``, any codebook); flat values."""
    rows, cols = codes.shape
    _, entry, sizes = _eager_call(rows, cols, how)
    y = _pool.empty(rows * cols, dtype)
    fmt = _fp8q._format_for(codebook, scale)
    rc = _fp8q.call("dequantize_tiles" if entry == "tiles" else "dequantize",
                    codes.data_ptr(), *sizes, absmax.data_ptr(),
                    _fp8q._table(codebook).ctypes.data, ctypes.byref(fmt), y.data_ptr(),
                    _DT_CODES[dtype], torch.get_num_threads(), 1)
    if rc:
        raise ValueError(f"the C kernel rejected codes of shape ({rows}, {cols}) ({how})")
    return y


def _decode_operand(q: QuantizedOperand, rule, spec: QuantSpec, tabs: CodebookTensors | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The logical dequantized operand of :func:`_operand`'s codes (same bits as its values);
    ``how = ("values",)``: a stochastic slot's saved values (matmul's _side_stochastic)."""
    if q.how[0] == "values":
        return q.codes if q.codes.dtype == dtype else q.codes.to(dtype)
    if (dtype in _DT_CODES and q.codes.numel() and not torch.compiler.is_compiling()
            and q.codes.is_contiguous() and q.absmax.dtype == torch.float32
            and q.absmax.is_contiguous() and q.absmax.device.type == "cpu"
            and rule.scale in _fp8q.SCALE_RULE_CODES
            and _kernel_ok(q.codes, None, (torch.uint8,))):
        y = _kernel_dequantize(q.codes, q.absmax, spec.codebook, q.how, rule.scale,
                               dtype).view(q.codes.shape)
        return y.t() if q.transposed else y
    if q.how[0] == "tiles":
        y = _dequantize_tiles(q.codes, q.absmax, spec, tabs, q.how[1], q.how[2], dtype, rule.scale)
    else:
        y = _dequantize(q.codes, q.absmax, spec, tabs, q.how[1] if q.how[0] == "flat" else None,
                        dtype, rule.scale).view(q.codes.shape)
    return y.t() if q.transposed else y


def _logical(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, bool]:
    rows, cols, transposed = operand_matrix(tuple(x.shape), axis)
    return (x.t() if transposed else x.reshape(rows, cols)), transposed


# ------------------------------------------------------ §14: stochastic rounding
_MASK32 = 0xFFFFFFFF


def _mul32(v: torch.Tensor, c: int) -> torch.Tensor:
    """``v * c mod 2**32`` for int64 ``v`` holding uint32 values: two 16-bit halves of
    ``c``, so no product leaves int64's range."""
    lo = v * (c & 0xFFFF)
    hi = torch.bitwise_and(v * (c >> 16), 0xFFFF)
    return torch.bitwise_and(lo + torch.bitwise_left_shift(hi, 16), _MASK32)


def _mix32(v: torch.Tensor) -> torch.Tensor:
    """:func:`fp8core.random.mix32` on int64 tensors holding uint32 values (the shifts of
    non-negative values are logical)."""
    v = v ^ (v >> 16)
    v = _mul32(v, fp8core.random.MIX_MUL1)
    v = v ^ (v >> 15)
    v = _mul32(v, fp8core.random.MIX_MUL2)
    return v ^ (v >> 16)


def _key_tensor(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """A validated seed / stream as a 0-d int64 tensor holding its uint32 value."""
    if isinstance(value, torch.Tensor):
        fp8core.random.check_key_array(str(value.dtype).replace("torch.", ""),
                                       tuple(value.shape), name)
        return torch.bitwise_and(value.to(device=device, dtype=torch.int64), _MASK32)
    if name == "seed":
        value = fp8core.random.check_seed(value)
    else:
        value = fp8core.random.check_stream(value)
    return torch.tensor(value, dtype=torch.int64, device=device)


def random_bits(shape: tuple[int, ...], seed: Any, stream: Any = 0, r: int = 8, *,
                device: Any = "cpu") -> torch.Tensor:
    """:func:`fp8core.random.random_bits` computed with torch ops (int64 tensor of values
    in ``[0, 2**r)``); ``seed`` / ``stream`` ints or 0-d integer tensors."""
    r = fp8core.random.check_sr_bits(r, "r")
    device = torch.device(device)
    seed_t, stream_t = _key_tensor(seed, "seed", device), _key_tensor(stream, "stream", device)
    n = 1
    for d in shape:
        n *= int(d)
    fp8core.random.check_elements(n)
    k1 = _mix32(seed_t ^ fp8core.random.SEED_SALT)
    k2 = _mix32(k1 ^ stream_t ^ fp8core.random.STREAM_SALT)
    i = torch.arange(n, dtype=torch.int64, device=device)
    return (_mix32(_mix32(i ^ k1) ^ k2) >> (32 - r)).reshape(shape)


def _expand_to_elements(per_group: torch.Tensor, plan) -> torch.Tensor:
    """fp8core.reference.expand_to_elements: a per-group tensor over (rows, cols)."""
    rows, cols = plan.rows, plan.cols
    if plan.kind == "flat":
        b = plan.flat.blocksize
        return per_group.reshape(-1).repeat_interleave(b)[: rows * cols].reshape(rows, cols)
    t = plan.tiles
    g = per_group.reshape(t.grid)
    return g.repeat_interleave(t.tile_rows, 0).repeat_interleave(t.tile_cols, 1)[:rows, :cols]


def _stochastic_codes(s: torch.Tensor, rand: torch.Tensor, spec: QuantSpec, sr_bits: int,
                      toward_zero: torch.Tensor) -> torch.Tensor:
    """fp8core.reference.stochastic_round_to_codes with int32 views of the float32 bits."""
    fmt = spec.codebook.format
    mbits = int(fmt.mantissa_bits)
    emin = int(np.log2(fmt.smallest_normal))
    b = s.contiguous().view(torch.int32)
    magbits = torch.bitwise_and(b, 0x7FFFFFFF)
    e_eff = (torch.bitwise_right_shift(magbits, 23) - 127).clamp(min=emin)
    inv_q = torch.bitwise_left_shift(mbits - e_eff + 127, 23).view(torch.float32)
    frac = magbits.view(torch.float32) * inv_q
    n = torch.floor(frac)
    d = (frac - n) * float(2 ** sr_bits)
    up = (torch.round(d) + rand.to(torch.float32)) >= float(2 ** sr_bits)
    up = up & ~toward_zero
    magcode = torch.bitwise_left_shift(e_eff - emin, mbits) + n.to(torch.int32) + up.to(torch.int32)
    negative = b < 0
    if not fmt.has_negative_zero:
        negative = negative & (magcode != 0)
    codes = torch.where(negative, magcode | (1 << (fmt.total_bits - 1)), magcode)
    return codes.to(torch.uint8)


def _quantize_operand_sr(x: torch.Tensor, rule, axis: int, absmax: torch.Tensor | None,
                         seed: Any, stream: Any, spec: QuantSpec | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """§14: the nearest rule's absmax and scales, each element scaled and saturated
    (§3.4) and rounded with the random bits of its row-major index in ``x`` — in the C
    kernel's loop on CPU where it is loaded (:func:`_kernel_quantize_sr`), else on torch
    ops. Not differentiable: ``x`` is detached."""
    x = x.detach()
    seed_t = _key_tensor(seed, "seed", x.device)
    stream_t = _key_tensor(stream, "stream", x.device)
    nearest = fp8core.recipe.nearest_rule(rule)
    m, transposed = _logical(x, axis)
    spec = resolve_spec(rule.format) if spec is None else spec   # (the matmul passes its own:
    plan = plan_operand(m.shape[0], m.shape[1], rule.granularity)  # traced code resolves none)
    q = None
    if x.device.type == "cpu" and x.numel() and _fp8q.available() \
            and not torch.compiler.is_compiling():
        sr = (int(seed_t), int(stream_t), rule.sr_bits, transposed)
        _, q = _operand(m, nearest, spec, None, out_dtype=None, want_codes=True, absmax=absmax,
                        sr=sr)
    if q is not None:                    # the kernel rounded: codes in q's physical layout
        a = q.absmax.t() if (q.transposed and q.how[0] == "tiles") else q.absmax
        codes = q.codes.t() if q.transposed else q.codes                  # logical
        codes = codes.t() if transposed else codes.reshape(x.shape)
        return codes.contiguous(), a.reshape(plan.scale_shape).contiguous()
    rand = random_bits(tuple(x.shape), seed_t, stream_t, rule.sr_bits, device=x.device)
    _, q = _operand(m, nearest, spec, _tables(spec, x.device), out_dtype=None, want_codes=True,
                    absmax=absmax, kernel=False)
    absmax = q.absmax.t() if (q.transposed and q.how[0] == "tiles") else q.absmax
    absmax = absmax.reshape(plan.scale_shape).contiguous()
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device), absmax
    rm = rand.t() if transposed else rand.reshape(m.shape)
    finite, qscale, _ = _scales(_expand_to_elements(absmax, plan).reshape(-1), spec, rule.scale)
    x32 = m.to(torch.float32).reshape(-1)
    s = torch.mul(x32, qscale).clamp_(-spec.max, spec.max)                # §3.4
    s = torch.where(finite, s, 0.0)
    tiny = ~(x32.abs() >= _F32_SMALLEST_NORMAL)
    codes = _stochastic_codes(s, rm.reshape(-1), spec, rule.sr_bits, tiny)
    codes = codes.masked_fill_(~finite, spec.fill_code).reshape(m.shape)
    codes = codes.t() if transposed else codes.reshape(x.shape)
    return codes.contiguous(), absmax


def _check_nearest_keys(seed: Any, stream: Any) -> None:
    if not isinstance(seed, torch.Tensor):
        fp8core.random.check_seed(seed, required=False)
    if not isinstance(stream, torch.Tensor):
        fp8core.random.check_stream(stream)


def quantize_operand(x: torch.Tensor, rule: Any, *, axis: int = -1,
                     absmax: torch.Tensor | None = None, seed: Any = None, stream: Any = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a GEMM operand under an :class:`fp8core.recipe.OperandRule` (§9).

    Args:
      x: float tensor; ``axis`` is its contraction axis (the last, or 0 of a 2-D tensor).
      rule: element format, granularity and scale rule.
      absmax: for a ``tensor()`` rule, a float32 amax tensor (0-d or ``(1, 1)``) to scale by
        instead of ``x``'s own (§10.2: e.g. the all-reduced max of every rank's absmax);
        returned as given.
      seed, stream: ints in ``[0, 2**32)`` (or 0-d integer tensors) keying the random
        bits of a ``rounding="stochastic"`` rule (§14, ``seed`` required there). Stochastic
        rounding runs in the C kernel on CPU where it is loaded, on torch ops elsewhere.

    Returns:
      ``(codes, absmax)``: uint8 codes shaped like ``x``; float32 absmax of shape
      ``fp8core.plan_operand(rows, cols, rule.granularity).scale_shape`` in the operand's
      orientation. Bit-identical to :func:`fp8core.reference.quantize_operand`.

    Raises:
      TypeError: ``x`` not a real floating tensor, ``rule`` not an OperandRule.
      ValueError: ``axis`` not the last axis or 0 of a 2-D tensor.
    """
    check_float_tensor(x, "x")
    rule = fp8core.recipe.check_rule(rule)
    if absmax is not None:
        if not isinstance(absmax, torch.Tensor):
            raise TypeError(f"absmax must be a float32 tensor, got {type(absmax).__name__}")
        _validation.check_given_absmax(rule, dtype_name(absmax.dtype), tuple(absmax.shape))
    if rule.is_stochastic:
        return _quantize_operand_sr(x, rule, axis, absmax, seed, stream)
    _check_nearest_keys(seed, stream)
    m, transposed = _logical(x, axis)
    spec = resolve_spec(rule.format)
    _, q = _operand(m, rule, spec, _tables(spec, x.device), out_dtype=None, want_codes=True,
                    absmax=absmax)
    plan = plan_operand(m.shape[0], m.shape[1], rule.granularity)
    absmax = q.absmax.t() if (q.transposed and q.how[0] == "tiles") else q.absmax
    codes = q.codes.t() if q.transposed else q.codes                  # logical
    codes = codes.t() if transposed else codes.reshape(x.shape)
    return codes.contiguous(), absmax.reshape(plan.scale_shape).contiguous()


def dequantize_operand(codes: torch.Tensor, absmax: torch.Tensor, rule: Any, *, axis: int = -1,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_operand`: ``fl(value[code] * dscale)`` per group, cast
    once to ``dtype``."""
    _check_codes(codes)
    rule = fp8core.recipe.check_rule(rule)
    dtype = _check_out_dtype(dtype)
    m, transposed = _logical(codes, axis)
    plan = plan_operand(m.shape[0], m.shape[1], rule.granularity)
    _check_absmax_tensor(absmax, plan.scale_shape)
    spec = resolve_spec(rule.format)
    return _dequantize_logical(codes, absmax, rule, axis, dtype, spec, _tables(spec, codes.device))


def _dequantize_logical(codes, absmax, rule, axis: int, dtype: torch.dtype, spec: QuantSpec,
                        tabs: CodebookTensors | None) -> torch.Tensor:
    """:func:`dequantize_operand` after its checks, with the spec and tables given."""
    m, transposed = _logical(codes, axis)
    plan = plan_operand(m.shape[0], m.shape[1], rule.granularity)
    if plan.kind == "flat":
        q = QuantizedOperand(m.contiguous(), absmax, ("flat", plan.flat.blocksize), False)
    elif plan.is_global:
        q = QuantizedOperand(m.contiguous(), absmax.reshape(()), ("global",), False)
    else:
        t = plan.tiles
        q = QuantizedOperand(m.contiguous(), absmax, ("tiles", t.tile_rows, t.tile_cols), False)
    y = _decode_operand(q, rule, spec, tabs, dtype)
    return (y.t() if transposed else y.reshape(codes.shape)).contiguous()


def fake_quantize_operand(x: torch.Tensor, rule: Any, *, axis: int = -1, seed: Any = None,
                          stream: Any = 0) -> torch.Tensor:
    """``dequantize_operand(quantize_operand(x))`` in ``x``'s dtype, fused (codes are not
    materialized; a stochastic rule materializes them). Not differentiable (detached),
    like :func:`fake_quantize`."""
    check_float_tensor(x, "x")
    rule = fp8core.recipe.check_rule(rule)
    if rule.is_stochastic:
        codes, absmax = quantize_operand(x.detach(), rule, axis=axis, seed=seed, stream=stream)
        return dequantize_operand(codes, absmax, rule, axis=axis, dtype=x.dtype)
    _check_nearest_keys(seed, stream)
    m, transposed = _logical(x, axis)
    spec = resolve_spec(rule.format)
    v, _ = _operand(m, rule, spec, _tables(spec, x.device), out_dtype=x.dtype, want_codes=False)
    return (v.t() if transposed else v.reshape(x.shape)).contiguous()


def quantize_mx(x: torch.Tensor, element_format: Any, *, block_size: int = 32, axis: int = -1,
                scale_mode: str = "floor", rounding: str = "nearest", seed: Any = None,
                stream: Any = 0, sr_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX quantization (docs/numerics.md §11) as :func:`fp8core.quantize_mx`: uint8
    element codes shaped like ``x`` and uint8 e8m0 scale bytes, one per ``block_size``
    elements along ``axis`` (the last, or 0 of a 2-D tensor). Bit-identical to the
    reference (and so to torchao's ``to_mx``, codes unpacked). Not differentiable.
    ``rounding="stochastic"``: elements rounded as §14 (``seed`` required)."""
    check_float_tensor(x, "x")
    rule = fp8core.recipe.with_rounding(fp8core.mx.mx_rule(element_format, block_size, scale_mode),
                                        rounding, sr_bits)
    codes, absmax = quantize_operand(x, rule, axis=axis, seed=seed, stream=stream)
    spec = resolve_spec(rule.format)
    b = _mx_bytes(absmax, spec, fp8core.mx.mode_of(rule.scale))
    if x.dim() == 2 and axis in (0, -2):
        b = b.t()
    else:
        b = b.reshape(*x.shape[:-1], b.shape[-1])
    return codes, b.contiguous()


def dequantize_mx(codes: torch.Tensor, scales: torch.Tensor, element_format: Any, *,
                  block_size: int = 32, axis: int = -1,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_mx` as :func:`fp8core.dequantize_mx`:
    ``fl(value[code] · 2**(scale − 127))`` (NaN for byte 255), cast once to ``dtype``."""
    rule = fp8core.mx.mx_rule(element_format, block_size, "floor")
    _check_codes(codes)
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a uint8 tensor, got {type(scales).__name__}")
    fp8core.mx.check_scales(dtype_name(scales.dtype), tuple(scales.shape), tuple(codes.shape),
                            block_size, axis)
    out = _check_out_dtype(dtype)
    ax = axis % codes.dim()
    b = scales.to(torch.int32)
    s = torch.where(b == fp8core.mx.E8M0_NAN, float("nan"), _pow2((b - 127).clamp(-127, 127)))
    s = s.repeat_interleave(block_size, dim=ax).narrow(ax, 0, codes.shape[ax])
    spec = resolve_spec(rule.format)
    return (_decode(codes, spec, _tables(spec, codes.device)) * s).to(out)


# -------------------------------------------------------------- public helpers
def _tables(spec: QuantSpec, device: torch.device) -> CodebookTensors | None:
    return codebook_tensors(spec.codebook, device) if spec.needs_tables else None


def _check_out_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}: {dtype!r}")
    _validation.check_float_dtype(dtype_name(dtype), argname="dtype")
    return dtype


def _check_codes(codes: Any) -> None:
    check_tensor(codes, "codes")
    _validation.check_codes_dtype(dtype_name(codes.dtype))


def _check_absmax_tensor(absmax: Any, expected: tuple[int, ...]) -> None:
    check_tensor(absmax, "absmax")
    _validation.check_absmax(dtype_name(absmax.dtype), tuple(absmax.shape), expected)


# ------------------------------------------------------------------ public API
def quantize_blockwise(x: torch.Tensor, codebook: Any, blocksize: int, *,
                       rounding: str = "nearest", seed: Any = None, stream: Any = 0,
                       sr_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with one absmax per ``blocksize`` run of the row-major flattening.

    Args:
      x: float16 / bfloat16 / float32 / float64 tensor, any shape, any device.
      codebook: format name or alias (``"e4m3"``), legacy name (``"bnb_e4m3"``),
        :class:`fp8core.Codebook`, or 256 code values (tensor or array).
      blocksize: elements per block; the last block may be partial.
      rounding, seed, stream, sr_bits: ``rounding="stochastic"`` rounds as §14 (native
        formats; ``seed`` required), as :func:`quantize_operand` (the C kernel on CPU).

    Returns:
      ``(codes, absmax)``: uint8 codes shaped like ``x``; float32 absmax of shape
      ``(ceil(x.numel() / blocksize),)``. Bit-identical to
      :func:`fp8core.reference.quantize_blockwise` (see the module docstring).

    Raises:
      TypeError: ``x`` is not a real floating tensor; ``blocksize`` not an int.
      ValueError: ``blocksize <= 0``; unknown format; bad code table.
    """
    check_float_tensor(x, "x")
    spec = resolve_spec(codebook)
    _validation.check_blocksize(blocksize)
    if rounding != "nearest" or sr_bits != 8:
        rule = fp8core.recipe.with_rounding(
            fp8core.recipe.OperandRule(spec.codebook, fp8core.recipe.flat(blocksize)),
            rounding, sr_bits)
        if rule.is_stochastic:
            codes, absmax = quantize_operand(x.reshape(-1), rule, seed=seed, stream=stream)
            return codes.view(x.shape), absmax
    _check_nearest_keys(seed, stream)
    _, codes, absmax = _qdq(_upcast(x), spec, _tables(spec, x.device), blocksize,
                            out_dtype=None, want_codes=True)
    return codes.view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, codebook: Any,
                         blocksize: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``fl(value[code] * dscale)`` cast to ``dtype``.

    Groups whose absmax is NaN or ±inf dequantize to NaN; codes without a value
    decode to NaN. Not differentiable (like every quantizer here): the result carries no
    gradient on any path, even for an ``absmax`` that requires grad.
    """
    _check_codes(codes)
    spec = resolve_spec(codebook)
    plan = plan_blocks(codes.numel(), blocksize)
    _check_absmax_tensor(absmax, (plan.n_blocks,))
    dtype = _check_out_dtype(dtype)
    return _dequantize(codes, absmax.detach(), spec, _tables(spec, codes.device), blocksize, dtype)


def quantize_global(x: torch.Tensor, codebook: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with one absmax for the whole tensor.

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x``, a 0-d float32
    absmax (0 for an empty tensor). Numerics as :func:`quantize_blockwise`.
    """
    check_float_tensor(x, "x")
    spec = resolve_spec(codebook)
    _, codes, absmax = _qdq(_upcast(x), spec, _tables(spec, x.device), None,
                            out_dtype=None, want_codes=True)
    return codes.view(x.shape), absmax


def dequantize_global(codes: torch.Tensor, absmax: torch.Tensor, codebook: Any,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_global` (not differentiable, as :func:`dequantize_blockwise`)."""
    _check_codes(codes)
    spec = resolve_spec(codebook)
    _check_absmax_tensor(absmax, ())
    dtype = _check_out_dtype(dtype)
    return _dequantize(codes, absmax.detach(), spec, _tables(spec, codes.device), None, dtype)


def fake_quantize(x: torch.Tensor, codebook: Any, blocksize: int | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, fused: codes are never materialized.

    ``blocksize=None`` uses one absmax for the tensor; an int quantizes blockwise.
    Bit-identical to :func:`fp8core.reference.fake_quantize`. Not differentiable
    (the matmul functions implement the straight-through gradients).
    """
    check_float_tensor(x, "x")
    spec = resolve_spec(codebook)
    if blocksize is not None:
        _validation.check_blocksize(blocksize)
    return _fake_quantize(x, spec, _tables(spec, x.device), blocksize)


def _fake_quantize(x: torch.Tensor, spec: QuantSpec, tabs: CodebookTensors | None,
                   blocksize: int | None) -> torch.Tensor:
    vals, _, _ = _qdq(_upcast(x), spec, tabs, blocksize, out_dtype=x.dtype, want_codes=False)
    return vals.view(x.shape)


def empty_cache() -> None:
    """Free the idle host buffers the CPU quantizers keep for reuse (see
    :mod:`fp8core_torch._pool`; like ``torch.cuda.empty_cache`` for GPU memory)."""
    _pool.release()
