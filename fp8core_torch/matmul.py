"""bitsandbytes-shaped FP8-simulated matmuls with straight-through gradients.

``matmul_fp8_mixed(A, B, fw_code=None, bw_code=None, out=None, bsz=-1, bsz2=-1)``
and ``matmul_fp8_global(...)`` follow docs/numerics.md §6:

* Mixed:  out = Q_fw^blk(A; bsz) @ Q_fw^glob(B);
          grad_A = Q_bw^blk(g; bsz2) @ Q_fw^glob(B)ᵀ;  grad_B = Aᵀ @ g (full precision).
* Global: out = Q_fw^glob(A) @ Q_fw^glob(B);
          grad_A = Q_bw^glob(g) @ Q_fw^glob(B)ᵀ;  grad_B = Q_fw^glob(A)ᵀ @ Q_bw^glob(g).

Q is :func:`fp8core_torch.fake_quantize` (bit-identical to the reference); the
matmuls accumulate in torch's order and dtype. Output dtype = A's dtype; B is
quantized in its own dtype and then cast to A's dtype; each gradient is returned
in its input's dtype.

Saved for backward: Mixed keeps A (for grad_B) and Q(B) (for grad_A, reused
rather than re-quantized). Global keeps A's uint8 codes + its 0-d absmax instead
of A (1 byte per element instead of 2-4) and Q(B); Q(A) is decoded in backward,
bit-identical to the forward's. Only what the needed gradients use is saved.

Under ``torch.autocast`` the inputs (and bias) are cast to the autocast dtype
first — as ``F.linear`` would — and the quantized matmul runs in that dtype with
autocast disabled inside.

``out=``: like ``torch.matmul(out=)``: the result is written into ``out`` and
``out`` is returned; allowed only when no gradient is recorded (raises
ValueError otherwise, since an in-place result cannot carry the FP8 backward).
"""

from __future__ import annotations

from typing import Any

import torch

import fp8core
from fp8core import _validation
from fp8core_torch.config import (
    CodebookTensors,
    QuantSpec,
    check_float_tensor,
    codebook_tensors,
    dtype_name,
    resolve_spec,
)
from fp8core_torch.quantize import _dequantize, _qdq

__all__ = ["matmul_fp8_mixed", "matmul_fp8_global"]

DEFAULT_FW = "e4m3"
DEFAULT_BW = "e5m2"


def _fq(x: torch.Tensor, spec: QuantSpec, tabs: CodebookTensors | None,
        blocksize: int | None) -> torch.Tensor:
    """fake_quantize without argument checks, in x's dtype (float64 upcast handled)."""
    x32 = x.to(torch.float32) if x.dtype == torch.float64 else x
    vals, _, _ = _qdq(x32, spec, tabs, blocksize, out_dtype=x.dtype, want_codes=False)
    return vals.view(x.shape)


def _fq_global_any_layout(b: torch.Tensor, spec: QuantSpec, tabs, dtype: torch.dtype) -> torch.Tensor:
    """Global Q(B) cast to ``dtype``; a transposed-contiguous B (``weight.t()``) is
    quantized through its contiguous transpose (global scaling ignores order) and
    returned as a transposed view — no copy of the weight."""
    if not b.is_contiguous() and b.dim() == 2 and b.t().is_contiguous():
        return _fq(b.t(), spec, tabs, None).to(dtype).t()
    return _fq(b.contiguous(), spec, tabs, None).to(dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a (..., K) @ b (K, N) [+ bias], bias fused into the GEMM as nn.Linear does."""
    if bias is None:
        return torch.matmul(a, b)
    a2 = a.reshape(-1, a.shape[-1])
    return torch.addmm(bias.to(a.dtype), a2, b).view(*a.shape[:-1], b.shape[1])


def _is_transposed(b: torch.Tensor) -> bool:
    return not b.is_contiguous() and b.t().is_contiguous()


def _grad_b(a: torch.Tensor, g: torch.Tensor, b_transposed: bool) -> torch.Tensor:
    """aᵀ @ g for 2-D a (M, K), g (M, N), laid out like B (a transposed-contiguous B
    gets (gᵀ @ a)ᵀ so that weight.grad comes out contiguous)."""
    if b_transposed:
        return (g.t() @ a).t()
    return a.t() @ g


def _grad_out_2d(grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output gradient in A's dtype, flattened to (rows, N) as both backwards use it."""
    return grad_out.to(dtype).reshape(-1, grad_out.shape[-1])


def _sum_rows(g2: torch.Tensor) -> torch.Tensor:
    """Σ over rows as a GEMM (ones @ g): the same BLAS call eager and under
    torch.compile, so the bias gradient has the same bits in both (a ``sum`` is
    reduced in a different order by inductor)."""
    return torch.mm(torch.ones(1, g2.shape[0], dtype=g2.dtype, device=g2.device), g2).view(-1)


def _tables(spec: QuantSpec, device: torch.device) -> CodebookTensors | None:
    return codebook_tensors(spec.codebook, device) if spec.needs_tables else None


class _MatMulFP8Mixed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, bias, fw: QuantSpec, bw: QuantSpec, fw_tabs, bw_tabs, bsz: int, bsz2: int):
        qa = _fq(A, fw, fw_tabs, bsz)
        qb = _fq_global_any_layout(B, fw, fw_tabs, A.dtype)
        out = _mm(qa, qb, bias)
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        ctx.save_for_backward(qb if need_a else None, A if need_b else None)
        ctx.meta = (bw, bw_tabs, bsz2, A.dtype, B.dtype, None if bias is None else bias.dtype,
                    A.shape, _is_transposed(B))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qb, A = ctx.saved_tensors
        bw, bw_tabs, bsz2, a_dtype, b_dtype, bias_dtype, a_shape, b_t = ctx.meta
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        g2 = _grad_out_2d(grad_out, a_dtype)
        grad_a = grad_b = grad_bias = None
        with torch.autocast(g2.device.type, enabled=False):
            if need_a:
                qg = _fq(g2, bw, bw_tabs, bsz2)                     # Q_bw^blk(g; bsz2)
                grad_a = (qg @ qb.t()).view(a_shape)
            if need_b:
                grad_b = _grad_b(A.reshape(-1, A.shape[-1]), g2, b_t).to(b_dtype)
            if need_bias:
                grad_bias = _sum_rows(g2).to(bias_dtype)
        return grad_a, grad_b, grad_bias, None, None, None, None, None, None


class _MatMulFP8Global(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, B, bias, fw: QuantSpec, bw: QuantSpec, fw_tabs, bw_tabs, bsz: int, bsz2: int):
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        a32 = A.to(torch.float32) if A.dtype == torch.float64 else A
        qa, codes_a, absmax_a = _qdq(a32, fw, fw_tabs, None, out_dtype=A.dtype, want_codes=need_b)
        qa = qa.view(A.shape)
        qb = _fq_global_any_layout(B, fw, fw_tabs, A.dtype)
        out = _mm(qa, qb, bias)
        if need_b:
            codes_a = codes_a.view(A.shape)
        ctx.save_for_backward(qb if (need_a or need_b) else None,
                              codes_a if need_b else None, absmax_a if need_b else None)
        ctx.meta = (fw, fw_tabs, bw, bw_tabs, A.dtype, B.dtype,
                    None if bias is None else bias.dtype, A.shape, _is_transposed(B))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qb, codes_a, absmax_a = ctx.saved_tensors
        fw, fw_tabs, bw, bw_tabs, a_dtype, b_dtype, bias_dtype, a_shape, b_t = ctx.meta
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        g2 = _grad_out_2d(grad_out, a_dtype)
        grad_a = grad_b = grad_bias = None
        with torch.autocast(g2.device.type, enabled=False):
            if need_a or need_b:
                qg = _fq(g2, bw, bw_tabs, None)                     # Q_bw^glob(g)
            if need_a:
                grad_a = (qg @ qb.t()).view(a_shape)
            if need_b:
                # Q_fw^glob(A) decoded from the saved codes: fl(value[code] * dscale)
                qa = _dequantize(codes_a, absmax_a, fw, fw_tabs, None, a_dtype)
                grad_b = _grad_b(qa.view(-1, codes_a.shape[-1]), qg, b_t).to(b_dtype)
            if need_bias:
                grad_bias = _sum_rows(g2).to(bias_dtype)
        return grad_a, grad_b, grad_bias, None, None, None, None, None, None


def _resolve_code(code: Any, default: str, argname: str) -> QuantSpec:
    if code is None:
        code = default
    if isinstance(code, torch.Tensor):
        if code.dtype.is_complex or not code.dtype.is_floating_point:
            raise TypeError(
                f"{argname}: a code tensor must be a real floating-point tensor of 256 values, "
                f"got dtype {dtype_name(code.dtype)}"
            )
        if code.numel() != 256 or code.dim() != 1:
            raise ValueError(
                f"{argname}: a code tensor must have shape (256,), got shape {tuple(code.shape)}"
            )
    return resolve_spec(code, argname=argname)


def _check_matmul_inputs(A: Any, B: Any, bias: Any) -> None:
    check_float_tensor(A, "A")
    check_float_tensor(B, "B")
    _validation.check_matmul_shapes(tuple(A.shape), tuple(B.shape))
    if bias is not None:
        check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (B.shape[1],):
            raise ValueError(f"bias must have shape ({B.shape[1]},), got {tuple(bias.shape)}")


def _autocast_inputs(A, B, bias):
    dev = A.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        A, B = A.to(dt), B.to(dt)
        bias = None if bias is None else bias.to(dt)
    return A, B, bias


def _apply_module(fn, A, B, bias, fw, bw, fw_tabs, bw_tabs, bsz, bsz2):
    """The layers' entry: no argument re-validation, tables from module buffers."""
    check_float_tensor(A, "input")
    if A.dim() < 1 or A.shape[-1] != B.shape[0]:
        _validation.check_matmul_shapes(tuple(A.shape), tuple(B.shape))
    A, B, bias = _autocast_inputs(A, B, bias)
    dev = A.device.type
    if A.numel() == 0:
        with torch.autocast(dev, enabled=False):
            return _mm(A * 0, B.to(A.dtype) * 0, bias)
    with torch.autocast(dev, enabled=False):
        return fn.apply(A, B, bias, fw, bw, fw_tabs, bw_tabs, bsz, bsz2)


def _apply(fn, A, B, bias, fw, bw, bsz, bsz2, out):
    dev = A.device.type
    A, B, bias = _autocast_inputs(A, B, bias)
    fw_tabs = _tables(fw, A.device)
    bw_tabs = _tables(bw, A.device)
    if out is not None:
        records = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (A, B, bias))
        if records:
            raise ValueError(
                "out= is not supported when a gradient is recorded (A, B or bias requires grad); "
                "call under torch.no_grad() or drop out="
            )
        expected = (*A.shape[:-1], B.shape[1])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected or out.dtype != A.dtype:
            got = (f"{type(out).__name__}" if not isinstance(out, torch.Tensor)
                   else f"shape {tuple(out.shape)} dtype {dtype_name(out.dtype)}")
            raise ValueError(
                f"out must be a tensor of shape {expected} and dtype {dtype_name(A.dtype)}, got {got}"
            )
    if A.numel() == 0 or B.numel() == 0:
        # empty product: zeros (K == 0) or an empty result; zero gradients.
        with torch.autocast(dev, enabled=False):
            res = _mm(A * 0, B.to(A.dtype) * 0, bias)
    else:
        with torch.autocast(dev, enabled=False):
            res = fn.apply(A, B, bias, fw, bw, fw_tabs, bw_tabs, bsz, bsz2)
    if out is not None:
        out.copy_(res)
        return out
    return res


def _block_sizes(A: torch.Tensor, B: torch.Tensor, bsz: Any, bsz2: Any) -> tuple[int, int]:
    _validation.check_matmul_blocksize(bsz, "bsz")
    _validation.check_matmul_blocksize(bsz2, "bsz2")
    if bsz == -1:
        bsz = fp8core.select_block_size(max(int(A.shape[-1]), 1))
    if bsz2 == -1:
        bsz2 = fp8core.select_block_size(max(int(B.shape[1]), 1))
    return bsz, bsz2


def matmul_fp8_mixed(A: torch.Tensor, B: torch.Tensor, fw_code: Any = None, bw_code: Any = None,
                     out: torch.Tensor | None = None, bsz: int = -1, bsz2: int = -1, *,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8-simulated ``A @ B`` (+ bias): A blockwise, B global, grad_out blockwise.

    Args:
      A: (..., K) float16/bfloat16/float32/float64 tensor.
      B: (K, N) float tensor (a ``weight.t()`` view is used without a copy).
      fw_code: forward codebook (format name, Codebook or 256-value tensor);
        default ``"e4m3"`` (float8_e4m3fn).
      bw_code: backward (gradient) codebook; default ``"e5m2"``.
      out: optional result tensor (see the module docstring).
      bsz: A's block size; -1 = ``select_block_size(K)``.
      bsz2: grad_out's block size; -1 = ``select_block_size(N)``.
      bias: optional (N,) bias added in the GEMM (keyword-only; fp8core extension).

    Returns:
      (..., N) tensor in A's dtype. Gradients: grad_A = Q_bw^blk(g) @ Q_fw(B)ᵀ,
      grad_B = Aᵀ @ g in full precision, grad_bias = Σ g.
    """
    _check_matmul_inputs(A, B, bias)
    fw = _resolve_code(fw_code, DEFAULT_FW, "fw_code")
    bw = _resolve_code(bw_code, DEFAULT_BW, "bw_code")
    bsz, bsz2 = _block_sizes(A, B, bsz, bsz2)
    return _apply(_MatMulFP8Mixed, A, B, bias, fw, bw, bsz, bsz2, out)


def matmul_fp8_global(A: torch.Tensor, B: torch.Tensor, fw_code: Any = None, bw_code: Any = None,
                      out: torch.Tensor | None = None, bsz: int = -1, bsz2: int = -1, *,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8-simulated ``A @ B`` (+ bias) with every operand quantized globally.

    Same arguments as :func:`matmul_fp8_mixed`; ``bsz``/``bsz2`` are validated and
    accepted for call-shape compatibility with bitsandbytes but unused (global
    scaling has no blocks). Gradients: grad_A = Q_bw(g) @ Q_fw(B)ᵀ,
    grad_B = Q_fw(A)ᵀ @ Q_bw(g), grad_bias = Σ g (unquantized).
    """
    _check_matmul_inputs(A, B, bias)
    fw = _resolve_code(fw_code, DEFAULT_FW, "fw_code")
    bw = _resolve_code(bw_code, DEFAULT_BW, "bw_code")
    bsz, bsz2 = _block_sizes(A, B, bsz, bsz2)
    return _apply(_MatMulFP8Global, A, B, bias, fw, bw, bsz, bsz2, out)
