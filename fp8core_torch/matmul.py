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

import contextlib
import functools
from typing import Any

import torch

import fp8core
import fp8core.recipe
from fp8core import _validation
from fp8core_torch.config import (
    CodebookTensors,
    QuantSpec,
    check_float_tensor,
    codebook_tensors,
    dtype_name,
    resolve_spec,
)
from fp8core_torch.hadamard import wgrad_rotated
from fp8core_torch.quantize import (
    _F32_SMALLEST_NORMAL,
    QuantizedOperand,
    _decode_operand,
    _key_tensor,
    _operand,
    _dequantize_logical,
    _quantize_operand_sr,
    _upcast,
)

__all__ = ["matmul_fp8", "matmul_fp8_mixed", "matmul_fp8_global"]

DEFAULT_FW = "e4m3"
DEFAULT_BW = "e5m2"


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


_SLOTS = fp8core.recipe.SLOTS   # (input, weight, grad_output, weight_for_grad_input, ...)


class _MatMulFP8(torch.autograd.Function):
    """The one FP8 linear GEMM triple, driven by a :class:`fp8core.recipe.LinearRecipe`
    (docs/numerics.md §9.1).

    fprop ``out = Q_input(A2 along K) @ Q_weight(W along K)ᵀ``; dgrad
    ``grad_A = Q_grad_output(g along N) @ Q_weight_for_grad_input(W along N)``; wgrad
    ``grad_B = Q_input_for_grad_weight(A2 along M)ᵀ @ Q_grad_output_for_grad_weight(g along
    M)``, with ``A2 = A.reshape(-1, K)``, ``W = Bᵀ``, ``g = dL/dout`` in A's dtype. Each
    backward slot is high precision, the reuse of a quantized value (``recipe.source``), or
    a re-quantization from high precision in its GEMM's orientation. Quantized values are
    computed in their tensor's dtype and then cast to A's; what backward needs is saved as
    uint8 codes + absmax wherever it reuses a quantized value (``recipe.saved``), else the
    tensor itself (a parameter or the input, saved by reference).
    """

    @staticmethod
    def forward(ctx, A, B, bias, recipe, specs, tabs, key=None):
        need_a, need_b = ctx.needs_input_grad[:2]
        save_x, save_w, _, _, _ = prog = _program(recipe, need_a, need_b)
        A2 = A.reshape(-1, A.shape[-1])
        qa, qx = _side(A2, recipe, 0, specs, tabs, A.dtype, save_x == "codes", key)
        qw, qwc = _side(B.t(), recipe, 1, specs, tabs, B.dtype, save_w == "codes", key)
        qw_t = qw.t()
        out = _mm(qa.view(A.shape), qw_t if qw_t.dtype == A.dtype else qw_t.to(A.dtype), bias)
        tensors = [A if save_x == "hp" else None, B if save_w == "hp" else None]
        for q in (qx, qwc):
            tensors += [None, None] if q is None else [q.codes, q.absmax]
        ctx.save_for_backward(*tensors)
        ctx.layouts = tuple(None if q is None else (q.how, q.transposed) for q in (qx, qwc))
        ctx.meta = (recipe, specs, tabs, prog, A.dtype, B.dtype,
                    None if bias is None else bias.dtype, A.shape, _is_transposed(B))
        ctx.key = key
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(_validation.DOUBLE_BACKWARD)  # grad mode: create_graph=True
        A, B, x_codes, x_absmax, w_codes, w_absmax = ctx.saved_tensors
        recipe, specs, tabs, prog, a_dtype, b_dtype, bias_dtype, a_shape, b_t = ctx.meta
        key = ctx.key
        _, _, src_wi, src_xw, src_gw = prog
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        g2 = _grad_out_2d(grad_out, a_dtype)
        grad_a = grad_b = grad_bias = None
        dev = g2.device.type
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) \
                else contextlib.nullcontext():
            qg = None
            if need_a or (need_b and src_gw == "reuse"):
                qg, _ = _side(g2, recipe, 2, specs, tabs, a_dtype, False, key)
            if need_a:
                if src_wi == "reuse":
                    w = _decode(recipe, 1, specs, tabs,
                                QuantizedOperand(w_codes, w_absmax, *ctx.layouts[1]), b_dtype)
                elif src_wi == "hp":
                    w = B.t()                           # (N, K)
                else:                                   # W along N: the (K, N) matrix B
                    w, _ = _side(B, recipe, 3, specs, tabs, b_dtype, False, key)
                    w = w.t()
                grad_a = (qg @ (w if w.dtype == a_dtype else w.to(a_dtype))).view(a_shape)
            if need_b and recipe.wgrad_transform is not None:    # §12: rotated along M
                x, _ = _side(wgrad_rotated(A.reshape(-1, A.shape[-1]), a_dtype), recipe, 4,
                             specs, tabs, a_dtype, False, key)
                gw, _ = _side(wgrad_rotated(g2, a_dtype), recipe, 5, specs, tabs, a_dtype, False,
                              key)
                grad_b = _grad_b(x.t(), gw.t(), b_t)
                grad_b = grad_b if grad_b.dtype == b_dtype else grad_b.to(b_dtype)
            elif need_b:
                if src_xw == "reuse":
                    x = _decode(recipe, 0, specs, tabs,
                                QuantizedOperand(x_codes, x_absmax, *ctx.layouts[0]), a_dtype)
                elif src_xw == "hp":
                    x = A.reshape(-1, A.shape[-1])
                else:                                   # X along M: the (K, M) matrix A2ᵀ
                    x, _ = _side(A.reshape(-1, A.shape[-1]).t(), recipe, 4, specs, tabs,
                                 a_dtype, False, key)
                    x = x.t()
                if src_gw == "reuse":
                    gw = qg
                elif src_gw == "hp":
                    gw = g2
                else:                                   # dY along M: the (N, M) matrix gᵀ
                    gw, _ = _side(g2.t(), recipe, 5, specs, tabs, a_dtype, False, key)
                    gw = gw.t()
                grad_b = _grad_b(x, gw, b_t)
                grad_b = grad_b if grad_b.dtype == b_dtype else grad_b.to(b_dtype)
            if need_bias:
                grad_bias = _sum_rows(g2).to(bias_dtype)
        return grad_a, grad_b, grad_bias, None, None, None, None


@functools.lru_cache(maxsize=None)
def _program(recipe, need_a: bool, need_b: bool) -> tuple:
    """Per (recipe, needed gradients), what the Function does, decided once: what the
    forward saves of X and W (``recipe.saved``) and the sources of the three
    re-quantizable backward slots (``recipe.source``)."""
    saved = recipe.saved(need_a, need_b)
    return (saved["X"], saved["W"], recipe.source("weight_for_grad_input"),
            recipe.source("input_for_grad_weight"), recipe.source("grad_output_for_grad_weight"))


#: The slots whose GEMM operand ``m`` is the transpose of the tensor as
#: fp8core.reference.linear_operands passes it (W = Bᵀ in fprop, Xᵀ and dYᵀ in wgrad):
#: stochastic rounding indexes elements in that tensor (§14.3).
_TRANSPOSED_SLOTS = (1, 4, 5)


def _side(m: torch.Tensor, recipe, i: int, specs, tabs, dtype: torch.dtype, want_codes: bool,
          key: torch.Tensor | None = None):
    """One GEMM operand (2-D, contraction axis last) as slot ``SLOTS[i]`` says: ``(values in
    dtype, QuantizedOperand or None)``; a high-precision slot is ``m`` itself. ``key``:
    int64 ``[seed, stream]`` of a recipe with stochastic slots."""
    rule = recipe.rule(_SLOTS[i])
    if rule is None:
        return (m if m.dtype == dtype else m.to(dtype)), None
    absmax = None
    if recipe.amax_reduction is not None and rule.granularity.kind == "tensor":
        absmax = _reduced_absmax(m, recipe.amax_reduction)
    if rule.is_stochastic:
        return _side_stochastic(m, rule, i, dtype, want_codes, key, absmax, specs[i], tabs[i])
    return _operand(m, rule, specs[i], tabs[i], out_dtype=dtype, want_codes=want_codes,
                    absmax=absmax)


def _side_stochastic(m, rule, i: int, dtype, want_codes: bool, key, absmax, spec, tabs):
    """§14.3: a stochastic slot, quantized as the reference does — the tensor in
    linear_operands' layout, stream ``slot_stream(stream, i)`` — by _quantize_operand_sr
    (the C kernel on CPU, torch ops elsewhere). What the
    backward reuses of it is its values (``how = ("values",)``), not codes."""
    t, axis = (m.t(), 0) if i in _TRANSPOSED_SLOTS else (m, -1)
    stream = torch.bitwise_and(key[1] * fp8core.random.SLOT_STREAMS + i, 0xFFFFFFFF)
    codes, am = _quantize_operand_sr(t, rule, axis, absmax, key[0], stream, spec)
    vals = _dequantize_logical(codes, am, rule, axis, dtype, spec, tabs)
    vals = vals.t() if i in _TRANSPOSED_SLOTS else vals
    q = QuantizedOperand(vals, vals.new_empty(0, dtype=torch.float32), ("values",), False)
    return vals, (q if want_codes else None)


def _reduced_absmax(m: torch.Tensor, group) -> torch.Tensor:
    """§10.2: this rank's §3.2 absmax of ``m``, all-reduced (max) over ``group`` as its
    float32 bits (absmax values order like their bits, NaN above +inf, so a NaN on any
    rank wins, in any rank order — gloo's float max would not say)."""
    x = _upcast(m)
    if x.numel():
        a = torch.maximum(torch.amax(x), torch.amin(x).neg()).to(torch.float32)
        a = torch.where(a < _F32_SMALLEST_NORMAL, 0.0, a)
        a = a.masked_fill(torch.isnan(a), float("nan")).reshape(1)
    else:
        a = torch.zeros(1, dtype=torch.float32, device=x.device)
    bits = a.view(torch.int32)
    torch.distributed.all_reduce(bits, op=torch.distributed.ReduceOp.MAX, group=group)
    return bits.view(torch.float32).view(())


def _check_reduction(recipe) -> None:
    """torch's part of ``LinearRecipe.amax_reduction``: a process group (fp8core checked
    the recipe has a per-tensor slot)."""
    v = recipe.amax_reduction
    if v is None:
        return
    if isinstance(v, (str, tuple)):
        raise TypeError(
            f"recipe {recipe.name}: amax_reduction={v!r} is a JAX mesh axis name; in "
            f"fp8core_torch it is a torch.distributed process group (e.g. "
            f"torch.distributed.group.WORLD, after init_process_group)")
    if not (torch.distributed.is_available()
            and isinstance(v, torch.distributed.ProcessGroup)):
        raise TypeError(
            f"recipe {recipe.name}: amax_reduction must be a torch.distributed.ProcessGroup "
            f"(e.g. torch.distributed.group.WORLD, after init_process_group), got "
            f"{type(v).__name__}: {v!r}")


def _decode(recipe, i: int, specs, tabs, q: QuantizedOperand, dtype: torch.dtype):
    return _decode_operand(q, recipe.rule(_SLOTS[i]), specs[i], tabs[i], dtype)


def _recipe_specs(recipe) -> tuple:
    """Per slot: the QuantSpec of its rule (None for high precision), resolved once."""
    return tuple(None if recipe.rule(s) is None else resolve_spec(recipe.rule(s).format)
                 for s in fp8core.recipe.SLOTS)


def _recipe_tables(specs: tuple, device: torch.device) -> tuple:
    return tuple(None if spec is None else _tables(spec, device) for spec in specs)


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


def _apply_module(A, B, bias, recipe, specs, key=None):
    """The layers' entry (input already checked): autocast, empty inputs, the Function."""
    if A.device.type == "meta":  # shape-only, as nn.Linear on meta (no values; no autocast)
        return _mm(A, B.to(A.dtype), bias)
    dev = A.device.type
    autocast = torch.is_autocast_enabled(dev)
    if autocast:
        A, B, bias = _autocast_inputs(A, B, bias)
    recipe.check_input(A.dim(), argname="input")
    with torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext():
        if A.numel() == 0:
            return _mm(A * 0, B.to(A.dtype) * 0, bias)
        return _MatMulFP8.apply(A, B, bias, recipe, specs, _recipe_tables(specs, A.device), key)


def _apply(A, B, bias, recipe, out=None, key=None):
    if A.device.type == "meta":  # shape-only, as torch.matmul on meta (no values; no autocast)
        res = _mm(A, B.to(A.dtype), bias)
        return res if out is None else out.copy_(res)
    dev = A.device.type
    A, B, bias = _autocast_inputs(A, B, bias)
    recipe.check_input(A.dim())
    _check_reduction(recipe)
    specs = _recipe_specs(recipe)
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
    with torch.autocast(dev, enabled=False):
        if A.numel() == 0 or B.numel() == 0:
            # empty product: zeros (K == 0) or an empty result; zero gradients.
            res = _mm(A * 0, B.to(A.dtype) * 0, bias)
        else:
            res = _MatMulFP8.apply(A, B, bias, recipe, specs, _recipe_tables(specs, A.device),
                                   key)
    if out is not None:
        out.copy_(res)
        return out
    return res


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
    return _bnb("mixed", A, B, fw_code, bw_code, out, bsz, bsz2, bias)


def matmul_fp8_global(A: torch.Tensor, B: torch.Tensor, fw_code: Any = None, bw_code: Any = None,
                      out: torch.Tensor | None = None, bsz: int = -1, bsz2: int = -1, *,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8-simulated ``A @ B`` (+ bias) with every operand quantized globally.

    Same arguments as :func:`matmul_fp8_mixed`; ``bsz``/``bsz2`` are validated and
    accepted for call-shape compatibility with bitsandbytes but unused (global
    scaling has no blocks). Gradients: grad_A = Q_bw(g) @ Q_fw(B)ᵀ,
    grad_B = Q_fw(A)ᵀ @ Q_bw(g), grad_bias = Σ g (unquantized).
    """
    return _bnb("global", A, B, fw_code, bw_code, out, bsz, bsz2, bias)


def _bnb(mode, A, B, fw_code, bw_code, out, bsz, bsz2, bias):
    _check_matmul_inputs(A, B, bias)
    fw = _resolve_code(fw_code, DEFAULT_FW, "fw_code")
    bw = _resolve_code(bw_code, DEFAULT_BW, "bw_code")
    _validation.check_matmul_blocksize(bsz, "bsz")
    _validation.check_matmul_blocksize(bsz2, "bsz2")
    recipe = fp8core.recipe.bnb_recipe(mode, fw.codebook, bw.codebook,
                                       None if bsz == -1 else bsz, None if bsz2 == -1 else bsz2)
    return _apply(A, B, bias, recipe, out)


def matmul_fp8(A: torch.Tensor, B: torch.Tensor, *, recipe: Any,
               bias: torch.Tensor | None = None, seed: Any = None, stream: Any = 0
               ) -> torch.Tensor:
    """FP8-simulated ``A @ B`` (+ bias) whose three GEMMs follow ``recipe`` (§9.1).

    Args:
      A: (..., K) float16/bfloat16/float32/float64 tensor (activations X).
      B: (K, N) float tensor (``Wᵀ``; a ``weight.t()`` view is used without a copy).
      recipe: a :class:`fp8core.recipe.LinearRecipe` or a preset name
        (``fp8core.recipe.PRESETS``).
      bias: optional (N,) bias added in the GEMM.
      seed, stream: the random bits of a recipe's stochastic slots (§14.3: required when
        it has one; ints in ``[0, 2**32)`` or 0-d integer tensors — a tensor stream does
        not recompile under ``torch.compile``); slot ``j`` draws from stream
        ``fp8core.random.slot_stream(stream, j)``.

    Returns:
      (..., N) tensor in A's dtype. Gradients (straight-through):
      ``grad_A = Q(g) @ Q(W)``, ``grad_B = Q(A)ᵀ @ Q(g)`` with each Q as the recipe's slot
      says, ``grad_bias = Σ g`` unquantized.

    Raises:
      TypeError: A, B or bias not real floating tensors; recipe not a recipe / name.
      ValueError: shapes; unknown preset; a tile granularity on a 1-D A.
    """
    _check_matmul_inputs(A, B, bias)
    recipe = fp8core.recipe.get_recipe(recipe)
    return _apply(A, B, bias, recipe, key=_sr_key(recipe, seed, stream, A.device))


def _sr_key(recipe, seed: Any, stream: Any, device: torch.device, where: str = "matmul_fp8"):
    """int64 ``[seed, stream]`` on ``device`` for a recipe with stochastic slots, else None
    (validated: fp8core's messages)."""
    recipe.check_seed(seed, stream, where=where)
    if not recipe.stochastic_slots:
        return None
    return torch.stack([_key_tensor(seed, "seed", device), _key_tensor(stream, "stream", device)])
