"""matmul_fp8_mixed / matmul_fp8_global vs a float64 numpy oracle built from the
reference's quantized operands (docs/numerics.md §6).

The forward is piecewise constant, so finite differences say nothing; the
backward is checked against its documented formulas instead (jax.vjp vs the
oracle). Tolerance (``_jax_testutil.assert_close_to_oracle``): float32 accumulation
over K terms, ``|got - want| <= K * 2**-23 * (|a| @ |b|) + eps_out * |want| + subnormal_out / 2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8core
import fp8core.recipe
from fp8core import reference as ref
from fp8core_jax import matmul as jm
from fp8core_jax.matmul import matmul_fp8_global, matmul_fp8_mixed
from _jax_testutil import DTYPES, assert_close_to_oracle, jax_path  # noqa: F401

pytestmark = pytest.mark.usefixtures("jax_path")

F32 = np.float32


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _operands(a_shape, n, a_dtype, b_dtype, seed=0):
    rng = np.random.default_rng(seed)
    k = a_shape[-1]
    A = (rng.standard_normal(a_shape) * 2).astype(DTYPES[a_dtype])
    B = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(DTYPES[b_dtype])
    G = (rng.standard_normal(a_shape[:-1] + (n,)) * 1e-3).astype(DTYPES[a_dtype])
    return A, B, G


def oracle(mode, A, B, G, fw="e4m3", bw="e5m2", bsz=-1, bsz2=-1):
    """Quantized operands of the three products, from the numpy reference."""
    k, n = B.shape
    bsz = fp8core.select_block_size(k) if bsz == -1 else bsz
    bsz2 = fp8core.select_block_size(n) if bsz2 == -1 else bsz2
    b_q = ref.fake_quantize(B, fw).astype(A.dtype)
    if mode == "mixed":
        a_q = ref.fake_quantize(A, fw, bsz)
        g_q = ref.fake_quantize(G, bw, bsz2)
        return dict(out=(a_q, b_q), grad_A=(g_q, b_q.T),
                    grad_B=(A.reshape(-1, k).T, G.reshape(-1, n)))
    a_q = ref.fake_quantize(A, fw)
    g_q = ref.fake_quantize(G, bw)
    return dict(out=(a_q, b_q), grad_A=(g_q, b_q.T),
                grad_B=(a_q.reshape(-1, k).T, g_q.reshape(-1, n)))


FNS = {"mixed": matmul_fp8_mixed, "global": matmul_fp8_global}
CASES = [
    ("mixed", (4, 96), 40, "float32", "float32"),
    ("mixed", (2, 3, 130), 70, "float32", "float32"),   # leading dims, blocks span rows
    ("mixed", (5, 64), 33, "bfloat16", "bfloat16"),
    ("mixed", (5, 64), 33, "float16", "float32"),       # B of another dtype
    ("global", (4, 96), 40, "float32", "float32"),
    ("global", (2, 3, 130), 70, "float16", "float16"),
    ("global", (6, 64), 33, "bfloat16", "float32"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode, a_shape, n, a_dtype, b_dtype", CASES, ids=str)
def test_forward_and_vjp_match_float64_oracle(mode, a_shape, n, a_dtype, b_dtype, jit):
    A, B, G = _operands(a_shape, n, a_dtype, b_dtype)
    fn = FNS[mode]

    def f(a, b, g):
        out, vjp = jax.vjp(fn, a, b)
        return (out,) + vjp(g)

    out, gA, gB = (jax.jit(f) if jit else f)(A, B, G)
    o = oracle(mode, A, B, G)
    assert_close_to_oracle(out, *o["out"], A.dtype, f"{mode} out")
    assert_close_to_oracle(gA, *o["grad_A"], A.dtype, f"{mode} grad_A")
    assert gA.shape == A.shape and gB.shape == B.shape
    assert np.asarray(gB).dtype == B.dtype
    # grad_B is computed in A's dtype and cast to B's dtype
    assert_close_to_oracle(np.asarray(gB).astype(A.dtype), *o["grad_B"], A.dtype, f"{mode} grad_B")


@pytest.mark.parametrize("fmts", [("e4m3", "e5m2"), ("bnb_e4m3", "bnb_e5m2"),
                                  ("float8_e4m3fnuz", "float4_e2m1fn")], ids=str)
@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_other_formats_and_block_sizes(mode, fmts):
    A, B, G = _operands((3, 100), 50, "float32", "float32", seed=1)
    fw, bw = fmts
    out, vjp = jax.vjp(lambda a, b: FNS[mode](a, b, fw, bw, 64, 32), A, B)
    gA, gB = vjp(G)
    o = oracle(mode, A, B, G, fw, bw, 64, 32)
    assert_close_to_oracle(out, *o["out"], A.dtype, "out")
    assert_close_to_oracle(gA, *o["grad_A"], A.dtype, "grad_A")
    assert_close_to_oracle(gB, *o["grad_B"], A.dtype, "grad_B")
    # the same codebook as a Codebook object, or (legacy maps) as its 256 values
    fw2 = fp8core.resolve_codebook(fw)
    fw2 = fw2.values if fw.startswith("bnb") else fw2
    out2 = FNS[mode](A, B, fw2, fp8core.resolve_codebook(bw), 64, 32)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_transforms_agree(mode):
    """grad / value_and_grad / jit / checkpoint / vmap give the same results."""
    A, B, G = _operands((4, 64), 48, "float32", "float32", seed=2)
    fn = FNS[mode]

    def loss(a, b):
        return jnp.sum(fn(a, b) * G)

    l0, (ga0, gb0) = jax.value_and_grad(loss, argnums=(0, 1))(A, B)
    ga1, gb1 = jax.jit(jax.grad(loss, argnums=(0, 1)))(A, B)
    ga2, gb2 = jax.grad(jax.checkpoint(loss), argnums=(0, 1))(A, B)
    o = oracle(mode, A, B, G)
    assert_close_to_oracle(ga0, *o["grad_A"], A.dtype, "value_and_grad grad_A")
    assert_close_to_oracle(gb0, *o["grad_B"], A.dtype, "value_and_grad grad_B")
    for ga, gb in ((ga1, gb1), (ga2, gb2)):
        np.testing.assert_allclose(ga, ga0, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(gb, gb0, rtol=1e-6, atol=1e-9)
    # vmap: each example is its own call (own scales, own blocks)
    As = np.stack([A, A * 3, A / 7])
    Gs = np.stack([G, G, G * 5])
    outs, vjp = jax.vjp(jax.vmap(fn, in_axes=(0, None)), As, B)
    gAs, gBs = vjp(Gs)
    gB_sum = 0
    for i in range(3):
        oi = oracle(mode, As[i], B, Gs[i])
        assert_close_to_oracle(outs[i], *oi["out"], A.dtype, f"vmap out {i}")
        assert_close_to_oracle(gAs[i], *oi["grad_A"], A.dtype, f"vmap grad_A {i}")
        gB_sum = gB_sum + np.asarray(oi["grad_B"][0], np.float64) @ np.asarray(oi["grad_B"][1], np.float64)
    np.testing.assert_allclose(gBs, gB_sum, rtol=1e-5, atol=1e-6)


def test_residuals_are_small():
    """Global keeps uint8 codes + one scale each (never A or B); Mixed keeps A + B's codes."""
    A, B, _ = _operands((8, 64), 32, "float32", "float32")
    _, res = jm._f_fwd(A, B, None, fp8core.recipe.BNB_GLOBAL, "float32")
    assert [(r.dtype, r.shape) for r in jax.tree.leaves(res)] == [
        (np.uint8, A.shape), (np.float32, (1, 1)), (np.uint8, B.shape), (np.float32, (1, 1))]
    _, res = jm._f_fwd(A, B, None, fp8core.recipe.bnb_recipe("mixed", bsz=64, bsz2=64), "float32")
    assert [(r.dtype, r.shape) for r in jax.tree.leaves(res)] == [
        (np.float32, A.shape), (np.uint8, B.shape), (np.float32, (1, 1))]


def test_nan_and_inf_propagate():
    A, B, G = _operands((4, 64), 8, "float32", "float32")
    A = A.copy()
    A[1, 3] = np.inf
    out = np.asarray(matmul_fp8_mixed(A, B))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2, 3]]).all()  # block 64 = one row
    assert np.isnan(np.asarray(matmul_fp8_global(A, B))).all()


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((np.ones((3, 4), F32), np.ones((5, 2), F32)), ValueError, "A's last dim must equal"),
        ((np.ones((3, 4), F32), np.ones((4,), F32)), ValueError, "B must be 2-D"),
        ((np.ones((3, 4), np.int32), np.ones((4, 2), F32)), TypeError, "A must be a floating"),
        ((np.ones((3, 4), F32), np.ones((4, 2), bool)), TypeError, "B must be a floating"),
        ((np.ones((3, 4), F32), np.ones((4, 2), F32), "e9m9"), ValueError, "fw_format: unknown"),
        ((np.ones((3, 4), F32), np.ones((4, 2), F32), "e4m3", 3), TypeError, "bw_format must be"),
        ((np.ones((3, 4), F32), np.ones((4, 2), F32), "e4m3", "e5m2", 0), ValueError, "bsz must be"),
        ((np.ones((3, 4), F32), np.ones((4, 2), F32), "e4m3", "e5m2", -1, 1.5), TypeError, "bsz2"),
    ],
)
@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_bad_input_raises_at_trace_time(mode, args, exc, match):
    with pytest.raises(exc, match=match):
        FNS[mode](*args)
    with pytest.raises(exc, match=match):
        jax.jit(lambda a, b: FNS[mode](a, b, *args[2:])).trace(*args[:2])
