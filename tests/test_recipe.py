"""fp8core.recipe and the §9 reference: validation, presets, plans, and hand-worked
examples of the granularities and scale rules (docs/numerics.md §9)."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

import fp8core
import fp8core.recipe as FR
from fp8core import reference as R
from fp8core.recipe import OperandRule, axiswise, block, flat, tensor, tile

E4M3 = ml_dtypes.float8_e4m3fn


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("make,exc,msg", [
    (lambda: block(0), ValueError, r"block size must be a positive int, got 0"),
    (lambda: tile(-3), ValueError, r"tile size must be a positive int, got -3"),
    (lambda: block(2.5), TypeError, r"block size must be a positive int, got float: 2.5"),
    (lambda: FR.Granularity("rows"), ValueError, r"kind must be one of tensor, axiswise, block, tile, flat, got 'rows'"),
    (lambda: FR.Granularity("axiswise", 4), ValueError, r"'axiswise' takes no size"),
    (lambda: OperandRule("e8m0"), ValueError, r"OperandRule.format: float8_e8m0fnu is a scale-only format"),
    (lambda: OperandRule("e4m4"), ValueError, r"OperandRule.format: unknown format 'e4m4'"),
    (lambda: OperandRule(FR.TENSORWISE), TypeError, r"OperandRule.format must be a codebook .* got a LinearRecipe"),
    (lambda: OperandRule("e4m3", "axiswise"), TypeError, r"OperandRule.granularity must be a Granularity"),
    (lambda: OperandRule("e4m3", scale="pow3"), ValueError, r"OperandRule.scale must be one of fp32, pow2, pow2_torchao, mx_floor, mx_ceil, mx_even, mx_rceil, nvfp4, nvfp4_te, got 'pow3'"),
    (lambda: OperandRule("bnb_e4m3", scale="pow2"), ValueError, r"needs a native format"),
    (lambda: FR.TENSORWISE.replace(input=FR.REUSE), ValueError, r"LinearRecipe.input='reuse': only the backward slots"),
    (lambda: FR.TENSORWISE.replace(weight=OperandRule("e4m3").format), TypeError, r"LinearRecipe.weight must be an OperandRule, None or 'reuse', got Codebook"),
    (lambda: FR.TENSORWISE.replace(grad_output=None), ValueError, r"the dgrad GEMM quantizes one operand and not the other"),
    (lambda: FR.LinearRecipe(None, None, None, FR.REUSE), ValueError, r"weight_for_grad_input='reuse' needs LinearRecipe.weight to be an OperandRule"),
    (lambda: FR.get_recipe("blockwise"), ValueError, r"unknown recipe 'blockwise'; presets: BNB_MIXED, BNB_GLOBAL, TENSORWISE, ROWWISE, ROWWISE_WITH_GW_HP, BLOCKWISE_1x128, MXFP8, MXFP8_FLOOR, MXFP4, NVFP4"),
    (lambda: FR.get_recipe(fp8core.resolve_codebook("e4m3")), TypeError, r"got a Codebook; a codebook belongs in OperandRule"),
    (lambda: FR.get_recipe(3), TypeError, r"recipe must be a LinearRecipe or a preset name"),
    (lambda: fp8core.quantize_blockwise(np.ones(4, np.float32), FR.ROWWISE, 2), TypeError,
     r"codebook must be a format name, a Codebook or 256 table values, got a LinearRecipe; recipes go to recipe="),
    (lambda: fp8core.fake_quantize(np.ones(4, np.float32), FR.ROWWISE.input), TypeError,
     r"got an OperandRule; .* operand rules to quantize_operand"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_values_raise_naming_the_field(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def test_recipes_are_frozen_hashable_and_named_lookups_work():
    assert hash(FR.ROWWISE) == hash(dataclasses.replace(FR.ROWWISE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        FR.ROWWISE.input = None
    assert FR.get_recipe("rowwise") is FR.ROWWISE
    assert {FR.BNB_MIXED: 1}[FR.bnb_recipe("mixed")] == 1
    assert FR.bnb_recipe("mixed", bsz=64).name == "bnb_mixed"


def test_presets_as_their_sources_define_them():
    """Slot by slot: torchao 0.18 Float8LinearRecipeName (float8/config.py) and
    TransformerEngine Float8BlockScaling / DeepSeek-V3 §3.3 (hand-copied definitions)."""
    e4, e5 = "float8_e4m3fn", "float8_e5m2"

    def row(r):
        return None if r is None else r if isinstance(r, str) else (r.format.name, str(r.granularity), r.scale)

    want = {
        "TENSORWISE": [(e4, "tensor", "fp32")] * 2 + [(e5, "tensor", "fp32"), (e4, "tensor", "fp32"),
                                                      (e4, "tensor", "fp32"), (e5, "tensor", "fp32")],
        "ROWWISE": [(e4, "axiswise", "pow2_torchao")] * 6,
        "ROWWISE_WITH_GW_HP": [(e4, "axiswise", "pow2_torchao")] * 3 + [(e4, "tensor", "pow2_torchao"), None, None],
        "BLOCKWISE_1x128": [(e4, "block(128)", "pow2"), (e4, "tile(128)", "pow2"), (e4, "block(128)", "pow2"),
                            (e4, "tile(128)", "pow2"), (e4, "block(128)", "pow2"), (e4, "block(128)", "pow2")],
        "BNB_MIXED": [(e4, "flat()", "fp32"), (e4, "tensor", "fp32"), (e5, "flat()", "fp32"), "reuse", None, None],
        "BNB_GLOBAL": [(e4, "tensor", "fp32"), (e4, "tensor", "fp32"), (e5, "tensor", "fp32"), "reuse", "reuse", "reuse"],
        # TransformerEngine MXFP8BlockScaling(fp8_format=E4M3): 1-D 1x32 blocks, E8M0 scale of
        # float_to_e8m0(amax / max_norm) rounded up (= torchao RCEIL); OCP MX v1.0 FLOOR variant
        "MXFP8": [(e4, "block(32)", "mx_rceil")] * 6,
        "MXFP8_FLOOR": [(e4, "block(32)", "mx_floor")] * 6,
        # OCP MX v1.0 MXFP4: E2M1 elements, 32-element blocks, the spec's (FLOOR) shared exponent
        "MXFP4": [("float4_e2m1fn", "block(32)", "mx_floor")] * 6,
        # TransformerEngine NVFP4BlockScaling(): fp4_quant_fwd_inp (1-D, RHT columnwise),
        # fp4_quant_fwd_weight (2-D 16x16), fp4_quant_bwd_grad (1-D, SR, RHT columnwise)
        "NVFP4": [("float4_e2m1fn", "block(16)", "nvfp4_te"), ("float4_e2m1fn", "tile(16)", "nvfp4_te"),
                  ("float4_e2m1fn", "block(16)", "nvfp4_te"), "reuse",
                  ("float4_e2m1fn", "block(16)", "nvfp4_te"), ("float4_e2m1fn", "block(16)", "nvfp4_te")],
    }
    assert set(want) == set(FR.PRESETS)
    for name, slots in want.items():
        assert [row(getattr(FR.PRESETS[name], s)) for s in FR.SLOTS] == slots, name
    assert FR.NVFP4.stochastic_slots == ("grad_output", "grad_output_for_grad_weight")
    assert FR.NVFP4.wgrad_transform == "rht16"
    assert {n for n, r in FR.PRESETS.items() if r.wgrad_transform or r.stochastic_slots} == {"NVFP4"}


def test_sources_and_saved_residuals():
    """Requantizing a tensor/tile rule in the other orientation gives the same groups, so
    backward reuses the forward's codes; axiswise/block along another axis re-quantizes."""
    src = {n: [r.source(s) for s in FR.REUSE_SOURCE] for n, r in FR.PRESETS.items()}
    assert src["TENSORWISE"] == ["reuse"] * 3
    assert src["ROWWISE"] == ["quantize"] * 3
    assert src["BLOCKWISE_1x128"] == ["reuse", "quantize", "quantize"]
    assert src["BNB_MIXED"] == ["reuse", "hp", "hp"]
    assert src["MXFP8"] == src["MXFP4"] == ["quantize"] * 3  # 1-D blocks: every orientation anew
    assert FR.MXFP8.saved(True, True) == {"X": "hp", "W": "hp"}
    assert FR.BLOCKWISE_1x128.saved(True, True) == {"X": "hp", "W": "codes"}
    assert FR.BNB_GLOBAL.saved(True, False) == {"X": None, "W": "codes"}


# ----------------------------------------------------------------------- plans
def test_plans_partial_blocks_and_tiles():
    p = fp8core.plan_operand(3, 200, block(128))
    assert p.kind == "tiles" and p.scale_shape == (3, 2) and p.tiles.pad_cols == 56
    p = fp8core.plan_operand(130, 300, tile(128))
    assert p.scale_shape == (2, 3) and (p.tiles.pad_rows, p.tiles.pad_cols) == (126, 84)
    assert fp8core.plan_operand(5, 7, axiswise()).scale_shape == (5, 1)
    assert fp8core.plan_operand(5, 7, tensor()).is_global
    p = fp8core.plan_operand(10, 192, flat())             # bitsandbytes: select_block_size(192)
    assert p.flat.blocksize == 256 and p.scale_shape == (8,) and p.spans_rows
    assert not fp8core.plan_operand(10, 256, flat()).spans_rows
    assert fp8core.plan_tiles(130, 300, 128, 128).transposed().grid == (3, 2)


# ------------------------------------------------------- hand-worked reference
def test_block_groups_never_cross_rows():
    """block(4) on a 2x6 operand: groups [0:4], [4:6] of each row (partial at the row end)."""
    x = np.array([[1, 2, 3, 4, 100, 6], [8, 1, 1, 1, 0.5, 0.25]], np.float32)
    _, absmax = R.quantize_operand(x, OperandRule("e4m3", block(4)))
    np.testing.assert_array_equal(absmax, [[4, 100], [8, 0.5]])
    _, absmax = R.quantize_operand(x, OperandRule("e4m3", flat(4)))   # bitsandbytes' flat blocks
    np.testing.assert_array_equal(absmax, [4, 100, 1])                # [1 2 3 4][100 6 8 1][1 1 .5 .25]


def test_tiles_and_axis0():
    """tile(2) of a 3x5 matrix: a 2x3 grid of tiles, partial at the bottom and right;
    axis=0 quantizes the transposed operand (groups along the rows)."""
    x = np.arange(15, dtype=np.float32).reshape(3, 5) - 7
    _, absmax = R.quantize_operand(x, OperandRule("e4m3", tile(2)))
    want = [[max(abs(x[r:r + 2, c:c + 2]).max(), 0) for c in (0, 2, 4)] for r in (0, 2)]
    np.testing.assert_array_equal(absmax, want)
    codes, absmax = R.quantize_operand(x, OperandRule("e4m3", axiswise()), axis=0)
    np.testing.assert_array_equal(absmax[:, 0], np.abs(x).max(axis=0))
    assert codes.shape == x.shape
    np.testing.assert_array_equal(
        R.dequantize_operand(codes, absmax, OperandRule("e4m3", axiswise()), axis=0),
        R.fake_quantize_operand(x.T.copy(), OperandRule("e4m3", axiswise())).T)


def test_pow2_scale_by_hand():
    """absmax 3: q0 = fl(448/3) = 149.33 -> 2**7 = 128, dscale 2**-7 exactly; 3 -> 384 (a
    code), 1 -> 128, 0.3 -> 38.4 rounds to 40 (e4m3 step 4 in [32, 64)) -> 40/128."""
    x = np.array([[3.0, 1.0, 0.3, -0.0]], np.float32)
    rule = OperandRule("e4m3", axiswise(), "pow2")
    codes, absmax = R.quantize_operand(x, rule)
    q, d = R.operand_scales(absmax, rule)
    assert (q[0, 0], d[0, 0]) == (128.0, 2.0**-7)
    np.testing.assert_array_equal(codes.view(E4M3).astype(np.float32), [[384, 128, 40, -0.0]])
    y = R.dequantize_operand(codes, absmax, rule)
    np.testing.assert_array_equal(y, np.float32([[3, 1, 40 / 128, -0.0]]))
    assert np.signbit(y[0, 3])
    # the fp32 rule on the same row: qscale = fl(448/3), dscale = fl(3 * fl(1/448))
    q, d = R.operand_scales(absmax, OperandRule("e4m3", axiswise()))
    assert q[0, 0] == np.float32(448) / np.float32(3)
    assert d[0, 0] == np.float32(3) * (np.float32(1) / np.float32(448))


@pytest.mark.parametrize("k", [10, 40, -20])
def test_pow2_torchao_rounds_up_just_below_a_power_of_two(k):
    """torchao's exp2(floor(log2(q0))) in float32 rounds q0 = 2**k·(1 - j·2**-24) up to
    2**k for small j; the exact rule never does. Absmax values just above 448/2**k give
    q0 a few ulps below 2**k. The oracle is float64 log2 rounded to float32 (a correctly
    rounded float32 log2) — independent of the threshold table the rule uses."""
    a = np.float32(448.0 / 2.0**k)
    seen_up = seen_down = 0
    for _ in range(400):
        a = np.nextafter(a, np.float32(np.inf))
        q0 = np.float32(448) / a
        if q0 >= np.float32(2.0**k):
            continue
        want_torchao = np.float32(2.0 ** math.floor(np.float32(math.log2(float(q0)))))
        got_t, d_t = R.operand_scales(np.float32([a]), OperandRule("e4m3", tensor(), "pow2_torchao"))
        got_e, d_e = R.operand_scales(np.float32([a]), OperandRule("e4m3", tensor(), "pow2"))
        assert got_t[0] == want_torchao and d_t[0] == 1 / want_torchao, (k, a, q0)
        assert got_e[0] == np.float32(2.0 ** (k - 1)) and d_e[0] == np.float32(2.0 ** (1 - k))
        seen_up += bool(want_torchao == 2.0**k)
        seen_down += bool(want_torchao == 2.0 ** (k - 1))
    assert seen_up and seen_down, (seen_up, seen_down)   # both sides of torchao's threshold


def test_pow2_huge_values_may_overflow_like_the_peers():
    """Under a power-of-two rule an element within half a quantum of FLT_MAX dequantizes
    to inf (dscale = 1/qscale ≥ a/M); TransformerEngine's block scaling does the same.
    The fp32 rule keeps it finite (§3.3)."""
    x = np.float32([[3.4e38, 1.0]])
    assert np.isinf(R.fake_quantize_operand(x, OperandRule("e4m3", axiswise(), "pow2"))[0, 0])
    assert np.isfinite(R.fake_quantize_operand(x, OperandRule("e4m3", axiswise()))[0, 0])


def test_bnb_presets_are_todays_functions():
    """BNB_MIXED's X operand is quantize_blockwise over the flattening; BNB_GLOBAL's is global."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 192)).astype(np.float32)
    c, a = R.quantize_operand(x, FR.BNB_MIXED.input)
    c2, a2 = R.quantize_blockwise(x, "e4m3", 256)
    assert np.array_equal(c, c2) and np.array_equal(a, a2)
    c, a = R.quantize_operand(x, FR.BNB_GLOBAL.input)
    c2, a2 = R.quantize_global(x, "e4m3")
    assert np.array_equal(c, c2) and np.array_equal(a.reshape(()), a2)
