"""FP8-simulated matmuls with custom VJPs (docs/numerics.md §6).

``matmul_fp8_mixed`` and ``matmul_fp8_global`` have the PyTorch backend's
semantics. Quantization is ``fake_quantize`` (bit-identical to the reference);
the products accumulate in float32 (``preferred_element_type``) and are cast to
A's dtype, so they agree with a float64 product of the reference's quantized
operands within float32 accumulation bounds (not bit for bit: XLA chooses the
summation order).

Layout follows optax: private ``_f``, ``_f_fwd``, ``_f_bwd``, ``_f.defvjp``;
the public wrappers validate arguments (at trace time), resolve formats to
hashable :class:`fp8core.Codebook` values and block sizes to ints, and pass
them as non-differentiable static arguments — never arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fp8core
from fp8core import _validation
from fp8core.codebooks import Codebook
from fp8core_jax import quantize as _q

__all__ = ["matmul_fp8_mixed", "matmul_fp8_global"]


def _dot(a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """``a @ b`` accumulated in float32, cast once to ``out_dtype``."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _flat2d(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------ mixed
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _mixed(A, B, fw: Codebook, bw: Codebook, bsz: int, bsz2: int, b_dtype: str):
    return _mixed_fwd(A, B, fw, bw, bsz, bsz2, b_dtype)[0]


def _mixed_fwd(A, B, fw, bw, bsz, bsz2, b_dtype):
    a_q = _q._fake_quantize(A, fw, bsz)                         # Q_fw^blk(A), A's dtype
    b_codes, b_absmax = _q._quantize_global(B, fw)              # Q_fw^glob(B) as uint8 + scale
    b_q = _q._dequantize_global(b_codes, b_absmax, fw, b_dtype).astype(A.dtype)
    out = _dot(a_q, b_q, A.dtype)
    return out, (A, b_codes, b_absmax)                          # A: grad_B is full precision


def _mixed_bwd(fw, bw, bsz, bsz2, b_dtype, res, g):
    A, b_codes, b_absmax = res
    g_q = _q._fake_quantize(g, bw, bsz2)                        # Q_bw^blk(g)
    b_q = _q._dequantize_global(b_codes, b_absmax, fw, b_dtype).astype(A.dtype)
    grad_A = _dot(g_q, b_q.T, A.dtype)
    grad_B = _dot(_flat2d(A).T, _flat2d(g), A.dtype).astype(b_dtype)  # Aᵀ·g, unquantized
    return grad_A, grad_B


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


# ----------------------------------------------------------------- global
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _global(A, B, fw: Codebook, bw: Codebook, b_dtype: str):
    return _global_fwd(A, B, fw, bw, b_dtype)[0]


def _global_fwd(A, B, fw, bw, b_dtype):
    a_codes, a_absmax = _q._quantize_global(A, fw)
    b_codes, b_absmax = _q._quantize_global(B, fw)
    a_q = _q._dequantize_global(a_codes, a_absmax, fw, A.dtype.name)
    b_q = _q._dequantize_global(b_codes, b_absmax, fw, b_dtype).astype(A.dtype)
    out = _dot(a_q, b_q, A.dtype)
    # residuals: uint8 codes + one float32 scale each, never A or B themselves
    return out, (a_codes, a_absmax, b_codes, b_absmax)


def _global_bwd(fw, bw, b_dtype, res, g):
    a_codes, a_absmax, b_codes, b_absmax = res
    out_dtype = g.dtype
    g_q = _q._fake_quantize(g, bw, None)                        # Q_bw^glob(g)
    a_q = _q._dequantize_global(a_codes, a_absmax, fw, out_dtype.name)
    b_q = _q._dequantize_global(b_codes, b_absmax, fw, b_dtype).astype(out_dtype)
    grad_A = _dot(g_q, b_q.T, out_dtype)
    grad_B = _dot(_flat2d(a_q).T, _flat2d(g_q), out_dtype).astype(b_dtype)
    return grad_A, grad_B


_global.defvjp(_global_fwd, _global_bwd)


# ------------------------------------------------------------- validation
def _prepare(A, B, fw_format, bw_format, bsz, bsz2):
    if not hasattr(A, "dtype"):
        A = jnp.asarray(A)
    if not hasattr(B, "dtype"):
        B = jnp.asarray(B)
    _validation.check_float_dtype(np.dtype(A.dtype).name, argname="A")
    _validation.check_float_dtype(np.dtype(B.dtype).name, argname="B")
    _validation.check_matmul_shapes(tuple(A.shape), tuple(B.shape))
    _validation.check_matmul_blocksize(bsz, "bsz")
    _validation.check_matmul_blocksize(bsz2, "bsz2")
    fw = _q._resolve_named(fw_format, "fw_format")
    bw = _q._resolve_named(bw_format, "bw_format")
    K, N = B.shape
    if bsz == -1:
        bsz = fp8core.select_block_size(max(K, 1))
    if bsz2 == -1:
        bsz2 = fp8core.select_block_size(max(N, 1))
    return A, B, fw, bw, bsz, bsz2


def matmul_fp8_mixed(A: Any, B: Any, fw_format: Any = "e4m3", bw_format: Any = "e5m2",
                     bsz: int = -1, bsz2: int = -1) -> jax.Array:
    """``A @ B`` with A quantized blockwise and B globally (bitsandbytes' "mixed" FP8).

    Forward: ``out = Q_fw^blk(A; bsz) @ Q_fw^glob(B)``. Backward with ``g = dL/dout``:
    ``grad_A = Q_bw^blk(g; bsz2) @ Q_fw^glob(B)ᵀ`` and ``grad_B = Aᵀ @ g`` in
    full precision (straight-through: quantization is the identity in backward).

    Args:
      A: ``(..., K)`` float16/bfloat16/float32 array; blocks run over its
        row-major flattening (a block may span rows).
      B: ``(K, N)`` float array; quantized in its own dtype, then cast to A's.
      fw_format, bw_format: forward / backward codebook: a format name or alias
        (default ``"e4m3"`` = float8_e4m3fn and ``"e5m2"``), a legacy name
        (``"bnb_e4m3"``), a :class:`fp8core.Codebook` or 256 table values.
      bsz: block size for A, ``-1`` → ``select_block_size(K)``.
      bsz2: block size for g, ``-1`` → ``select_block_size(N)``.

    Returns:
      ``(..., N)`` array of A's dtype.

    Numerics: quantization per docs/numerics.md §3–§4 (round half to even for
    native formats, saturating clamp to ±M before rounding, NaN/inf blocks give
    NaN). Products accumulate in float32 and are rounded once to A's dtype.
    Residuals: A, and B's uint8 codes + scale.

    Raises:
      TypeError: A or B not floating point; bsz/bsz2 not ints; bad format type.
      ValueError: shapes do not match; bsz/bsz2 not -1 or positive; unknown format.
    """
    A, B, fw, bw, bsz, bsz2 = _prepare(A, B, fw_format, bw_format, bsz, bsz2)
    return _mixed(A, B, fw, bw, bsz, bsz2, np.dtype(B.dtype).name)


def matmul_fp8_global(A: Any, B: Any, fw_format: Any = "e4m3", bw_format: Any = "e5m2",
                      bsz: int = -1, bsz2: int = -1) -> jax.Array:
    """``A @ B`` with every operand quantized globally (one scale per tensor).

    Forward: ``out = Q_fw^glob(A) @ Q_fw^glob(B)``. Backward:
    ``grad_A = Q_bw^glob(g) @ Q_fw^glob(B)ᵀ``, ``grad_B = Q_fw^glob(A)ᵀ @ Q_bw^glob(g)``.
    ``bsz``/``bsz2`` are validated and accepted for signature parity with
    :func:`matmul_fp8_mixed` but unused. Residuals are A's and B's uint8 codes
    and scales only. Arguments, numerics and errors as :func:`matmul_fp8_mixed`.
    """
    A, B, fw, bw, _, _ = _prepare(A, B, fw_format, bw_format, bsz, bsz2)
    return _global(A, B, fw, bw, np.dtype(B.dtype).name)
