"""FP8-simulated matmuls with custom VJPs (docs/numerics.md §6, §9).

:func:`matmul_fp8` executes an :class:`fp8core.recipe.LinearRecipe`: one generic
``jax.custom_vjp`` whose three GEMMs (fprop, dgrad, wgrad) quantize each operand
as the recipe's slot says. ``matmul_fp8_mixed`` and ``matmul_fp8_global`` are
bitsandbytes' call shape over the presets :func:`fp8core.recipe.bnb_recipe` builds,
with the PyTorch backend's semantics. Quantization is bit-identical to the
reference; the products accumulate in float32 (``preferred_element_type``) and are
cast once to A's dtype, so they agree with a float64 product of
:func:`fp8core.reference.linear_operands` within float32 accumulation bounds (not
bit for bit: XLA chooses the summation order).

Layout follows optax: private ``_f``, ``_f_fwd``, ``_f_bwd``, ``_f.defvjp``;
the public wrappers validate arguments (at trace time), resolve recipes and
formats to hashable values, and pass them as non-differentiable static
arguments — never arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

import fp8core
import fp8core.recipe
from fp8core import _validation
from fp8core.codebooks import Codebook
from fp8core.recipe import LinearRecipe
from fp8core_jax import hadamard as _hadamard
from fp8core_jax import quantize as _q

__all__ = ["matmul_fp8", "matmul_fp8_mixed", "matmul_fp8_global"]


def _dot(a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """``a @ b`` accumulated in float32, cast once to ``out_dtype``."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _flat2d(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------- operands
def _reduce(recipe: LinearRecipe, rule):
    """The mesh axes a slot's amax is all-reduced over (§10.2), or None."""
    if recipe.amax_reduction is None or rule is None or rule.granularity.kind != "tensor":
        return None
    return recipe.amax_reduction


def _stochastic(t: jax.Array, rule, axis: int, dtype: str, key, slot: int, reduce=None):
    """§14.3: a stochastic slot's value in ``dtype`` — ``t`` in linear_operands' layout,
    seed ``key[0]``, stream ``slot_stream(key[1], slot)`` (uint32 wrapping); the C kernel's
    stochastic custom call on CPU where it serves the operand, else XLA ops."""
    absmax = None if reduce is None else _q._reduced_absmax(t, reduce)
    stream = key[1] * jnp.uint32(fp8core.random.SLOT_STREAMS) + jnp.uint32(slot)
    kernel = absmax is None and _q._operand_kernel(
        fp8core.recipe.nearest_rule(rule), _q._layout(tuple(t.shape), rule.granularity, axis),
        rule.format, t.dtype)
    codes, a = _q._operand_sr_jit(t, key[0], stream, absmax, rule, axis, kernel)
    return _q._dequantize_operand(codes, a, rule, axis, dtype)


def _quantized(t: jax.Array, rule, axis: int, dtype: str, keep: str | None, reduce=None,
               key=None, slot: int = 0):
    """``(value in dtype, residual)`` of one forward operand: the value the GEMM uses
    (``t`` itself for a high-precision slot) and what backward keeps of ``t`` —
    ``"codes"``: its uint8 codes + absmax (backward decodes the same value; a stochastic
    slot keeps the value itself, as ``(value, None)``), ``"hp"``: ``t``, ``None``:
    nothing. ``reduce``: as :func:`_q._fake_operand`."""
    if rule is None:
        return t.astype(dtype), (t if keep == "hp" else None)
    if rule.is_stochastic:
        vals = _stochastic(t, rule, axis, dtype, key, slot, reduce)
        return vals, ((vals, None) if keep == "codes" else t if keep == "hp" else None)
    if keep == "codes":
        absmax = None if reduce is None else _q._reduced_absmax(t, reduce)
        vals, codes, absmax = _q._operand(t, rule, axis, dtype, True, absmax)
        return vals, (codes, absmax)
    return _q._fake_operand(t, rule, axis, reduce).astype(dtype), (t if keep == "hp" else None)


def _backward_operand(recipe: LinearRecipe, slot: str, res, hp, axis: int, dtype: str,
                      reused=None, key=None):
    """A backward slot's operand in ``dtype`` (the slot's tensor's own dtype): the
    source slot's value (``reused``, or decoded from the residual codes), the tensor
    ``hp`` in high precision, or ``hp`` quantized by the slot's own rule along ``axis``."""
    src = recipe.source(slot)
    if src == "reuse":
        if reused is not None:
            return reused
        codes, absmax = res
        if absmax is None:                                  # a stochastic slot's value
            return codes.astype(dtype)
        rule = recipe.rule(fp8core.recipe.REUSE_SOURCE[slot])
        src_axis = -1 if slot == "input_for_grad_weight" else 0
        return _q._dequantize_operand(codes, absmax, rule, src_axis, dtype)
    if src == "hp":
        return hp.astype(dtype)
    rule = recipe.rule(slot)
    if rule.is_stochastic:
        return _stochastic(hp.astype(dtype), rule, axis, dtype, key,
                           fp8core.recipe.SLOTS.index(slot), _reduce(recipe, rule))
    return _q._fake_operand(hp.astype(dtype), rule, axis, _reduce(recipe, rule))


def _rotated_operand(recipe: LinearRecipe, slot: str, hp, dtype: str, key=None):
    """A wgrad operand under ``wgrad_transform``: ``hp (M, C)`` rotated along the tokens
    (float32, ``M'`` padded to 16), then high precision or quantized along M by the slot."""
    t = _hadamard.wgrad_rotated(hp, dtype)
    rule = recipe.rule(slot)
    if rule is None:
        return t.astype(dtype)
    if rule.is_stochastic:
        return _stochastic(t, rule, 0, dtype, key, fp8core.recipe.SLOTS.index(slot),
                           _reduce(recipe, rule))
    return _q._fake_operand(t, rule, 0, _reduce(recipe, rule)).astype(dtype)


# ------------------------------------------------------------------ recipe
@jax.custom_jvp
def _first_order_only(x):
    """The identity, whose derivative is an error. The forward's and the backward's inputs
    pass through it; neither is differentiated by a first derivative (custom_vjp calls the
    forward on primals and the backward for the transpose), so only a second derivative
    through the FP8 matmul (``grad`` of ``grad``) reaches it: a clear error at trace time
    instead of a failure deep inside a quantizer or dropped terms."""
    return x


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise RuntimeError(_validation.DOUBLE_BACKWARD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _f(A, B, key, recipe: LinearRecipe, b_dtype: str):
    return _f_fwd(A, B, key, recipe, b_dtype)[0]


def _f_fwd(A, B, key, recipe, b_dtype):
    A, B = _first_order_only(A), _first_order_only(B)
    a_dtype = np.dtype(A.dtype).name
    saved = recipe.saved(True, True)
    a_q, x_res = _quantized(A, recipe.input, -1, a_dtype, saved["X"],      # Q_input(A along K)
                            _reduce(recipe, recipe.input), key, 0)
    b_q, w_res = _quantized(B, recipe.weight, 0, b_dtype, saved["W"],      # Q_weight(B along K)
                            _reduce(recipe, recipe.weight), key, 1)
    out = _dot(a_q, b_q.astype(a_dtype), a_dtype)
    return out, (x_res, w_res, key)


def _f_bwd(recipe, b_dtype, res, g):
    key = res[2]
    res, g = jax.tree_util.tree_map(_first_order_only, (res[:2], g))
    x_res, w_res = res
    dtype = np.dtype(g.dtype).name                                         # A's dtype
    # dgrad: grad_A = Q_grad_output(g along N) @ Q_weight_for_grad_input(B along N)ᵀ
    rule_g = recipe.grad_output
    if rule_g is None:
        g_q = g
    elif rule_g.is_stochastic:
        g_q = _stochastic(g, rule_g, -1, dtype, key, 2, _reduce(recipe, rule_g))
    else:
        g_q = _q._fake_operand(g, rule_g, -1, _reduce(recipe, rule_g))
    w = _backward_operand(recipe, "weight_for_grad_input", w_res, w_res, 1, b_dtype, key=key)
    grad_A = _dot(g_q, w.astype(dtype).T, dtype)
    # wgrad: grad_B = Q_input_for_grad_weight(A2 along M)ᵀ @ Q_grad_output_for_grad_weight(g along M)
    k = grad_A.shape[-1]
    x_hp = None if x_res is None or isinstance(x_res, tuple) else _flat2d(x_res)
    g2 = _flat2d(g)
    if recipe.wgrad_transform is not None:                        # §12: rotated along M
        x = _rotated_operand(recipe, "input_for_grad_weight", x_hp, dtype, key)
        gw = _rotated_operand(recipe, "grad_output_for_grad_weight", g2, dtype, key)
    else:
        x = _backward_operand(recipe, "input_for_grad_weight", x_res, x_hp, 0, dtype, key=key)
        gw = _backward_operand(recipe, "grad_output_for_grad_weight", None, g2, 0, dtype,
                               reused=_flat2d(g_q), key=key)
    grad_B = _dot(x.reshape(-1, k).T, gw, dtype).astype(b_dtype)
    key_ct = None if key is None else np.zeros(key.shape, jax.dtypes.float0)
    return grad_A, grad_B, key_ct


_f.defvjp(_f_fwd, _f_bwd)


# ------------------------------------------------------------- validation
def _as_array(x):
    return x if hasattr(x, "dtype") else jnp.asarray(x)


def _check_inputs(A, B, bias=None, argname: str = "A"):
    A, B = _as_array(A), _as_array(B)
    _validation.check_float_dtype(np.dtype(A.dtype).name, argname=argname)
    _validation.check_float_dtype(np.dtype(B.dtype).name, argname="B")
    _validation.check_matmul_shapes(tuple(A.shape), tuple(B.shape))
    if bias is not None:
        bias = _as_array(bias)
        _validation.check_float_dtype(np.dtype(bias.dtype).name, argname="bias")
        if tuple(bias.shape) != (B.shape[1],):
            raise ValueError(f"bias must have shape ({B.shape[1]},), got {tuple(bias.shape)}")
    return A, B, bias


def _varying(x) -> frozenset:
    """The shard_map mesh axes ``x`` varies over (empty outside shard_map)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _vary_alike(A, B):
    """Inside ``shard_map``, A and B marked varying over the union of their axes, as a
    ``jnp.matmul`` of them does implicitly: the custom VJP's gradients vary where its
    inputs do, and the transpose of this cast (a psum over the axes B was replicated on,
    e.g. the data axis for a replicated weight) is JAX's own, outside the FP8 backward."""
    va, vb = _varying(A), _varying(B)
    if va == vb:
        return A, B
    both = va | vb
    if both - va:
        A = lax.pcast(A, tuple(sorted(both - va)), to="varying")
    if both - vb:
        B = lax.pcast(B, tuple(sorted(both - vb)), to="varying")
    return A, B


def _check_reduction(recipe: LinearRecipe) -> None:
    """JAX's part of ``LinearRecipe.amax_reduction``: mesh axis names (fp8core checked the
    recipe has a per-tensor slot; an axis not bound where it runs is a ValueError there)."""
    v = recipe.amax_reduction
    if v is not None and not isinstance(v, (str, tuple)):
        raise TypeError(
            f"recipe {recipe.name}: amax_reduction in fp8core_jax is a mesh axis name or a "
            f"tuple of them (the axes of the enclosing shard_map), got {type(v).__name__}: {v!r}")


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``y + bias`` in their promoted dtype, cast back to y's (PyTorch's ``out += bias``)."""
    if bias is None:
        return y
    return (y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))).astype(y.dtype)


def _apply(A, B, bias, recipe: LinearRecipe, argname: str = "A", key=None) -> jax.Array:
    """Checked inputs → the recipe's custom VJP (+ bias); an empty product is zeros."""
    recipe.check_input(A.ndim, argname=argname)
    _check_reduction(recipe)
    if A.size == 0 or B.size == 0:  # nothing to quantize: zeros (K == 0) or an empty result
        y = _dot(A * 0, (B * 0).astype(A.dtype), A.dtype)
    else:
        A, B = _vary_alike(A, B)
        y = _f(A, B, key, recipe, np.dtype(B.dtype).name)
    return _add_bias(y, bias)


def _sr_key(recipe: LinearRecipe, seed: Any, stream: Any, where: str = "matmul_fp8"):
    """uint32 ``[seed, stream]`` for a recipe with stochastic slots, else None (fp8core's
    checks and messages; traced integer scalars allowed)."""
    recipe.check_seed(seed, stream, where=where)
    if not recipe.stochastic_slots:
        return None
    return jnp.stack([_q._key_array(seed, "seed"), _q._key_array(stream, "stream")])


def matmul_fp8(A: Any, B: Any, *, recipe: Any, bias: Any = None, seed: Any = None,
               stream: Any = 0) -> jax.Array:
    """FP8-simulated ``A @ B`` (+ ``bias``) whose three GEMMs follow ``recipe`` (§9.1).

    With ``A2 = A.reshape(-1, K)`` and ``g = dL/dout``:

    * fprop ``out = Q_input(A along K) @ Q_weight(B along K)``;
    * dgrad ``grad_A = Q_grad_output(g along N) @ Q_weight_for_grad_input(B along N)ᵀ``;
    * wgrad ``grad_B = Q_input_for_grad_weight(A2 along M)ᵀ @ Q_grad_output_for_grad_weight(g along M)``;

    each ``Q`` as the slot says (:meth:`~fp8core.recipe.LinearRecipe.source`: high
    precision, the forward's quantized value reused, or re-quantized in the backward
    GEMM's orientation). Gradients are straight-through (quantization is the identity
    in backward); ``grad_bias = Σ g``, unquantized.

    Args:
      A: ``(..., K)`` float16/bfloat16/float32 array (activations X).
      B: ``(K, N)`` float array (``kernel`` of an ``nnx.Linear``, = Wᵀ); quantized in its
        own dtype, then cast to A's.
      recipe: an :class:`fp8core.recipe.LinearRecipe` or a preset name
        (``fp8core.recipe.PRESETS``: ``"TENSORWISE"``, ``"ROWWISE"``, …). Static.
      bias: optional ``(N,)`` float array, added after the product's cast in the
        promoted dtype of output and bias, and cast back to the output's dtype.
      seed, stream: the random bits of a recipe's stochastic slots (§14.3: required when
        it has one; ints in ``[0, 2**32)`` or 0-d integer arrays, traced under jit); slot
        ``j`` draws from stream ``fp8core.random.slot_stream(stream, j)``.

    Returns:
      ``(..., N)`` array of A's dtype.

    Numerics: each quantized operand is bit-identical to
    :func:`fp8core.reference.linear_operands` (in its own tensor's dtype, then cast to
    A's dtype); products accumulate in float32 and are rounded once to A's dtype;
    grad_B is cast to B's dtype. Residuals (``recipe.saved``): uint8 codes + absmax for
    a tensor whose quantized value backward reuses, else the tensor itself.

    Raises:
      TypeError: A, B or bias not floating point; recipe not a recipe or a preset name.
      ValueError: shapes; unknown preset; a tile granularity for the input or
        grad_output slots of a 1-D A.
    """
    recipe = fp8core.recipe.get_recipe(recipe)
    A, B, bias = _check_inputs(A, B, bias)
    return _apply(A, B, bias, recipe, key=_sr_key(recipe, seed, stream))


@functools.lru_cache(maxsize=256)
def _bnb(mode: str, fw: Codebook, bw: Codebook, bsz: int, bsz2: int) -> LinearRecipe:
    """bitsandbytes' layers as a recipe; ``-1`` (automatic) is ``None`` there."""
    return fp8core.recipe.bnb_recipe(mode, fw, bw, None if bsz == -1 else bsz,
                                     None if bsz2 == -1 else bsz2)


def _prepare(mode, A, B, fw_format, bw_format, bsz, bsz2):
    A, B, _ = _check_inputs(A, B)
    _validation.check_matmul_blocksize(bsz, "bsz")
    _validation.check_matmul_blocksize(bsz2, "bsz2")
    fw = _q._resolve_named(fw_format, "fw_format")
    bw = _q._resolve_named(bw_format, "bw_format")
    return A, B, _bnb(mode, fw, bw, bsz, bsz2)


def matmul_fp8_mixed(A: Any, B: Any, fw_format: Any = "e4m3", bw_format: Any = "e5m2",
                     bsz: int = -1, bsz2: int = -1) -> jax.Array:
    """``A @ B`` with A quantized blockwise and B globally (bitsandbytes' "mixed" FP8).

    The preset ``fp8core.recipe.bnb_recipe("mixed", fw_format, bw_format, bsz, bsz2)``
    run by :func:`matmul_fp8`. Forward: ``out = Q_fw^blk(A; bsz) @ Q_fw^glob(B)``.
    Backward with ``g = dL/dout``: ``grad_A = Q_bw^blk(g; bsz2) @ Q_fw^glob(B)ᵀ`` and
    ``grad_B = Aᵀ @ g`` in full precision (straight-through: quantization is the
    identity in backward).

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
    A, B, recipe = _prepare("mixed", A, B, fw_format, bw_format, bsz, bsz2)
    return _apply(A, B, None, recipe)


def matmul_fp8_global(A: Any, B: Any, fw_format: Any = "e4m3", bw_format: Any = "e5m2",
                      bsz: int = -1, bsz2: int = -1) -> jax.Array:
    """``A @ B`` with every operand quantized globally (one scale per tensor).

    The preset ``fp8core.recipe.bnb_recipe("global", ...)`` run by :func:`matmul_fp8`.
    Forward: ``out = Q_fw^glob(A) @ Q_fw^glob(B)``. Backward:
    ``grad_A = Q_bw^glob(g) @ Q_fw^glob(B)ᵀ``, ``grad_B = Q_fw^glob(A)ᵀ @ Q_bw^glob(g)``.
    ``bsz``/``bsz2`` are validated and accepted for signature parity with
    :func:`matmul_fp8_mixed` but unused. Residuals are A's and B's uint8 codes
    and scales only. Arguments, numerics and errors as :func:`matmul_fp8_mixed`.
    """
    A, B, recipe = _prepare("global", A, B, fw_format, bw_format, bsz, bsz2)
    return _apply(A, B, None, recipe)
