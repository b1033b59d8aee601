"""Recipes on the JAX backend (docs/numerics.md §9): the operand quantizers against the
reference bit for bit, matmul_fp8 / LinearFP8 for every preset against float64 products
of ``fp8core.reference.linear_operands`` (float32 accumulation bound,
``_jax_testutil.assert_close_to_oracle``), the bitsandbytes layers as presets, the
two-layer MLP against its float32 twin, the warn-once rule and bad inputs.

The numerics run on both CPU paths (the C kernel as custom calls, and the XLA body
GPU/TPU lower) through the ``jax_path`` fixture; layer plumbing runs on the default
path. Inputs come from numpy and a seed. The quick set (< 60 s on 2 cores) takes each
preset rule / preset once per path on one case (a diagonal of the case table); the
full crosses are marked slow.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fp8core
import fp8core.recipe as R
from fp8core import reference as ref
from fp8core_jax import matmul as jm
from fp8core_jax import (dequantize_operand, fake_quantize_operand, matmul_fp8, matmul_fp8_global,
                         matmul_fp8_mixed, quantize_operand)
from fp8core_jax.nn import LinearFP8, LinearFP8Global, LinearFP8Mixed, convert_to_fp8
from _recipe_bounds import mlp_bounds
from _jax_testutil import (DTYPES, assert_bits_equal, assert_close_to_oracle, jax_path,  # noqa: F401
                           mlp_errors)

both_paths = pytest.mark.usefixtures("jax_path")
slow = pytest.mark.slow
#: the seed of every stochastic slot of the presets (NVFP4's dY); nearest rules ignore it
SEED = 7


def _diagonal(items, cases, ids, fast_items=None):
    """``item × case`` params: item i with case ``i % len(cases)`` quick (for items in
    ``fast_items``, default all), every other pair marked slow."""
    out = []
    for i, item in enumerate(items):
        for j, case in enumerate(cases):
            quick = j == i % len(cases) and (fast_items is None or item in fast_items)
            out.append(pytest.param(item, *case, marks=() if quick else (slow,),
                                    id=f"{ids(item)}-{'-'.join(map(str, case))}"))
    return out


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _input(rng, shape, dtype, special=False):
    """Rows of different magnitudes (2**-6 … 2**6); ``special``: a zero row, a −0 row,
    NaN, +inf, float32 subnormals and a huge value, each in its own rows."""
    lead = shape[:-1] if len(shape) > 1 else ()
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-6, 7, size=lead + (1,)))
    if special:
        m = x.reshape(-1, shape[-1])
        huge = 6e4 if dtype == "float16" else 1e38
        m[1] = 0.0
        m[2] = -0.0
        m[3, 5] = np.nan
        m[4, 7] = np.inf
        m[5, :9] = 1e-40
        m[6, 2] = huge
    with np.errstate(over="ignore"):
        return x.astype(DTYPES[dtype])


# ------------------------------------------------------------------ operands
def _preset_rules():
    rules = {}
    for recipe in R.PRESETS.values():
        for slot in R.SLOTS:
            rule = recipe.rule(slot)
            if rule is not None:
                rules[str(rule)] = rule
    return list(rules.values())


PRESET_RULES = _preset_rules()
RULES = PRESET_RULES + [
    R.OperandRule("e4m3", R.flat(48)),                         # flat blocks spanning rows
    R.OperandRule("e5m2", R.axiswise()),
    R.OperandRule("e4m3", R.tile(16), "pow2_torchao"),
    R.OperandRule("e5m2", R.tensor(), "pow2"),
    R.OperandRule("bnb_e4m3", R.block(32)),                    # a table codebook
    R.OperandRule("float8_e4m3fnuz", R.tile(32)),              # one zero, NaN fill 0x80
]
#: (shape, axis, dtype, special values): partial blocks and tiles everywhere (150, 70
#: are no multiples of 16, 32, 48 or 128); axis 0 is the backward GEMMs' orientation.
OPERAND_CASES = [
    ((70, 150), -1, "float32", False),
    ((70, 150), 0, "bfloat16", True),
    ((3, 5, 150), -1, "float16", True),
    ((150,), -1, "float32", False),
]


@both_paths
@pytest.mark.parametrize("rule, shape, axis, dtype, special",
                         _diagonal(RULES, OPERAND_CASES, str, fast_items=PRESET_RULES))
def test_operand_quantizers_bit_identical_to_reference(rule, shape, axis, dtype, special):
    x = _input(np.random.default_rng(len(shape) * 7 + axis), shape, dtype, special)
    codes, absmax = ref.quantize_operand(x, rule, axis=axis, seed=SEED)
    jc, ja = quantize_operand(x, rule, axis=axis, seed=SEED)
    what = f"{rule} {shape} axis={axis} {dtype}"
    assert_bits_equal(np.asarray(jc), codes, f"codes {what}")
    assert_bits_equal(np.asarray(ja), absmax, f"absmax {what}")
    assert_bits_equal(np.asarray(dequantize_operand(codes, absmax, rule, axis=axis, dtype=x.dtype)),
                      ref.dequantize_operand(codes, absmax, rule, axis=axis, dtype=x.dtype),
                      f"dequantize {what}")
    assert_bits_equal(np.asarray(jax.jit(lambda v: fake_quantize_operand(v, rule, axis=axis, seed=SEED))(x)),
                      ref.fake_quantize_operand(x, rule, axis=axis, seed=SEED), f"fake_quantize {what}")


@pytest.mark.parametrize("jax_path", ["kernel"], indirect=True)
def test_kernel_path_serves_every_granularity(jax_path, monkeypatch):
    """On the kernel path every operand goes through a custom call (traced fresh: shapes
    used nowhere else): flat blocks and tiles that are runs of the flattening through
    ``_ffi.quantize``, other tiles (axis-0 operands included) through ``_ffi.quantize_tiles``."""
    from fp8core_jax import _ffi

    calls = []
    for name in ("quantize", "quantize_tiles", "dequantize", "dequantize_tiles"):
        def spy(*args, _orig=getattr(_ffi, name), _name=name, **kwargs):
            calls.append(_name)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(_ffi, name, spy)
    cases = [
        (R.OperandRule("e4m3", R.tile(16), "pow2"), (41, 53), -1, "tiles"),
        (R.OperandRule("e4m3", R.axiswise(), "pow2_torchao"), (43, 51), 0, "tiles"),
        (R.OperandRule("e5m2", R.block(16)), (45, 50), -1, "tiles"),   # partial block per row
        (R.OperandRule("e5m2", R.block(10)), (45, 50), -1, ""),        # runs of 10
        (R.OperandRule("e4m3", R.tensor(), "pow2"), (47, 49), 0, ""),
        (R.OperandRule("e4m3", R.flat(48)), (47, 49), 0, ""),
    ]
    for rule, shape, axis, kind in cases:
        x = _input(np.random.default_rng(9), shape, "float32")
        calls.clear()
        codes, absmax = quantize_operand(x, rule, axis=axis)
        y = dequantize_operand(codes, absmax, rule, axis=axis)
        assert calls == ["quantize" + ("_" + kind if kind else ""),
                         "dequantize" + ("_" + kind if kind else "")], (str(rule), axis, calls)
        want = ref.quantize_operand(x, rule, axis=axis)
        assert_bits_equal(np.asarray(codes), want[0], f"codes {rule}")
        assert_bits_equal(np.asarray(y), ref.dequantize_operand(*want, rule, axis=axis), f"{rule}")


@both_paths
def test_operand_empty_and_zero_derivative():
    rule = R.OperandRule("e4m3", R.tile(8), "pow2")
    codes, absmax = quantize_operand(np.zeros((0, 5), np.float32), rule)
    assert codes.shape == (0, 5) and absmax.shape == (0, 1)
    x = _input(np.random.default_rng(3), (20, 30), "float32")
    g = jax.grad(lambda v: fake_quantize_operand(v, rule, axis=0).sum())(x)
    assert np.array_equal(np.asarray(g), np.zeros_like(x))


# ------------------------------------------------------------------ matmul_fp8
#: (A shape, N, A dtype, B dtype, bias, jit): K = 200 and N = 136 are no multiples of
#: 128, so every preset has partial blocks and tiles; the cases cross 2-D/3-D, bias,
#: float32/bfloat16/float16 (B of another dtype: quantized in its own, then cast to A's)
#: and jit/eager.
MATMUL_CASES = [
    ((6, 200), 136, "float32", "float32", True, True),
    ((2, 5, 200), 136, "bfloat16", "bfloat16", False, False),
    ((2, 5, 200), 136, "float32", "float32", False, True),
    ((6, 200), 136, "bfloat16", "bfloat16", True, False),
    ((3, 4, 200), 136, "float16", "float32", True, True),
]


@both_paths
@pytest.mark.parametrize("preset, a_shape, n, dtype, b_dtype, bias, jit",
                         _diagonal(list(R.PRESETS), MATMUL_CASES, str))
def test_products_within_accumulation_bound(preset, a_shape, n, dtype, b_dtype, bias, jit):
    """out, grad_A, grad_B, grad_bias vs float64 products of the reference's quantized
    operands (linear_operands), within the float32 dot-product bound."""
    recipe = R.PRESETS[preset]
    rng = np.random.default_rng(len(a_shape) * 100 + n)
    k = a_shape[-1]
    A = _input(rng, a_shape, dtype)
    B = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(DTYPES[b_dtype])
    G = (_input(rng, a_shape[:-1] + (n,), "float32") / 64).astype(DTYPES[dtype])
    bv = rng.standard_normal(n).astype(np.float32) if bias else None

    def f(a, b, bb, g):
        out, vjp = jax.vjp(lambda x, y, z: matmul_fp8(x, y, recipe=preset, bias=z, seed=SEED), a, b, bb)
        return (out,) + vjp(g)

    out, gA, gB, gb = (jax.jit(f) if jit else f)(A, B, bv, G)
    ops = ref.linear_operands(A, B, G, recipe, seed=SEED)
    m = int(np.prod(a_shape[:-1]))
    assert_close_to_oracle(np.asarray(out).reshape(m, n), ops["input"], ops["weight"], A.dtype,
                           f"{preset} out", bias=bv)
    assert_close_to_oracle(np.asarray(gA).reshape(m, k), ops["grad_output"],
                           ops["weight_for_grad_input"].T, A.dtype, f"{preset} grad_A")
    assert gA.shape == A.shape and gB.shape == B.shape and np.asarray(gB).dtype == B.dtype
    # grad_B is computed in A's dtype, then cast to B's (exact for a wider B)
    assert_close_to_oracle(np.asarray(gB).astype(A.dtype), ops["input_for_grad_weight"].T,
                           ops["grad_output_for_grad_weight"], A.dtype, f"{preset} grad_B")
    if bias:
        g2 = G.astype(np.float32).reshape(m, n)
        assert_close_to_oracle(np.asarray(gb)[None], np.ones((1, m)), g2, np.float32,
                               f"{preset} grad_bias")
        assert gb.shape == (n,)


@pytest.mark.parametrize("preset", list(R.PRESETS))
def test_residuals_follow_recipe_saved(preset):
    """What the forward keeps: uint8 codes + absmax where backward reuses the quantized
    value, else the tensor itself (LinearRecipe.saved)."""
    recipe = R.PRESETS[preset]
    A = _input(np.random.default_rng(0), (8, 64), "float32")
    B = np.ones((64, 32), np.float32)
    _, (x_res, w_res, _) = jm._f_fwd(A, B, None, recipe, "float32")
    saved = recipe.saved(True, True)
    for res, form, t in ((x_res, saved["X"], A), (w_res, saved["W"], B)):
        if form == "codes":
            codes, absmax = res
            assert codes.dtype == np.uint8 and codes.shape == t.shape and absmax.dtype == np.float32
        else:
            assert form == "hp" and res.shape == t.shape and res.dtype == t.dtype


@slow
def test_transforms_agree():
    """vmap (each example its own call: own scales) == a loop; checkpoint == plain grad,
    for a recipe with tiles and backward re-quantization (BLOCKWISE_1x128)."""
    rng = np.random.default_rng(4)
    A = _input(rng, (3, 6, 200), "float32")
    B = (rng.standard_normal((200, 136)) / 14).astype(np.float32)

    def loss(a, b):
        return (matmul_fp8(a, b, recipe="BLOCKWISE_1x128") ** 2).sum()

    grad = jax.grad(loss, argnums=(0, 1))
    gA_v, gB_v = jax.vmap(grad, in_axes=(0, None))(A, B)
    for i in range(3):
        gA, gB = grad(A[i], B)
        assert_bits_equal(np.asarray(gA_v[i]), np.asarray(gA), f"vmap grad_A {i}")
        np.testing.assert_allclose(gB_v[i], gB, rtol=1e-6, atol=1e-6)
    gA_c, _ = jax.grad(jax.checkpoint(loss), argnums=(0, 1))(A[0], B)
    assert_bits_equal(np.asarray(gA_c), np.asarray(grad(A[0], B)[0]), "checkpoint grad_A")


@both_paths
@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_bnb_functions_and_layers_are_their_presets(mode):
    """matmul_fp8_mixed/global == matmul_fp8(recipe=BNB_*), LinearFP8Mixed/Global ==
    LinearFP8(recipe=BNB_*), bit for bit (values and gradients)."""
    rng = np.random.default_rng(5)
    A = _input(rng, (3, 7, 96), "float32")
    B = (rng.standard_normal((96, 40)) / 10).astype(np.float32)
    legacy_fn = {"mixed": matmul_fp8_mixed, "global": matmul_fp8_global}[mode]
    name = f"BNB_{mode.upper()}"
    vg = [jax.value_and_grad(lambda a, b: (fn(a, b) ** 2).sum(), argnums=(0, 1))(A, B)
          for fn in (legacy_fn, lambda a, b: matmul_fp8(a, b, recipe=name))]
    for got, want in zip(jax.tree.leaves(vg[0]), jax.tree.leaves(vg[1])):
        assert_bits_equal(np.asarray(got), np.asarray(want), name)
    legacy = {"mixed": LinearFP8Mixed, "global": LinearFP8Global}[mode](96, 40, rngs=nnx.Rngs(1))
    new = LinearFP8(96, 40, recipe=name, rngs=nnx.Rngs(1))
    assert legacy.recipe == new.recipe == R.PRESETS[name]
    legacy.bias[...] = new.bias[...] = jnp.asarray(rng.standard_normal(40).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 96 features in blocks of 128: the rows warning
        outs = [nnx.value_and_grad(lambda m_: (m_(A) ** 2).sum())(layer) for layer in (legacy, new)]
    for got, want in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        assert_bits_equal(np.asarray(got), np.asarray(want), f"{name} layer")


# ------------------------------------------------------------------ layers
def test_linear_fp8_like_nnx_linear():
    lin = nnx.Linear(20, 30, rngs=nnx.Rngs(7))
    fp8 = LinearFP8(20, 30, rngs=nnx.Rngs(7))
    assert fp8.recipe is R.TENSORWISE
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(getattr(lin, name)[...], getattr(fp8, name)[...])
    assert set(nnx.state(fp8, nnx.Param).keys()) == {"kernel", "bias"}
    nb = LinearFP8(20, 30, recipe=R.ROWWISE, use_bias=False, param_dtype=jnp.bfloat16,
                   rngs=nnx.Rngs(0))
    assert nb.bias is None and nb.kernel[...].dtype == jnp.bfloat16
    assert nb(jnp.ones((2, 20), jnp.float16)).dtype == jnp.float16     # the input's dtype
    x = _input(np.random.default_rng(1), (4, 20), "float32")
    want = matmul_fp8(x, fp8.kernel[...], recipe="TENSORWISE", bias=fp8.bias[...])
    assert_bits_equal(np.asarray(nnx.jit(lambda m_, v: m_(v))(fp8, x)), np.asarray(want), "layer")


def test_convert_to_fp8_with_recipe():
    net = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.gelu,
                         nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
    kernel = net.layers[0].kernel
    convert_to_fp8(net, recipe="rowwise", module_filter_fn=lambda m_, fqn: fqn != "layers.2")
    assert type(net.layers[0]) is LinearFP8 and net.layers[0].recipe is R.ROWWISE
    assert net.layers[0].kernel is kernel and type(net.layers[2]) is nnx.Linear
    assert net(jnp.ones((3, 16))).shape == (3, 8)
    legacy = convert_to_fp8(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))     # mode defaults to "mixed"
    assert type(legacy) is LinearFP8Mixed and legacy.recipe == R.BNB_MIXED
    for kwargs in (dict(mode="global"), dict(fw_format="e4m3"), dict(bsz=64)):
        with pytest.raises(ValueError, match="cannot be combined with"):
            convert_to_fp8(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), recipe="TENSORWISE", **kwargs)
    with pytest.raises(ValueError, match="unknown recipe 'FP4'"):
        convert_to_fp8(net, recipe="FP4")


def test_flat_blocks_spanning_rows_warn_once():
    layer = LinearFP8Mixed(100, 64, rngs=nnx.Rngs(0))    # bsz 128 > 100: blocks span tokens
    x = jnp.ones((3, 100))
    with pytest.warns(UserWarning, match=r"flat blocks of 128 elements, which span rows") as rec:
        layer(x)
        nnx.jit(lambda m_, v: m_(v))(layer, x)           # a new trace of the same layer
        nnx.grad(lambda m_: m_(x).sum())(layer)
    assert len([w for w in rec if "span rows" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinearFP8Mixed(100, 64, rngs=nnx.Rngs(0))(jnp.ones((100,)))      # one row: no warning
        LinearFP8Mixed(128, 64, rngs=nnx.Rngs(0))(jnp.ones((3, 128)))   # rows of whole blocks
        LinearFP8(100, 64, recipe="BLOCKWISE_1x128", rngs=nnx.Rngs(0))(x)
    with pytest.warns(UserWarning, match="span rows"):                  # another instance warns
        LinearFP8Mixed(100, 64, rngs=nnx.Rngs(0))(x)


# ------------------------------------------------------------------ MLP
#: presets whose MLP check runs with the slow tests only (the quick set keeps one of each
#: kind: bitsandbytes, per tensor, axiswise, blocks and tiles, MX 8- and 4-bit)
_MLP_SLOW = {"BNB_GLOBAL", "ROWWISE_WITH_GW_HP", "MXFP8_FLOOR", "NVFP4"}
@pytest.mark.parametrize("jax_path", ["kernel", pytest.param("xla", marks=slow)], indirect=True)
@pytest.mark.parametrize("preset", [p if p not in _MLP_SLOW else pytest.param(p, marks=slow)
                                    for p in R.PRESETS])
def test_two_layer_mlp_close_to_fp32_twin(preset, jax_path):
    """test_jax_nn's MLP (1024 → 2048 → 1024, GELU, batch 10, loss mean(out)) per preset:
    mean |output error| < 0.05, mean |kernel-/bias-grad error| of the first layer < 2e-5
    (4x for 4-bit recipes, tests/_recipe_bounds.py)."""
    e = mlp_errors(recipe=preset)
    print(f"{preset} [{jax_path}]: mean|out err|={e['mean_out']:.3g} (max {e['max_out']:.3g}) "
          f"mean|W grad err|={e['mean_kernel_grad']:.3g} (max {e['max_kernel_grad']:.3g}) "
          f"mean|b grad err|={e['mean_bias_grad']:.3g} (max {e['max_bias_grad']:.3g})")
    out_bound, grad_bound = mlp_bounds(preset)
    assert e["mean_out"] < out_bound, e
    assert e["mean_kernel_grad"] < grad_bound, e
    assert e["mean_bias_grad"] < grad_bound, e


# ------------------------------------------------------------------ bad input
_TILE_X = R.LinearRecipe(input=R.OperandRule("e4m3", R.tile(32)), weight=R.OperandRule("e4m3"),
                         grad_output=R.OperandRule("e5m2"), name="TILE_X")
F32 = np.float32


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((np.ones(64, F32), np.ones((64, 8), F32)), dict(recipe=_TILE_X), ValueError,
         r"recipe TILE_X: input=float8_e4m3fn/tile\(32\) uses 2-D tiles, but A is 1-D"),
        ((np.ones((2, 4), F32), np.ones((4, 8), F32)), dict(recipe="e4m3"), ValueError,
         "unknown recipe 'e4m3'"),
        ((np.ones((2, 4), F32), np.ones((4, 8), F32)), dict(recipe=fp8core.resolve_codebook("e4m3")),
         TypeError, "a codebook belongs in OperandRule"),
        ((np.ones((2, 4), F32), np.ones((4, 8), F32)), dict(recipe=3), TypeError,
         "recipe must be a LinearRecipe"),
        ((np.ones((2, 4), F32), np.ones((5, 8), F32)), dict(recipe="ROWWISE"), ValueError,
         "A's last dim must equal"),
        ((np.ones((2, 4), np.int32), np.ones((4, 8), F32)), dict(recipe="ROWWISE"), TypeError,
         "A must be a floating"),
        ((np.ones((2, 4), F32), np.ones((4, 8), F32)), dict(recipe="ROWWISE", bias=np.ones(4, F32)),
         ValueError, r"bias must have shape \(8,\)"),
    ],
    ids=["tile-on-1d", "format-as-recipe", "codebook-as-recipe", "int-recipe", "K", "int-A", "bias"],
)
def test_matmul_fp8_bad_input_raises_at_trace_time(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        matmul_fp8(*args, **kwargs)
    with pytest.raises(exc, match=match):
        jax.jit(lambda a, b: matmul_fp8(a, b, **kwargs)).trace(*args)


def test_operand_and_layer_bad_input():
    x = np.ones((4, 6), F32)
    rule = R.OperandRule("e4m3", R.block(4))
    with pytest.raises(TypeError, match="rule must be an fp8core.recipe.OperandRule, got str"):
        quantize_operand(x, "e4m3")
    with pytest.raises(TypeError, match="rule must be an fp8core.recipe.OperandRule"):
        fake_quantize_operand(x, R.TENSORWISE)
    with pytest.raises(ValueError, match="axis .* must be the last axis, or 0 of a 2-D array"):
        quantize_operand(np.ones((2, 3, 4), F32), rule, axis=0)
    with pytest.raises(ValueError, match=r"absmax must have shape \(4, 2\)"):
        dequantize_operand(np.zeros((4, 6), np.uint8), np.zeros((4, 1), F32), rule)
    with pytest.raises(TypeError, match="codes must have dtype uint8"):
        dequantize_operand(x, np.zeros((4, 2), F32), rule)
    layer = LinearFP8(8, 4, recipe="ROWWISE", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"7 features .*\(in_features=8, out_features=4\)"):
        layer(jnp.ones((2, 7)))
    with pytest.raises(TypeError, match="inputs must be a floating"):
        layer(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="inputs is 1-D"):
        LinearFP8(32, 4, recipe=_TILE_X, rngs=nnx.Rngs(0))(jnp.ones((32,)))
    with pytest.raises(TypeError, match="a codebook belongs in OperandRule"):
        LinearFP8(8, 4, recipe=fp8core.resolve_codebook("e5m2"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown recipe"):
        LinearFP8(8, 4, recipe="MXFP8_TYPO", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ API parity
@pytest.mark.parametrize("name", ["quantize_operand", "dequantize_operand", "fake_quantize_operand"])
def test_operand_functions_share_the_reference_signature(name):
    import inspect

    import fp8core_jax

    def params(fn):
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(fp8core_jax, name)) == params(getattr(ref, name))


def test_recipe_api_matches_torch():
    """matmul_fp8, convert_to_fp8 and the operand functions take the same parameters
    (names, kinds) in fp8core_torch; the layers expose ``recipe``."""
    import inspect

    torch = pytest.importorskip("torch", reason="torch is not installed")
    import fp8core_jax
    import fp8core_jax.nn
    import fp8core_torch

    def params(fn):
        return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]

    for name in ("matmul_fp8", "quantize_operand", "dequantize_operand", "fake_quantize_operand"):
        assert params(getattr(fp8core_jax, name)) == params(getattr(fp8core_torch, name)), name
    assert params(fp8core_jax.nn.convert_to_fp8) == params(fp8core_torch.convert_to_fp8)
    t = fp8core_torch.LinearFP8(96, 40, recipe="ROWWISE", device=torch.device("meta"))
    j = fp8core_jax.nn.LinearFP8(96, 40, recipe="ROWWISE", rngs=nnx.Rngs(0))
    assert t.recipe is j.recipe is R.ROWWISE
    assert (t.in_features, t.out_features) == (j.in_features, j.out_features)


# ------------------------------------------------------------- identity probes
_PROBE_QUICK = {("BLOCKWISE_1x128", "float32")}  # tiles, blocks, re-quantized and reused slots


@both_paths
@pytest.mark.parametrize("preset,dtype", [
    pytest.param(p, d, id=f"{p}-{d}", marks=() if (p, d) in _PROBE_QUICK else (slow,))
    for p in R.PRESETS for d in ("float32", "bfloat16")])
def test_every_gemm_operand_is_the_reference_bits(preset, dtype):
    """As tests/test_torch_recipe.py: with B = I each output element is one product with
    the quantized identity's diagonal r (zeros plus one exact product, rounded once), so
    ``out = fl(Q_input(A)·r)`` and ``grad_A = fl(Q_grad_output(g)·r')``; with A = I,
    ``out = fl(r''·Q_weight(B))`` and ``grad_B = fl(r'''·Q_grad_output_for_grad_weight(g))``
    — every GEMM operand inside the custom VJP pinned to fp8core.reference.linear_operands
    (K = 130: partial 1x128 blocks and 128x128 tiles). Zeros compared without sign (a
    GEMM's exact zero takes the sign of the other zero products)."""
    recipe = R.PRESETS[preset]
    rng = np.random.default_rng(7)
    k = 130
    npdt = np.dtype(DTYPES[dtype])
    eye = np.eye(k).astype(npdt)

    def nz(v):
        v = np.asarray(v)
        return (v.astype(np.float32) + np.float32(0)).astype(v.dtype)

    def run(A, B, g):
        out, vjp = jax.vjp(lambda a, b: matmul_fp8(a, b, recipe=recipe, seed=SEED), jnp.asarray(A),
                           jnp.asarray(B))
        ga, gb = vjp(jnp.asarray(g))
        return nz(out), nz(ga), nz(gb)

    def diag(ops, slot):
        d = np.diagonal(ops[slot])
        assert np.all(d == d[0]) and np.count_nonzero(ops[slot]) == d.size, slot
        return np.float32(d[0])

    def times(q, r):
        return nz((q.astype(np.float32) * r).astype(npdt))

    def rand(shape):
        x = rng.standard_normal(shape) * np.exp2(rng.integers(-2, 3, size=shape[:-1] + (1,)))
        return x.astype(npdt)

    A, g = rand((2, 65, k)), rand((2, 65, k))
    ops = ref.linear_operands(A, eye, g, recipe, seed=SEED)
    out, grad_a, _ = run(A, eye, g)
    assert_bits_equal(out.reshape(-1, k), times(ops["input"], diag(ops, "weight")), "out")
    assert_bits_equal(grad_a.reshape(-1, k),
                      times(ops["grad_output"], diag(ops, "weight_for_grad_input")), "grad_A")
    B, g = rand((k, 70)), rand((k, 70))
    ops = ref.linear_operands(eye, B, g, recipe, seed=SEED)
    out, _, grad_b = run(eye, B, g)
    assert_bits_equal(out, times(ops["weight"], diag(ops, "input")), "out (A = I)")
    if recipe.wgrad_transform is None:   # a rotated identity is no probe: test_hadamard.py
        assert_bits_equal(grad_b, times(ops["grad_output_for_grad_weight"],
                                        diag(ops, "input_for_grad_weight")), "grad_B")
