"""OCP MX block scaling on the JAX backend (docs/numerics.md §11): ``fp8core_jax.quantize_mx``
/ ``dequantize_mx`` and the MX scale rules of the operand engine, bit for bit against the
numpy reference (``fp8core.quantize_mx`` & co., itself pinned to torchao in
tests/test_mx.py), for every element format and scale mode, float32 and bfloat16 inputs.

XLA:CPU flushes float32 subnormals; MX meets them when decoding with small scale bytes,
when scaling float32-subnormal inputs by up to 2**126, and in rceil's 2**-127 scale of an
inf block. The inputs reach all three (checked on the reference first, so that a
flushing implementation fails). Both CPU paths run through ``jax_path``: the kernel param
takes the C kernel's custom calls for MX rules (listed in
``fp8core._kernel.SCALE_RULE_CODES``; tests/test_kernel_mx.py checks the HLO). The quick set takes each format and each mode
once (a diagonal); the full crosses are marked slow.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8core
import fp8core.mx as mx
import fp8core.recipe as R
from fp8core import _kernel
from fp8core import reference as ref
from fp8core_jax import _ffi
from fp8core_jax import quantize as jq
from fp8core_jax import (dequantize_mx, dequantize_operand, fake_quantize_operand, matmul_fp8,
                         quantize_mx, quantize_operand)
from _jax_testutil import DTYPES, assert_bits_equal, assert_close_to_oracle, jax_path  # noqa: F401
from test_mx import _special_blocks as _mx_special_blocks

both_paths = pytest.mark.usefixtures("jax_path")
slow = pytest.mark.slow
F32_TINY = np.float32(2.0 ** -126)


def _special_blocks() -> np.ndarray:
    """tests/test_mx.py's blocks (2**±60, zero, −0, ±inf, float32-subnormal, huge, tiny,
    rounding midpoints), plus an inf block whose other elements survive rceil's 2**-127."""
    x = _mx_special_blocks()
    x[11, :4] = [np.inf, 3.0e38, -2.0 ** 127, 1e38]
    return x


def _inputs(dtype: str) -> np.ndarray:
    return _special_blocks().astype(DTYPES[dtype])


def _diagonal(extra_cases):
    """``(fmt, mode, *case)`` for every format × mode × case: format i with mode i % 4 and
    case i % len(extra_cases) quick, the rest slow."""
    out = []
    for i, fmt in enumerate(mx.MX_ELEMENT_FORMATS):
        for j, mode in enumerate(mx.SCALE_MODES):
            for k, case in enumerate(extra_cases):
                quick = j == i % len(mx.SCALE_MODES) and k == i % len(extra_cases)
                out.append(pytest.param(fmt, mode, *case, marks=() if quick else (slow,),
                                        id="-".join(map(str, (fmt, mode) + tuple(case)))))
    return out


def _f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


# ---------------------------------------------------------------- the inputs reach the hazards
def test_special_blocks_reach_every_subnormal_hazard():
    """On the reference: (a) dequantized float32 subnormals, (b) float32-subnormal inputs
    with non-zero codes, (c) rceil byte 254 blocks whose inf and huge elements have
    non-zero codes — each of which XLA:CPU's flush-to-zero would change."""
    x = _special_blocks()
    codes, scales = fp8core.quantize_mx(x, "e4m3", scale_mode="floor")
    y = fp8core.dequantize_mx(codes, scales, "e4m3")
    assert ((y != 0) & (np.abs(y) < F32_TINY)).sum() > 32                       # (a)
    sub_in = (x != 0) & (np.abs(x) < F32_TINY)
    assert sub_in.sum() == 64 and (codes[sub_in] & 0x7F).min() > 0                 # (b)
    codes, scales = fp8core.quantize_mx(x, "e4m3", scale_mode="rceil")
    assert scales[5, 0] == scales[5, 1] == scales[11, 0] == 254                     # (c)
    assert codes[5, 5] == 0x7E and codes[5, 40] == 0xFE and codes[11, 0] == 0x7E
    assert (codes[11, 1:4] & 0x7F).min() > 0


def test_mul_pow2_equals_ldexp():
    """The exponent arithmetic behind MX scaling and decoding against numpy's exact
    ``ldexp``: every element value of every MX format × every e8m0 exponent (exact,
    subnormal results included), and random float32 — normal and subnormal — × every
    exponent whose product is a normal or overflows (subnormal products: same sign,
    never larger)."""
    k = np.arange(-127, 128, dtype=np.int32)
    vals = np.unique(np.concatenate([fp8core.resolve_codebook(f).values256
                                     for f in mx.MX_ELEMENT_FORMATS]))
    vals = np.concatenate([vals[np.isfinite(vals)], [-0.0, np.inf, -np.inf, np.nan]]).astype(np.float32)
    got = np.asarray(jax.jit(jq._mul_pow2)(jnp.asarray(vals)[None, :], jnp.asarray(k)[:, None]))
    with np.errstate(over="ignore"):
        want = np.ldexp(vals[None, :].astype(np.float64), k[:, None]).astype(np.float32)
    assert_bits_equal(got, want, "element values x 2**k")
    rng = np.random.default_rng(5)
    xb = np.concatenate([rng.integers(0, 0x7F800000, 3000), rng.integers(1, 0x800000, 1000)])
    xb = (xb | (rng.integers(0, 2, xb.size) << 31)).astype(np.uint32)
    x = xb.view(np.float32)
    got = np.asarray(jax.jit(jq._mul_pow2)(jnp.asarray(x)[None, :], jnp.asarray(k)[:, None]))
    with np.errstate(over="ignore"):
        want = np.ldexp(x[None, :].astype(np.float64), k[:, None]).astype(np.float32)
    normal = np.abs(want.astype(np.float64)) >= F32_TINY
    assert_bits_equal(got[normal], want[normal], "float32 x 2**k")
    sub = ~normal
    assert (np.signbit(got[sub]) == np.signbit(want[sub])).all()
    assert (np.abs(got[sub]) <= np.abs(want[sub])).all()


@pytest.mark.parametrize("fmt, mode", _diagonal([()]))
def test_scale_bytes_equal_the_rules(fmt, mode):
    """The XLA byte lookup against :func:`fp8core.mx.scale_bytes` (the rules computed
    directly) at, just below and just above every step of the table, at random absmax
    bit patterns, +0, +inf and NaN."""
    rng = np.random.default_rng(4)
    cb = fp8core.resolve_codebook(fmt)
    t = mx.byte_table(fmt, mode)[0].astype(np.int64)
    b = np.concatenate([t, t - 1, t + 1, rng.integers(0, 0x7F800001, 1000),
                        [0, 0x7F800000, 0x7FC00000]])
    a = np.clip(b, 0, 0x7FC00000).astype(np.uint32).view(np.float32)
    got = np.asarray(jq._mx_bytes(jnp.asarray(a), jq._constants(cb), f"mx_{mode}"))
    assert np.array_equal(got, mx.scale_bytes(a, cb, mode))


# ---------------------------------------------------------------- quantize_mx / dequantize_mx
@pytest.mark.parametrize("fmt, mode, dtype", _diagonal([("float32",), ("bfloat16",)]))
def test_quantize_mx_equals_reference(fmt, mode, dtype):
    x = _inputs(dtype)
    want_codes, want_scales = fp8core.quantize_mx(_f32(x), fmt, scale_mode=mode)
    codes, scales = quantize_mx(jnp.asarray(x), fmt, scale_mode=mode)
    assert_bits_equal(np.asarray(codes), want_codes, "codes")
    assert_bits_equal(np.asarray(scales), want_scales, "scales")
    for out in ("float32", "bfloat16"):
        want = fp8core.dequantize_mx(want_codes, want_scales, fmt, dtype=DTYPES[out])
        got = dequantize_mx(codes, scales, fmt, dtype=DTYPES[out])
        assert_bits_equal(np.asarray(got), want, f"dequantize_mx -> {out}")


@pytest.mark.parametrize("fmt, mode, shape, axis, block_size",
                         _diagonal([((70, 5), 0, 32), ((3, 100), -1, 32), ((2, 3, 96), -1, 64),
                                    ((130, 4), 0, 128)]))
def test_quantize_mx_axis0_partial_blocks_under_jit(fmt, mode, shape, axis, block_size):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-40, 40, shape))).astype(np.float32)
    x.reshape(-1)[:7] = 1e-40                       # subnormal inputs in a block of their own
    want_codes, want_scales = fp8core.quantize_mx(x, fmt, block_size=block_size, axis=axis,
                                                  scale_mode=mode)
    q = jax.jit(lambda v: quantize_mx(v, fmt, block_size=block_size, axis=axis, scale_mode=mode))
    codes, scales = q(jnp.asarray(x))
    assert scales.shape == mx.scales_shape(shape, block_size, axis)
    assert_bits_equal(np.asarray(codes), want_codes, "codes")
    assert_bits_equal(np.asarray(scales), want_scales, "scales")
    d = jax.jit(lambda c, s: dequantize_mx(c, s, fmt, block_size=block_size, axis=axis,
                                           dtype=jnp.bfloat16))
    want = fp8core.dequantize_mx(want_codes, want_scales, fmt, block_size=block_size, axis=axis,
                                 dtype=ml_dtypes.bfloat16)
    assert_bits_equal(np.asarray(d(codes, scales)), want, "dequantize_mx")


def test_quantize_mx_static_argnames_and_zero_gradient():
    """``jax.jit`` with the keywords static; ``x`` has a zero derivative through
    quantize_mx → dequantize_mx (as fake_quantize_operand's), not an error."""
    x = _special_blocks()[:4, :64]
    q = jax.jit(quantize_mx, static_argnames=("element_format", "block_size", "axis", "scale_mode"))
    codes, scales = q(jnp.asarray(x), element_format="e2m1", scale_mode="even")
    want_codes, want_scales = fp8core.quantize_mx(x, "e2m1", scale_mode="even")
    assert_bits_equal(np.asarray(codes), want_codes, "codes")
    assert_bits_equal(np.asarray(scales), want_scales, "scales")
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    g = jax.grad(lambda v: dequantize_mx(*quantize_mx(v, "e4m3"), "e4m3").sum())(xs)
    assert np.array_equal(np.asarray(g), np.zeros((4, 64), np.float32))
    rule = R.OperandRule("e4m3", R.block(32), "mx_floor")
    g = jax.grad(lambda v: fake_quantize_operand(v, rule).sum())(xs)
    assert np.array_equal(np.asarray(g), np.zeros((4, 64), np.float32))


# ---------------------------------------------------------------- the operand engine
OPERAND_CASES = [("block", -1, "float32", False), ("tile", 0, "bfloat16", True),
                 ("block", 0, "bfloat16", True), ("tile", -1, "float32", False)]


def _operand_input(gran: str, axis: int, dtype: str, partial: bool) -> np.ndarray:
    """The special blocks laid along the contraction axis (the transpose for axis 0);
    ``partial``: a last partial block (250 = 7·32 + 26) and, for tiles, partial rows."""
    x = _special_blocks()
    if partial:
        x = x[:45 if gran == "tile" else 48, :250]
    if axis == 0:
        x = x.T
    return np.ascontiguousarray(x).astype(DTYPES[dtype])


@both_paths
@pytest.mark.parametrize("fmt, mode, gran, axis, dtype, partial", _diagonal(OPERAND_CASES))
def test_operand_engine_mx_rules_equal_reference(fmt, mode, gran, axis, dtype, partial):
    """quantize_operand (codes, absmax; eager for axis −1, jitted for axis 0),
    dequantize_operand (float32, bfloat16) and fake_quantize_operand (jitted) under
    ``OperandRule(fmt, block(32) | tile(32), mx_<mode>)``."""
    rule = R.OperandRule(fmt, R.block(32) if gran == "block" else R.tile(32), f"mx_{mode}")
    x = _operand_input(gran, axis, dtype, partial)
    want_codes, want_absmax = ref.quantize_operand(x, rule, axis=axis)
    q = (lambda v: quantize_operand(v, rule, axis=axis))
    codes, absmax = (jax.jit(q) if axis == 0 else q)(jnp.asarray(x))
    assert_bits_equal(np.asarray(codes), want_codes, "codes")
    assert_bits_equal(np.asarray(absmax), want_absmax, "absmax")
    for out in ("float32", "bfloat16"):
        want = ref.dequantize_operand(want_codes, want_absmax, rule, axis=axis, dtype=DTYPES[out])
        got = dequantize_operand(codes, absmax, rule, axis=axis, dtype=DTYPES[out])
        assert_bits_equal(np.asarray(got), want, f"dequantize_operand -> {out}")
    want = ref.fake_quantize_operand(x, rule, axis=axis)
    got = jax.jit(lambda v: fake_quantize_operand(v, rule, axis=axis))(jnp.asarray(x))
    assert_bits_equal(np.asarray(got), want, "fake_quantize_operand")


@pytest.mark.skipif(not _ffi.available(), reason="fp8core's C kernel is not available to JAX")
def test_kernel_gate_is_scale_rule_codes(monkeypatch):
    """MX rules take the kernel path because the kernel's binding lists them, and only
    because of that: unlisted, the operand dispatch picks the XLA body."""
    monkeypatch.setattr(_kernel, "ENABLED", True)
    rule = R.OperandRule("e4m3", R.block(32), "mx_rceil")
    lay = jq._layout((4, 64), rule.granularity, -1)
    assert "mx_rceil" in _kernel.SCALE_RULE_CODES
    assert jq._operand_kernel(rule, lay, rule.format, "float32")
    assert jq._operand_kernel(rule, lay, None, "float32")
    monkeypatch.delitem(_kernel.SCALE_RULE_CODES, "mx_rceil")
    assert not jq._operand_kernel(rule, lay, rule.format, "float32")
    assert not jq._operand_kernel(rule, lay, None, "float32")


# ---------------------------------------------------------------- matmul_fp8
def _mx_recipe(fmt: str = "e4m3", mode: str = "rceil") -> R.LinearRecipe:
    rule = R.OperandRule(fmt, R.block(32), f"mx_{mode}")
    return R.LinearRecipe(input=rule, weight=rule, grad_output=rule,
                          weight_for_grad_input=R.REUSE, input_for_grad_weight=R.REUSE,
                          grad_output_for_grad_weight=R.REUSE, name=f"mx_{fmt}_{mode}")


@pytest.fixture
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@both_paths
@pytest.mark.usefixtures("_highest_precision")
@pytest.mark.parametrize("fmt, mode, dtype", [
    ("e4m3", "rceil", "float32"),
    pytest.param("e4m3", "floor", "bfloat16", marks=slow),
    pytest.param("e2m1", "even", "float32", marks=slow),
])
def test_matmul_fp8_mx_recipe_within_bound_of_reference_operands(fmt, mode, dtype):
    """out, grad_A, grad_B of an all-MX recipe vs float64 products of
    ``fp8core.reference.linear_operands``, within the float32 dot-product bound."""
    recipe = _mx_recipe(fmt, mode)
    rng = np.random.default_rng(7)
    m, k, n = 40, 96, 64
    scale = np.exp2(rng.integers(-6, 7, (m, 1)))
    A = (rng.standard_normal((m, k)) * scale).astype(DTYPES[dtype])
    A[3, :32] = 1e-40 if dtype == "float32" else 0.0
    B = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(DTYPES[dtype])
    G = (rng.standard_normal((m, n)) / 64).astype(DTYPES[dtype])

    def f(a, b, g):
        out, vjp = jax.vjp(lambda x, y: matmul_fp8(x, y, recipe=recipe), a, b)
        return (out,) + vjp(g)

    out, gA, gB = jax.jit(f)(A, B, G)
    ops = ref.linear_operands(A, B, G, recipe)
    assert_close_to_oracle(np.asarray(out), ops["input"], ops["weight"], A.dtype, "out")
    assert_close_to_oracle(np.asarray(gA), ops["grad_output"], ops["weight_for_grad_input"].T,
                           A.dtype, "grad_A")
    assert_close_to_oracle(np.asarray(gB), ops["input_for_grad_weight"].T,
                           ops["grad_output_for_grad_weight"], A.dtype, "grad_B")


# ---------------------------------------------------------------- errors
X32 = np.ones((2, 64), np.float32)
ERROR_CASES = [
    ("quantize_mx", (X32, "e4m3fnuz"), {}),
    ("quantize_mx", (X32, "bnb_e4m3"), {}),
    ("quantize_mx", (X32, "e2m1"), {"block_size": 33}),
    ("quantize_mx", (X32, "e3m2"), {"block_size": 30}),
    ("quantize_mx", (X32, "e4m3"), {"block_size": 0}),
    ("quantize_mx", (X32, "e4m3"), {"block_size": 32.0}),
    ("quantize_mx", (X32, "e4m3"), {"scale_mode": "round"}),
    ("quantize_mx", (np.ones((2, 2, 64), np.float32), "e4m3"), {"axis": 0}),
    ("quantize_mx", (np.ones((2, 64), np.int32), "e4m3"), {}),
    ("dequantize_mx", (np.zeros((2, 64), np.uint8), np.zeros((2, 3), np.uint8), "e4m3"), {}),
    ("dequantize_mx", (np.zeros((2, 64), np.uint8), np.zeros((2, 2), np.float32), "e4m3"), {}),
    ("dequantize_mx", (np.zeros((2, 64), np.uint8), np.zeros((2, 64), np.uint8), "e4m3"),
     {"axis": 0}),
    ("dequantize_mx", (np.zeros((2, 64), np.float32), np.zeros((2, 2), np.uint8), "e4m3"), {}),
    ("dequantize_mx", (np.zeros((2, 64), np.uint8), np.zeros((2, 2), np.uint8), "e5m2"),
     {"block_size": -32}),
    ("dequantize_mx", (np.zeros((2, 64), np.uint8), np.zeros((2, 2), np.uint8), "e4m3"),
     {"dtype": np.int32}),
]


@pytest.mark.parametrize("name, args, kwargs", ERROR_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ERROR_CASES)])
def test_bad_arguments_raise_the_reference_errors(name, args, kwargs):
    """The same exception type and message as fp8core's own function."""
    with pytest.raises((TypeError, ValueError)) as want:
        getattr(fp8core, name)(*args, **kwargs)
    jargs = tuple(jnp.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
    with pytest.raises(want.type, match=f"^{re.escape(str(want.value))}$"):
        getattr(jq, name)(*jargs, **kwargs)
