"""fp8core_torch's recipe engine (docs/numerics.md §9) on both CPU paths, against the
numpy reference: operand quantizers bit for bit, every GEMM operand of every preset bit
for bit (identity probes), products within the float32 accumulation bound, layers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fp8core.recipe as FR
import fp8core_torch as T
from fp8core import reference as R
from fp8core.recipe import OperandRule, axiswise, block, flat, tensor, tile

from _recipe_bounds import mlp_bounds
from _torch_helpers import (  # noqa: F401
    UNIT,
    assert_bits_equal,
    assert_compiled_equals_eager,
    assert_close,
    f64,
    mlp_errors,
    pinned_numerics,
    quant_path,
    random_input,
    to_numpy,
    to_torch,
)

#: the seed of every stochastic slot of the presets (NVFP4's dY); nearest rules ignore it
SEED = 7

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.usefixtures("quant_path")]


def _preset_rules() -> dict[str, OperandRule]:
    rules = {}
    for rec in FR.PRESETS.values():
        for slot in FR.SLOTS:
            rule = rec.rule(slot)
            if rule is not None:
                rules.setdefault(str(rule), rule)
    return rules


#: every distinct rule of the presets, and other formats / granularities / scale rules
RULES = {**_preset_rules(), **{str(r): r for r in (
    OperandRule("e5m2", block(64), "pow2"),
    OperandRule("e5m2", axiswise(), "pow2_torchao"),
    OperandRule("float8_e4m3fnuz", tile(32)),
    OperandRule("bnb_e4m3", axiswise()),
    OperandRule("e3m4", flat(100)),
    OperandRule("e2m1", block(32), "pow2"),
    OperandRule("e4m3", tensor(), "pow2"),
)}}
SHAPES = [((130, 200), -1), ((130, 200), 0), ((3, 50, 72), -1), ((256, 256), 0), ((1, 7), -1)]


def _specials(x: np.ndarray) -> np.ndarray:
    """Rows with NaN, +inf, all zeros, a float32 subnormal and a huge value."""
    x = x.copy()
    m = x.reshape(-1, x.shape[-1])
    if m.shape[0] >= 6:
        m[1, 3] = np.nan
        m[2, 0] = np.inf
        m[3] = 0
        m[4, 1] = np.float32(1e-40) if x.dtype == np.float32 else m[4, 1]
        m[5, 2] = np.float32(3e38) if x.dtype == np.float32 else m[5, 2]
    return x


DTYPES = ["float32", "bfloat16", "float16"]


def _operand_cases(full: bool):
    """Every rule × shape × dtype (``full``, slow) or, for the quick set, every rule × shape
    with the dtype rotating deterministically (each rule still sees all three dtypes)."""
    cases = []
    for i, (name, rule) in enumerate(RULES.items()):
        for j, (shape, axis) in enumerate(SHAPES):
            for k, dtype in enumerate(DTYPES):
                if full != ((i + j) % len(DTYPES) == k):
                    cases.append(pytest.param(rule, shape, axis, dtype,
                                              id=f"{name}-{shape}@{axis}-{dtype}",
                                              marks=[pytest.mark.slow] if full else []))
    return cases


@pytest.mark.parametrize("rule,shape,axis,dtype", _operand_cases(False) + _operand_cases(True))
def test_operand_quantizers_match_reference(rule, shape, axis, dtype):
    rng = np.random.default_rng(abs(hash((str(rule), shape, axis))) % 2**32)
    x = _specials(random_input(rng, shape, dtype, spread=3.0))
    want_c, want_a = R.quantize_operand(x, rule, axis=axis, seed=SEED)
    codes, absmax = T.quantize_operand(to_torch(x), rule, axis=axis, seed=SEED)
    assert_bits_equal(to_numpy(codes).view(np.uint8), want_c, "codes")
    assert_bits_equal(to_numpy(absmax), want_a, "absmax")
    want_v = R.fake_quantize_operand(x, rule, axis=axis, seed=SEED)
    assert_bits_equal(to_numpy(T.fake_quantize_operand(to_torch(x), rule, axis=axis, seed=SEED)), want_v,
                      "fake_quantize_operand")
    for out in (torch.float32, torch.bfloat16):
        got = T.dequantize_operand(codes, absmax, rule, axis=axis, dtype=out)
        want = R.dequantize_operand(want_c, want_a, rule, axis=axis,
                                    dtype="float32" if out == torch.float32 else want_v.dtype
                                    if dtype == "bfloat16" else np.float32)
        if out == torch.float32:
            assert_bits_equal(to_numpy(got), want, "dequantize_operand")


def test_transposed_operand_is_not_copied(monkeypatch):
    """A backward operand contracting over the rows of a row-major tensor (axis 0) is
    quantized in its memory layout: same bits as quantizing a transposed copy."""
    rng = np.random.default_rng(1)
    x = random_input(rng, (300, 96), "float32", spread=2.0)
    rule = OperandRule("e4m3", block(128), "pow2")
    c0, a0 = T.quantize_operand(to_torch(x), rule, axis=0)
    c1, a1 = T.quantize_operand(to_torch(np.ascontiguousarray(x.T)), rule, axis=-1)
    assert torch.equal(c0, c1.t()) and torch.equal(a0.view(torch.int32), a1.view(torch.int32))


# --------------------------------------------------------------- GEMM operands
def _diag(ops, slot):
    """The value Q gives the diagonal of an identity operand (checked to be one value)."""
    d = np.diagonal(ops[slot])
    assert np.all(d == d[0]) and np.count_nonzero(ops[slot]) == d.size, slot
    return np.float32(d[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", list(FR.PRESETS))
def test_every_gemm_operand_is_the_reference_bits(preset, dtype):
    """Identity probes. With B = I each output element is one product with the quantized
    identity's diagonal r (exact GEMM: zeros plus one product, rounded once), so
    ``out = fl(Q_input(A)·r)`` and ``grad_A = fl(Q_grad_output(g)·r')``; with A = I,
    ``out = fl(r''·Q_weight(B))`` and ``grad_B = fl(r'''·Q_grad_output_for_grad_weight(g))``.
    The expected values come from fp8core.reference.linear_operands (K = 130: partial
    1x128 blocks and 128x128 tiles). With a wgrad transform (NVFP4) the rotated identity
    is dense, so grad_B is checked by the product bound and tests/test_hadamard.py."""
    recipe = FR.PRESETS[preset]
    rng = np.random.default_rng(7)
    k = 130
    npdt = to_numpy(torch.zeros(1, dtype=getattr(torch, dtype))).dtype
    eye = np.eye(k).astype(npdt)

    def run(A, B, g):
        a, b = to_torch(A).requires_grad_(), to_torch(B).requires_grad_()
        out = T.matmul_fp8(a, b, recipe=recipe, seed=SEED)
        out.backward(to_torch(g))
        return (nz(to_numpy(t)) for t in (out, a.grad, b.grad))

    def nz(v):  # the sign of an exact zero depends on the other (zero) products' signs
        return (v.astype(np.float32) + np.float32(0)).astype(v.dtype)

    def times(q, r, dt):
        return nz((q.astype(np.float32) * r).astype(dt))

    A = random_input(rng, (2, 65, k), dtype, spread=2.0)
    g = random_input(rng, (2, 65, k), dtype, spread=2.0)
    ops = R.linear_operands(A, eye, g, recipe, seed=SEED)
    out, grad_a, _ = run(A, eye, g)
    assert_bits_equal(out.reshape(-1, k), times(ops["input"], _diag(ops, "weight"), npdt), "out")
    assert_bits_equal(grad_a.reshape(-1, k), times(
        ops["grad_output"], _diag(ops, "weight_for_grad_input"), npdt), "grad_A")

    B = random_input(rng, (k, 70), dtype, spread=2.0)
    g = random_input(rng, (k, 70), dtype, spread=2.0)
    ops = R.linear_operands(eye, B, g, recipe, seed=SEED)
    out, _, grad_b = run(eye, B, g)
    assert_bits_equal(out, times(ops["weight"], _diag(ops, "input"), npdt), "out (A = I)")
    if recipe.wgrad_transform is None:   # a rotated identity is no probe: test_hadamard.py
        assert_bits_equal(grad_b, times(ops["grad_output_for_grad_weight"],
                                        _diag(ops, "input_for_grad_weight"), npdt), "grad_B")


CASES = [((24, 96), 40), ((3, 8, 130), 200), ((5, 300), 129)]


def _product_cases():
    """preset × case × dtype × bias; in the quick set bias and dtype alternate with the case
    (every preset sees 2-D and 3-D A, with and without bias, fp32 and bf16); the rest is slow."""
    out = []
    for preset in FR.PRESETS:
        for i, (a_shape, n) in enumerate(CASES):
            for dtype in ("float32", "bfloat16"):
                for bias in (False, True):
                    quick = bias == bool(i % 2) and dtype == ("float32", "bfloat16")[i % 2]
                    out.append(pytest.param(preset, a_shape, n, dtype, bias,
                                            id=f"{preset}-{a_shape}x{n}-{dtype}-{'bias' if bias else 'nobias'}",
                                            marks=[] if quick else [pytest.mark.slow]))
    return out


@pytest.mark.parametrize("preset,a_shape,n,dtype,bias", _product_cases())
def test_products_within_accumulation_bound(preset, a_shape, n, dtype, bias):
    """out, grad_A, grad_B, grad_bias vs float64 products of the reference's quantized
    operands, within the float32 dot-product bound (+ one rounding to the output dtype)."""
    recipe = FR.PRESETS[preset]
    rng = np.random.default_rng(len(a_shape) * 100 + n)
    k = a_shape[-1]
    A = random_input(rng, a_shape, dtype, spread=1.0)
    B = random_input(rng, (k, n), dtype, spread=1.0)
    g = random_input(rng, (*a_shape[:-1], n), dtype, spread=1.0)
    bv = random_input(rng, (n,), dtype, spread=1.0) if bias else None
    ops = {s: f64(v) for s, v in R.linear_operands(A, B, g, recipe, seed=SEED).items()}
    a, b = to_torch(A).requires_grad_(), to_torch(B).requires_grad_()
    bt = to_torch(bv).requires_grad_() if bias else None
    out = T.matmul_fp8(a, b, recipe=recipe, bias=bt, seed=SEED)
    out.backward(to_torch(g))
    want = ops["input"] @ ops["weight"] + (f64(bv) if bias else 0)
    bound = np.abs(ops["input"]) @ np.abs(ops["weight"]) + (np.abs(f64(bv)) if bias else 0)
    assert_close(out.reshape(-1, n), want, bound, k, dtype, "out")
    wd = ops["weight_for_grad_input"]
    assert_close(a.grad.reshape(-1, k), ops["grad_output"] @ wd.T,
                 np.abs(ops["grad_output"]) @ np.abs(wd.T), n, dtype, "grad_A")
    x, gw = ops["input_for_grad_weight"], ops["grad_output_for_grad_weight"]
    m = x.shape[0]
    assert_close(b.grad, x.T @ gw, np.abs(x.T) @ np.abs(gw), m, dtype, "grad_B")
    if bias:
        g2 = f64(g.astype(np.float32)).reshape(-1, n)
        assert_close(bt.grad, g2.sum(0), np.abs(g2).sum(0), m, dtype, "grad_bias")


# ---------------------------------------------------------------------- layers
@pytest.mark.parametrize("preset", list(FR.PRESETS))
def test_mlp_tracks_fp32_twin(preset):
    """1024 -> 2048 -> 1024 with GELU, batch 10: each preset vs fp32 with the same weights
    (mean |output error| < 0.05; mean |weight-/bias-grad error| < 2e-5; 4x for 4-bit
    recipes, tests/_recipe_bounds.py)."""
    out_err, w_err, b_err = mlp_errors(lambda m: T.convert_to_fp8(m, recipe=preset), preset)
    out_bound, grad_bound = mlp_bounds(preset)
    assert out_err < out_bound, out_err
    assert w_err < grad_bound, w_err
    assert b_err < grad_bound, b_err


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_bnb_layers_are_their_presets(mode):
    """LinearFP8Mixed/Global == LinearFP8(recipe=BNB_MIXED/BNB_GLOBAL), bit for bit."""
    torch.manual_seed(0)
    legacy = {"mixed": T.LinearFP8Mixed, "global": T.LinearFP8Global}[mode](96, 40)
    new = T.LinearFP8(96, 40, recipe=f"BNB_{mode.upper()}")
    new.load_state_dict(legacy.state_dict())
    x = torch.randn(3, 7, 96)
    outs = []
    for layer in (legacy, new):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.pow(2).sum().backward()
        outs.append((out, xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*outs):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_flat_blocks_spanning_rows_warn_once():
    layer = T.LinearFP8Mixed(192, 64)          # bsz 256 > 192: blocks span tokens
    with pytest.warns(UserWarning, match=r"flat blocks of 256 elements, which span rows"):
        layer(torch.randn(4, 192))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 192))              # once per layer
        T.LinearFP8Mixed(256, 64)(torch.randn(4, 256))   # no spanning: no warning
        T.LinearFP8(192, 64, recipe="ROWWISE")(torch.randn(4, 192))


def test_rowwise_tokens_are_independent():
    """The motivating bug: with BNB_MIXED at K=192 one token's values move another's
    output; with ROWWISE (axiswise along K) they cannot."""
    torch.manual_seed(0)
    x = torch.randn(8, 192)
    x2 = x.clone()
    x2[5] *= 50
    for recipe, independent in (("ROWWISE", True), ("BLOCKWISE_1x128", True), ("BNB_MIXED", False)):
        layer = T.LinearFP8(192, 64, recipe=recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            same = torch.equal(layer(x)[4], layer(x2)[4])
        assert same == independent, recipe


def test_convert_to_fp8_with_recipe():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    keys = list(model.state_dict())
    T.convert_to_fp8(model, recipe=FR.ROWWISE, module_filter_fn=lambda m, fqn: fqn != "2")
    assert type(model[0]) is T.LinearFP8 and model[0].recipe is FR.ROWWISE
    assert type(model[2]) is nn.Linear
    assert list(model.state_dict()) == keys
    assert "recipe=ROWWISE" in repr(model[0])
    with pytest.raises(ValueError, match=r"recipe='ROWWISE' cannot be combined with mode"):
        T.convert_to_fp8(model, "mixed", recipe="ROWWISE")


def test_bad_recipes_raise_at_construction():
    with pytest.raises(ValueError, match=r"unknown recipe 'rowise'; presets: BNB_MIXED, BNB_GLOBAL"):
        T.LinearFP8(4, 4, recipe="rowise")
    with pytest.raises(TypeError, match=r"recipe must be a LinearRecipe .* got a Codebook"):
        T.LinearFP8(4, 4, recipe=FR.OperandRule("e4m3").format)
    with pytest.raises(TypeError, match=r"recipe must be a LinearRecipe"):
        T.matmul_fp8(torch.ones(2, 4), torch.ones(4, 3), recipe="e4m3".encode())
    with pytest.raises(TypeError, match=r"rule must be an fp8core.recipe.OperandRule"):
        T.quantize_operand(torch.ones(2, 4), FR.TENSORWISE)
    tiled = FR.BLOCKWISE_1x128.replace(input=OperandRule("e4m3", tile(4), "pow2"),
                                       input_for_grad_weight=OperandRule("e4m3", tile(4), "pow2"))
    with pytest.raises(ValueError, match=r"input=float8_e4m3fn/tile\(4\), pow2 uses 2-D tiles, but A is 1-D"):
        T.matmul_fp8(torch.ones(4), torch.ones(4, 3), recipe=tiled)
    layer = T.LinearFP8(8, 4, recipe="ROWWISE")
    with pytest.raises(ValueError, match=r"input has 9 features .* LinearFP8\(in_features=8"):
        layer(torch.ones(2, 9))


@pytest.mark.slow
@pytest.mark.parametrize("preset", [
    pytest.param(p, marks=pytest.mark.xfail(
        strict=True, reason="known bug: under torch.compile the stochastic dY of NVFP4 gives "
                            "other codes than eager (grad_x differs; no graph break) — open"))
    if FR.PRESETS[p].stochastic_slots else p for p in FR.PRESETS])
def test_compiled_fullgraph_equals_eager(preset):
    """torch.compile(fullgraph=True) of a LinearFP8 (K = 130: partial blocks and tiles):
    no graph break, forward and every gradient bit-identical to eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = T.LinearFP8(130, 40, recipe=preset)
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((3, 7, 130)).astype(np.float32)
    g_np = rng.standard_normal((3, 7, 40)).astype(np.float32)
    assert torch._dynamo.explain(layer)(to_torch(x_np)).graph_break_count == 0
    assert_compiled_equals_eager(layer, x_np, g_np, fullgraph=True)


@pytest.mark.parametrize("rule", [OperandRule("e4m3", tensor(), "pow2"),
                                  OperandRule("e4m3", tensor(), "pow2_torchao"),
                                  OperandRule("float8_e4m3fnuz", flat(), "pow2_torchao"),
                                  OperandRule("e4m3", flat(64), "pow2")], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_huge_groups_under_power_of_two_scales(rule, dtype):
    """Groups with absmax near FLT_MAX (and no NaN) under a power-of-two rule: dscale is
    then ~2**120, beyond the e4m3 decode's folded 2**8 (found by the conformance suite's
    'huge' distribution on torch[ops], which gave inf and NaN)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((130, 200)) * 3e37).astype(np.float32)
    x[0, 0] = 3.3e38
    x = x.astype(to_numpy(torch.zeros(1, dtype=getattr(torch, dtype))).dtype)
    for axis in (-1, 0):
        want = R.fake_quantize_operand(x, rule, axis=axis)
        assert_bits_equal(to_numpy(T.fake_quantize_operand(to_torch(x), rule, axis=axis)), want, "fake")
        codes, absmax = T.quantize_operand(to_torch(x), rule, axis=axis)
        assert_bits_equal(to_numpy(T.dequantize_operand(codes, absmax, rule, axis=axis,
                                                        dtype=getattr(torch, dtype))), want, "dequantize")
