"""NVFP4 as scale rules of the operand engine (docs/numerics.md §13.5): ``"nvfp4"``
(torchao 0.18) and ``"nvfp4_te"`` (TransformerEngine) in ``OperandRule``, validated at
construction; the reference engine equal to the public ``quantize_nvfp4`` bit for bit
(codes, block-scale bytes from ``fp8core.nvfp4.engine_scales``, decoded values) on both
variants, block(16) along either axis and tile(16), partial blocks, special blocks; where
the engine's §3.2 flush makes it differ (a hand-worked all-subnormal tensor); torch and
JAX (both CPU paths, JAX eager and jit) equal to the reference; matmul_fp8 with NVFP4
recipes: every GEMM operand the reference's ``linear_operands`` (identity probes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import fp8core.nvfp4 as nv
import fp8core.recipe as FR
import fp8core_jax as J
import fp8core_torch as T
from fp8core import reference as ref
from fp8core.recipe import OperandRule, block, tile

from _jax_testutil import jax_path  # noqa: F401
from _torch_helpers import quant_path, to_numpy, to_torch  # noqa: F401

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

E2M1 = "float4_e2m1fn"
RULES = {f"{s}-{g}": OperandRule(E2M1, g, s) for s in nv.ENGINE_RULES for g in (block(16), tile(16))}
#: (shape, contraction axis): partial blocks / tiles (37, 21 = 16 + 5), axis 0, 3-D
SHAPES = [((24, 37), -1), ((21, 40), 0), ((2, 5, 48), -1)]


def _x(shape, special: bool, dtype=np.float32) -> np.ndarray:
    """Rows of very different magnitudes (blocks far below the amax); ``special``: a zero
    block, −0s, an inf, a NaN block, float32 subnormals beside normals."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * np.exp2(rng.uniform(-20, 20, shape[:-1] + (1,)))
    x = x.astype(np.float32)
    m = x.reshape(-1, shape[-1])
    m[0, :16] = 0.0
    m[1, :8] = -0.0
    m[2, 3:9] = [1e-40, -3e-39, 2e-45, 1e-38, 0.5, -1e-41]     # subnormals beside normals
    if special:
        m[3, 17] = np.inf
        m[5, 20] = np.nan
    return x.astype(dtype)


def _public_form(rule, shape, axis):
    """``quantize_nvfp4``'s block_size and how its block bytes lie against the engine's
    absmax grid (the engine's grid is in the operand's orientation: rows x contraction)."""
    bs = (16, 16) if rule.granularity.kind == "tile" else 16
    transpose = axis == 0
    return bs, transpose


# ------------------------------------------------------------------ rules
def test_rules_are_scale_rules_validated_at_construction():
    assert set(nv.ENGINE_RULES) <= set(FR.SCALE_RULES)
    assert OperandRule(E2M1, block(16), "nvfp4").is_nvfp4
    assert not OperandRule(E2M1, block(32), "mx_floor").is_nvfp4
    with pytest.raises(ValueError, match=r"OperandRule.scale='nvfp4'.*float8_e4m3fn.*float4_e2m1fn only"):
        OperandRule("e4m3", block(16), "nvfp4")
    for gran in (block(32), tile(32), FR.tensor(), FR.axiswise(), FR.flat(16)):
        with pytest.raises(ValueError, match=r"OperandRule.scale='nvfp4_te'.*block\(16\) or tile\(16\).*got"):
            OperandRule(E2M1, gran, "nvfp4_te")
    with pytest.raises(ValueError, match="scale must be one of .*nvfp4, nvfp4_te"):
        OperandRule(E2M1, block(16), "nvfp4_torchao")


def test_amax_reduction_with_nvfp4_slots_is_refused():
    r = OperandRule(E2M1, block(16), "nvfp4")
    with pytest.raises(ValueError, match="amax_reduction='data'.*NVFP4 slots input, weight"):
        FR.LinearRecipe(input=r, weight=r, grad_output=OperandRule("e5m2"), amax_reduction="data")


# ------------------------------------------------- reference == quantize_nvfp4
#: quantize_nvfp4's 16x16 tiles take a 2-D array: tile rules on the 2-D shapes only
_PUBLIC = [pytest.param(n, sh, ax, id=f"{n}-{sh}-ax{ax}") for n in RULES for sh, ax in SHAPES
           if RULES[n].granularity.kind == "block" or len(sh) == 2]


@pytest.mark.parametrize("special", [False, True], ids=["finite", "specials"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,shape,axis", _PUBLIC)
def test_engine_equals_public_quantize_nvfp4(name, shape, axis, dtype, special):
    """Codes, block bytes (engine_scales of the absmax grid) and decoded values equal the
    public NVFP4 functions', whose chain is tested against torchao / TE (test_nvfp4.py)."""
    rule = RULES[name]
    x = _x(shape, special, getattr(ml_dtypes, dtype, np.float32))
    variant = nv.ENGINE_RULES[rule.scale]
    bs, transpose = _public_form(rule, shape, axis)
    codes, absmax = ref.quantize_operand(x, rule, axis=axis)
    pc, ps, pt = ref.quantize_nvfp4(x, block_size=bs, axis=axis, variant=variant)
    t, sbytes, _, _ = nv.engine_scales(absmax, variant)
    assert np.array_equal(codes, pc), np.argwhere(codes != pc)[:5]
    sbytes = sbytes.T if transpose else sbytes.reshape(ps.shape)
    assert np.array_equal(sbytes, ps), np.argwhere(sbytes != ps)[:5]
    assert t.view(np.uint32) == pt.view(np.uint32)
    y = ref.dequantize_operand(codes, absmax, rule, axis=axis)
    want = ref.dequantize_nvfp4(pc, ps, pt, block_size=bs, axis=axis)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
    fq = ref.fake_quantize_operand(x, rule, axis=axis)
    assert np.array_equal(np.asarray(fq).view(np.uint8), want.astype(x.dtype).view(np.uint8))


def test_engine_scales_by_hand():
    """A 2-block grid, absmax (10, 0.02), worked by hand as §13.2: torchao t = fl(10/2688),
    block 0 s = 448 (0x7E), r = fl(fl(1/t)/448) = 0.59999996; block 1 s = 0.875 (0x36);
    TE's block 0 byte is 0x7E too and its decode scale fl(t·448) uses its own t."""
    t, b, r, d = nv.engine_scales(np.array([10, 0.02], np.float32), "torchao")
    assert t == np.float32(10) / np.float32(2688) and t.view(np.uint32) == 0x3B73CF3D
    assert list(b) == [0x7E, 0x36]
    assert r[0] == np.float32(np.float32(1) / t) / np.float32(448)
    assert d[1] == t * np.float32(0.875)
    t, b, _, d = nv.engine_scales(np.array([10, 0.02], np.float32), "te")
    assert t.view(np.uint32) == 0x3B73CF3E and list(b) == [0x7E, 0x36] and d[0] == t * np.float32(448)
    # a NaN block: byte 0x7F and NaN everywhere (tensor amax NaN); an empty grid
    _, b, r, d = nv.engine_scales(np.array([1, np.nan], np.float32), "torchao")
    assert list(b) == [0x7F, 0x7F] and np.all(r == 0) and np.all(np.isnan(d))
    assert nv.engine_scales(np.zeros((0, 3), np.float32), "te")[1].shape == (0, 3)


def test_subnormal_blocks_where_the_engine_differs():
    """§13.5: the engine's absmax stores a float32-subnormal block max as +0 (§3.2).
    With a tensor amax ≥ 2**-100 that changes nothing (such blocks get the clamp floor in
    torchao, e4m3 0 in TE, either way); an all-subnormal tensor is a zero tensor for the
    engine: torchao t = 1, byte 2**-6 (0x08), codes 0 — where quantize_nvfp4 takes
    t = fl(A/2688) (subnormal), byte 0x7E and codes ±6."""
    x = np.full((2, 32), 1e-39, np.float32)
    x[0, :16] = 2.0 ** -100
    for scale, variant in nv.ENGINE_RULES.items():
        rule = OperandRule(E2M1, block(16), scale)
        codes, absmax = ref.quantize_operand(x, rule)
        pc, ps, _ = ref.quantize_nvfp4(x, variant=variant)
        assert absmax[1, 1] == 0 and np.array_equal(codes, pc)
        assert np.array_equal(nv.engine_scales(absmax, variant)[1], ps)
    sub = np.full((1, 16), 3e-39, np.float32)
    rule = OperandRule(E2M1, block(16), "nvfp4")
    codes, absmax = ref.quantize_operand(sub, rule)
    t, b, _, _ = nv.engine_scales(absmax, "torchao")
    assert absmax[0, 0] == 0 and t == 1 and b[0, 0] == 0x08 and not codes.any()
    pc, ps, pt = ref.quantize_nvfp4(sub, variant="torchao")
    assert ps[0, 0] == 0x7E and np.all(pc == 7) and 0 < pt < np.finfo(np.float32).tiny


# ------------------------------------------------------------ backends
def _ref_all(x, rule, axis):
    codes, absmax = ref.quantize_operand(x, rule, axis=axis)
    return codes, absmax, ref.dequantize_operand(codes, absmax, rule, axis=axis), \
        ref.fake_quantize_operand(x, rule, axis=axis)


def _bits(a):
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{s}-ax{a}" for s, a in SHAPES])
@pytest.mark.parametrize("name", RULES)
def test_torch_operand_engine_equals_reference(name, shape, axis, dtype, quant_path):
    rule = RULES[name]
    x = _x(shape, True, getattr(ml_dtypes, dtype, np.float32))
    codes, absmax, y, fq = _ref_all(x, rule, axis)
    tc, ta = T.quantize_operand(to_torch(x), rule, axis=axis)
    assert np.array_equal(to_numpy(tc), codes)
    assert np.array_equal(_bits(to_numpy(ta)), _bits(absmax))
    assert np.array_equal(_bits(to_numpy(T.dequantize_operand(tc, ta, rule, axis=axis))), _bits(y))
    assert np.array_equal(_bits(to_numpy(T.fake_quantize_operand(to_torch(x), rule, axis=axis))),
                          _bits(fq))


def test_torch_kernel_path_leaves_nvfp4_to_the_ops(monkeypatch):
    """Forced onto the C kernel, NVFP4 rules still run on torch ops (the kernel's binding
    does not list them): no kernel entry point is called."""
    from fp8core import _kernel
    if _kernel._LIB is None:
        pytest.skip("fp8core's C kernel is not built")
    monkeypatch.setattr(_kernel, "ENABLED", True)
    calls = []
    monkeypatch.setattr(_kernel, "call", lambda *a, **k: calls.append(a[0]))
    x = to_torch(_x((24, 37), True))
    for rule in RULES.values():
        c, a = T.quantize_operand(x, rule)
        T.dequantize_operand(c, a, rule)
        T.fake_quantize_operand(x, rule)
    assert calls == []


#: JAX compiles three functions per (rule, shape, dtype, jit) (~0.7 s): the quick set takes
#: two rules on one shape each (both granularities, both variants), the rest is slow
_JAX_QUICK = {("nvfp4-block(16)", "bfloat16", True): 1, ("nvfp4_te-tile(16)", "float32", False): 0}


def _jax_cases():
    for name in RULES:
        for dtype in ("float32", "bfloat16"):
            for jit in (False, True):
                key = (name, dtype, jit)
                shapes = [SHAPES[_JAX_QUICK[key]]] if key in _JAX_QUICK else SHAPES
                yield pytest.param(name, dtype, jit, shapes, id=f"{name}-{dtype}-{'jit' if jit else 'eager'}",
                                   marks=() if key in _JAX_QUICK else pytest.mark.slow)


@pytest.mark.parametrize("name,dtype,jit,shapes", list(_jax_cases()))
def test_jax_operand_engine_equals_reference(name, dtype, jit, shapes, jax_path):
    rule = RULES[name]
    for shape, axis in shapes:
        x = _x(shape, True, getattr(ml_dtypes, dtype, np.float32))
        codes, absmax, y, fq = _ref_all(x, rule, axis)
        wrap = jax.jit if jit else (lambda f: f)
        jc, ja = wrap(lambda v: J.quantize_operand(v, rule, axis=axis))(jnp.asarray(x))
        assert np.array_equal(np.asarray(jc), codes)
        assert np.array_equal(_bits(ja), _bits(absmax))
        jy = wrap(lambda c, a: J.dequantize_operand(c, a, rule, axis=axis))(jc, ja)
        assert np.array_equal(_bits(jy), _bits(y))
        jf = wrap(lambda v: J.fake_quantize_operand(v, rule, axis=axis))(jnp.asarray(x))
        assert np.array_equal(_bits(jf), _bits(fq))


def test_jax_records_the_xla_decision_for_nvfp4():
    """The kernel/XLA decision is _kernel_path's (conformance records it): False for an
    NVFP4 rule even where the kernel is available."""
    from fp8core_jax import quantize as jq
    assert not jq._kernel_path(FR.OperandRule(E2M1, block(16), "nvfp4").format, jnp.float32,
                               scale="nvfp4")


def test_jax_public_nvfp4_divides_under_jit():
    """torchao's t = fl(A / 2688) and b = fl(m / 6) are true divisions under jit (XLA rewrote
    a division by a constant or a broadcast scalar into a multiply by the rounded
    reciprocal: an ulp off for ~1/4 of amaxes). 64 amaxes vs numpy's division."""
    rng = np.random.default_rng(3)
    amax = (rng.uniform(1, 2, 64) * np.exp2(rng.integers(-20, 20, 64))).astype(np.float32)
    x = np.zeros((64, 16), np.float32)
    x[:, 0] = amax
    x[:, 1] = amax * np.float32(0.37)
    f = jax.jit(lambda v: J.quantize_nvfp4(v, variant="torchao"))
    for row in x:
        c, s, t = ref.quantize_nvfp4(row[None])
        jc, js, jt = f(jnp.asarray(row[None]))
        assert np.asarray(jt).view(np.uint32) == t.view(np.uint32), row[0]
        assert np.array_equal(np.asarray(js), s) and np.array_equal(np.asarray(jc), c)


# --------------------------------------------------------- matmul_fp8
def _recipe(scale: str) -> FR.LinearRecipe:
    """X and dY in 1x16 blocks along each GEMM's contraction axis, W in 16x16 tiles (dgrad
    reuses fprop's Q(W): the tiles are orientation-free)."""
    x, w = OperandRule(E2M1, block(16), scale), OperandRule(E2M1, tile(16), scale)
    return FR.LinearRecipe(input=x, weight=w, grad_output=x, weight_for_grad_input=w,
                           input_for_grad_weight=x, grad_output_for_grad_weight=x,
                           name=f"NVFP4[{scale}]")


def _diag(ops, slot):
    d = np.diagonal(ops[slot])
    assert np.all(d == d[0]) and np.count_nonzero(ops[slot]) == d.size, slot
    return np.float32(d[0])


def _nz(v):
    v = np.asarray(v)
    return (v.astype(np.float32) + np.float32(0)).astype(v.dtype)


def _probe(run, scale):
    """Identity probes (tests/test_torch_recipe.py): with B = I, ``out = fl(Q_input(A)·r)``
    and ``grad_A = fl(Q_grad_output(g)·r')``; with A = I, ``out = fl(r''·Q_weight(B))`` and
    ``grad_B = fl(r'''·Q_grad_output_for_grad_weight(g))``; K = 37 (partial blocks/tiles)."""
    recipe = _recipe(scale)
    assert recipe.source("weight_for_grad_input") == "reuse"
    rng = np.random.default_rng(11)
    k = 37
    eye = np.eye(k, dtype=np.float32)

    def times(q, r):
        return _nz(q.astype(np.float32) * r)

    A = _x((2, 9, k), False)
    g = (rng.standard_normal((2, 9, k)) * 3).astype(np.float32)
    ops = ref.linear_operands(A, eye, g, recipe)
    out, ga, _ = run(A, eye, g, recipe)
    np.testing.assert_array_equal(_bits(out.reshape(-1, k)), _bits(times(ops["input"], _diag(ops, "weight"))))
    np.testing.assert_array_equal(_bits(ga.reshape(-1, k)), _bits(times(
        ops["grad_output"], _diag(ops, "weight_for_grad_input"))))
    B = _x((k, 20), False)
    g = (rng.standard_normal((k, 20)) * 3).astype(np.float32)
    ops = ref.linear_operands(eye, B, g, recipe)
    out, _, gb = run(eye, B, g, recipe)
    np.testing.assert_array_equal(_bits(out), _bits(times(ops["weight"], _diag(ops, "input"))))
    np.testing.assert_array_equal(_bits(gb), _bits(times(
        ops["grad_output_for_grad_weight"], _diag(ops, "input_for_grad_weight"))))


@pytest.mark.parametrize("scale", list(nv.ENGINE_RULES))
def test_torch_matmul_operands_are_the_reference_bits(scale, quant_path):
    def run(A, B, g, recipe):
        a, b = to_torch(A).requires_grad_(), to_torch(B).requires_grad_()
        out = T.matmul_fp8(a, b, recipe=recipe)
        out.backward(to_torch(g))
        return tuple(_nz(to_numpy(t)) for t in (out, a.grad, b.grad))
    _probe(run, scale)


@pytest.mark.parametrize("scale", [pytest.param("nvfp4", marks=pytest.mark.slow), "nvfp4_te"])
def test_jax_matmul_operands_are_the_reference_bits(scale, jax_path):
    def run(A, B, g, recipe):
        out, vjp = jax.vjp(lambda a, b: J.matmul_fp8(a, b, recipe=recipe), jnp.asarray(A),
                           jnp.asarray(B))
        ga, gb = vjp(jnp.asarray(g))
        return _nz(out), _nz(ga), _nz(gb)
    _probe(run, scale)


def test_linear_layers_run_nvfp4_recipes():
    """LinearFP8 in both backends with an NVFP4 recipe: the forward is matmul_fp8 of the
    layer's weight (same bits), and torch's and JAX's outputs are identical."""
    from fp8core_jax.nn import LinearFP8 as JLinear
    from flax import nnx
    recipe = _recipe("nvfp4_te")
    x = _x((6, 48), False)
    tl = T.LinearFP8(48, 20, bias=False, recipe=recipe)
    w = to_numpy(tl.weight)
    out_t = to_numpy(tl(to_torch(x)))
    want = to_numpy(T.matmul_fp8(to_torch(x), to_torch(np.ascontiguousarray(w.T)), recipe=recipe))
    np.testing.assert_array_equal(_bits(out_t), _bits(want))
    jl = JLinear(48, 20, use_bias=False, recipe=recipe, rngs=nnx.Rngs(0))
    jl.kernel[...] = jnp.asarray(w.T)
    np.testing.assert_array_equal(_bits(jl(jnp.asarray(x))), _bits(out_t))


@pytest.mark.slow
@pytest.mark.parametrize("scale", list(nv.ENGINE_RULES))
def test_torch_compiled_fullgraph_equals_eager(scale):
    """torch.compile(fullgraph=True) of a LinearFP8 with an NVFP4 recipe (K = 130: partial
    blocks and tiles): no graph break (the e2m1 tables and constants are made at import),
    forward and every gradient bit-identical to eager."""
    from _torch_helpers import assert_compiled_equals_eager
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = T.LinearFP8(130, 40, recipe=_recipe(scale))
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((3, 7, 130)).astype(np.float32)
    g_np = rng.standard_normal((3, 7, 40)).astype(np.float32)
    assert torch._dynamo.explain(layer)(to_torch(x_np)).graph_break_count == 0
    assert_compiled_equals_eager(layer, x_np, g_np, fullgraph=True)
