"""One test (at least) per rule of docs/numerics.md, against the numpy reference.

Oracles: ml_dtypes' own casts, hand-worked examples, float64 math, and the
contract's float32 sequence re-evaluated element by element with numpy scalars.
"""

import ml_dtypes
import numpy as np
import pytest

import fp8core
from fp8core import reference as ref
from fp8core import resolve_codebook

F32 = np.float32
NATIVE8 = fp8core.NATIVE_8BIT_FORMATS
ELEMENT = fp8core.ELEMENT_FORMATS
TABLES = tuple(fp8core.LEGACY_NAMES)
FLT_MAX = np.finfo(np.float32).max
TINY = np.finfo(np.float32).smallest_normal


def bits(a):
    a = np.asarray(a, np.float32)
    out = a.view(np.uint32).copy()
    out[np.isnan(a)] = 0x7FC00000
    return out


def assert_same_bits(actual, expected):
    np.testing.assert_array_equal(bits(actual), bits(expected))


# §1 / §3.5 ------------------------------------------------------------------

@pytest.mark.parametrize("name", ELEMENT)
@pytest.mark.parametrize("scale", [1.0, 2.0**-20, 2.0**-3, 2.0**7, 2.0**40])
def test_every_finite_code_round_trips(name, scale):
    """dequantize(quantize(v·s)) == v·s for every finite code value v."""
    cb = resolve_codebook(name)
    v = np.unique(cb.values[cb.finite])  # includes ±M, so absmax = M·s
    x = (v * F32(scale)).astype(np.float32)
    codes, absmax = ref.quantize_global(x, cb)
    assert absmax == F32(cb.max * F32(scale))
    assert_same_bits(ref.dequantize_global(codes, absmax, cb), x)
    assert_same_bits(cb.values[codes], v)  # and the codes are those of v
    # blockwise: every block holds ±M·s so its scale is exactly s
    blocks = np.concatenate([np.concatenate([[cb.max * F32(scale)], x[i:i + 31]]) for i in range(0, x.size, 31)])
    codes, absmax = ref.quantize_blockwise(blocks.astype(np.float32), cb, 32)
    assert_same_bits(ref.dequantize_blockwise(codes, absmax, cb, 32), blocks)


def _midpoint_probes(cb):
    v = np.unique(cb.values[cb.finite]).astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    if cb.is_native:  # native midpoints are float32 values; table midpoints need not be
        assert np.array_equal(mids.astype(np.float64), (v[:-1] + v[1:]) / 2)
    up = np.nextafter(mids, F32(np.inf))
    down = np.nextafter(mids, F32(-np.inf))
    return np.concatenate([mids, up, down, v.astype(np.float32), F32([-0.0])])


@pytest.mark.parametrize("name", NATIVE8)
def test_ties_exhaustive_match_ml_dtypes(name):
    """Every midpoint between adjacent finite values, and its float32 neighbours,
    quantizes where ml_dtypes casts it (round half to even)."""
    cb = resolve_codebook(name)
    probes = _midpoint_probes(cb)
    probes = probes[np.abs(probes) <= cb.max]
    x = np.concatenate([[cb.max], probes]).astype(np.float32)  # absmax M -> qscale exactly 1
    codes, absmax = ref.quantize_global(x, cb)
    assert absmax == cb.max
    expected = x.astype(cb.format.ml_dtype).view(np.uint8)
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize("name", ELEMENT + TABLES)
def test_threshold_search_equals_reference_rounding(name):
    """The searchsorted form (§3.5) that backends use equals the reference's rounding."""
    cb = resolve_codebook(name)
    probes = _midpoint_probes(cb)
    rng = np.random.default_rng(0)
    probes = np.concatenate([probes, rng.uniform(-cb.max, cb.max, 20000).astype(np.float32)])
    probes = np.clip(probes, -cb.max, cb.max)
    expected = ref.round_to_codes(probes, cb)
    codes = cb.sorted_codes[np.searchsorted(cb.thresholds, probes, side="left")]
    if cb.negzero_code is not None:
        codes = np.where(np.signbit(probes) & (cb.values[codes] == 0), np.uint8(cb.negzero_code), codes)
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.parametrize("name", TABLES)
def test_table_ties_go_to_the_lower_entry(name):
    cb = resolve_codebook(name)
    v = np.unique(cb.values).astype(np.float64)
    exact = np.flatnonzero(((v[:-1] + v[1:]) / 2).astype(np.float32) == (v[:-1] + v[1:]) / 2)
    j = exact[-1]  # a pair of positive entries whose midpoint is a float32
    lo, hi = F32(v[j]), F32(v[j + 1])
    mid = F32((v[j] + v[j + 1]) / 2)
    x = np.float32([1.0, mid, np.nextafter(mid, F32(2))])  # absmax 1 -> qscale 1
    codes, _ = ref.quantize_global(x, cb)
    assert cb.values[codes[1]] == lo and cb.values[codes[2]] == hi
    # equal entries (two zeros) resolve to the lowest code
    codes, _ = ref.quantize_global(np.float32([1.0, 0.0, -0.0, 1e-30]), cb)
    zero_codes = np.flatnonzero(cb.values == 0)
    assert set(codes[1:]) == {zero_codes[0]}


# §2 --------------------------------------------------------------------------

def test_inputs_upcast_to_float32_first_and_output_cast_once():
    rng = np.random.default_rng(1)
    x16 = rng.standard_normal(4096).astype(np.float16)
    xb = rng.standard_normal(4096).astype(np.float32).astype(ml_dtypes.bfloat16)
    for x in (x16, xb):
        c1, a1 = ref.quantize_blockwise(x, "e4m3", 256)
        c2, a2 = ref.quantize_blockwise(x.astype(np.float32), "e4m3", 256)
        np.testing.assert_array_equal(c1, c2)
        assert_same_bits(a1, a2)
        y = ref.fake_quantize(x, "e4m3", 256)
        assert y.dtype == x.dtype
        expected = ref.dequantize_blockwise(c2, a2, "e4m3", 256).astype(x.dtype)  # one final cast
        np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))


def test_no_intermediate_bf16_double_rounding():
    """Casting f32 -> bf16 -> e4m3 differs from f32 -> e4m3 on ~2% of values;
    the contract (and so the reference) takes the direct path."""
    rng = np.random.default_rng(2)
    s = rng.uniform(-448, 448, 200_000).astype(np.float32)
    direct = s.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    double = s.astype(ml_dtypes.bfloat16).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert 0.005 < np.mean(direct != double) < 0.05
    x = np.concatenate([[F32(448)], s]).astype(np.float32)  # qscale 1
    codes, _ = ref.quantize_global(x, "e4m3")
    np.testing.assert_array_equal(codes[1:], direct)


def test_float64_input_is_rounded_to_float32_first():
    x = np.array([1 / 3, 2.0**-140, 1e39, -0.1], np.float64)[:2]
    c64, a64 = ref.quantize_global(x, "e5m2")
    c32, a32 = ref.quantize_global(x.astype(np.float32), "e5m2")
    np.testing.assert_array_equal(c64, c32)
    assert ref.fake_quantize(x, "e5m2").dtype == np.float64


# §3.3 / §3.4 -----------------------------------------------------------------

def test_hand_worked_example_e4m3fn():
    # absmax 3 -> qscale = fl(448/3) = 149.33333; s = [74.67, -149.33, 448]
    # e4m3fn steps: 8 in [64,128) -> 72; 16 in [128,256) -> 144; 448 -> 448
    codes, absmax = ref.quantize_global(np.float32([0.5, -1.0, 3.0]), "e4m3")
    np.testing.assert_array_equal(codes, [0x69, 0xF1, 0x7E])  # 72, -144, 448 as bit patterns
    assert absmax == F32(3.0)
    y = ref.dequantize_global(codes, absmax, "e4m3")
    np.testing.assert_allclose(y.astype(np.float64), [72 * 3 / 448, -144 * 3 / 448, 3.0], rtol=2**-22)


def test_scale_sequence_is_one_division_per_group_then_multiplies():
    """Re-evaluate §3.3-§4.3 element by element with numpy float32 scalars."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(300) * 10.0 ** rng.uniform(-3, 3, 300)).astype(np.float32)
    cb = resolve_codebook("e5m2")
    codes, absmax = ref.quantize_blockwise(x, cb, 100)
    y = ref.dequantize_blockwise(codes, absmax, cb, 100)
    inv_m = F32(1) / F32(57344)
    for b in range(3):
        a = F32(np.max(np.abs(x[b * 100:(b + 1) * 100])))
        assert absmax[b] == a
        qscale = F32(57344) / a
        dscale = a * inv_m
        for i in range(b * 100, (b + 1) * 100):
            s = min(max(x[i] * qscale, F32(-57344)), F32(57344))
            c = np.float32(s).astype(ml_dtypes.float8_e5m2).view(np.uint8)
            assert codes[i] == c
            assert bits(y[i]) == bits(F32(np.float32(c.view(ml_dtypes.float8_e5m2)) * dscale))
    # dividing per element would give different bits on some values (why the contract multiplies)
    divided = np.float32(cb.values[codes]) / (F32(57344) / np.repeat(absmax, 100))
    assert np.any(bits(divided) != bits(y))


def test_saturation_clamps_before_the_cast():
    """fl(absmax * fl(M/absmax)) can exceed M; it must become M, never NaN/inf."""
    rng = np.random.default_rng(4)
    a = rng.uniform(1, 2, 100_000).astype(np.float32)
    over = a[a * (F32(448) / a) > F32(448)]
    assert over.size > 0
    codes, _ = ref.quantize_blockwise(np.repeat(over[:50], 2) * F32([1, -1] * 50), "e4m3", 2)
    assert set(np.unique(codes)) == {0x7E, 0xFE}  # ±448, never the NaN codes
    for name in ("e5m2", "float8_e4m3"):  # formats with inf: still saturate
        cb = resolve_codebook(name)
        over = a[a * (cb.max / a) > cb.max][:10]
        codes, _ = ref.quantize_blockwise(over, cb, 1)
        assert np.all(np.abs(cb.values[codes]) == cb.max)


def test_zero_groups_are_exact_signed_zeros():
    x = np.float32([0.0, -0.0, 0.0, -0.0, 1.0, 2.0, 3.0, 4.0])
    for name in ("e4m3", "float8_e4m3fnuz", "bnb_e4m3"):
        cb = resolve_codebook(name)
        codes, absmax = ref.quantize_blockwise(x, cb, 4)
        assert absmax[0] == 0
        y = ref.dequantize_blockwise(codes, absmax, cb, 4)
        assert np.all(y[:4] == 0)
        negzero = cb.negzero_code is not None
        np.testing.assert_array_equal(np.signbit(y[:4]), [False, negzero, False, negzero])


def test_negative_zero():
    codes, _ = ref.quantize_global(np.float32([-0.0, 1.0, -1e-9]), "e4m3")
    assert codes[0] == 0x80 and codes[2] == 0x80  # −0 and a negative value rounding to zero
    codes, _ = ref.quantize_global(np.float32([-0.0, 1.0]), "float8_e4m3fnuz")
    assert codes[0] == 0x00  # fnuz: one zero


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ("e4m3", "e5m2", "e2m1", "bnb_e5m2"))
def test_non_finite_groups_dequantize_to_all_nan(bad, name):
    cb = resolve_codebook(name)
    x = np.float32([1.0, 2.0, bad, 3.0, 0.5, -0.25, 0.0, 1.5])
    codes, absmax = ref.quantize_blockwise(x, cb, 4)
    if np.isnan(bad):
        assert bits(absmax[0]) == 0x7FC00000 and absmax.view(np.uint32)[0] == 0x7FC00000
    else:
        assert absmax[0] == np.inf
    assert np.all(codes[:4] == cb.fill_code)
    y = ref.dequantize_blockwise(codes, absmax, cb, 4)
    assert np.all(np.isnan(y[:4]))
    np.testing.assert_array_equal(y[4:], ref.fake_quantize(x[4:], cb, 4))  # other blocks unaffected


def test_fill_codes():
    assert resolve_codebook("e4m3").fill_code == 0x7F
    assert resolve_codebook("e5m2").fill_code == 0x7E
    assert resolve_codebook("float8_e4m3fnuz").fill_code == 0x80
    assert resolve_codebook("e2m1").fill_code == 0x0


@pytest.mark.parametrize("name", ELEMENT + TABLES)
def test_subnormal_inputs_are_flush_to_zero_independent(name):
    """A flush-to-zero backend (XLA on CPU) and IEEE numpy must agree: subnormal
    inputs give signed zero codes and a subnormal absmax is stored as 0."""
    cb = resolve_codebook(name)
    sub = np.float32([1e-40, -3e-42, 2.0**-149, -(2.0**-127)])
    for absmax_value in (2.0**-126, 1e-30, 1.0, 3e38):
        x = np.concatenate([[absmax_value], sub]).astype(np.float32)
        flushed = np.where(np.abs(x) < TINY, x * 0, x).astype(np.float32)
        c1, a1 = ref.quantize_global(x, cb)
        c2, a2 = ref.quantize_global(flushed, cb)
        np.testing.assert_array_equal(c1, c2)
        assert np.all(cb.values[c1[1:]] == 0)
        y = ref.dequantize_global(c1, a1, cb)
        assert np.all((y == 0) | (np.abs(y) >= TINY))  # never a subnormal output
    codes, absmax = ref.quantize_blockwise(sub, cb, 4)
    assert absmax[0] == 0 and not np.signbit(absmax[0])


@pytest.mark.parametrize("name", ELEMENT + TABLES)
def test_tiny_and_huge_absmax_give_finite_normal_scales(name):
    cb = resolve_codebook(name)
    for a in (TINY, 1e-35, cb.scale_floor, 1e-20, 1.0, 1e30, cb.scale_ceiling, FLT_MAX):
        finite, qscale, dscale = ref.group_scales(np.float32([a]), cb)
        assert finite[0] and np.isfinite(qscale[0]) and qscale[0] >= TINY
        assert np.isfinite(dscale[0]) and dscale[0] > 0
        assert np.isfinite(cb.max * dscale[0])  # the largest code stays finite
    rng = np.random.default_rng(5)
    for a in (FLT_MAX, F32(3e38)):
        x = (rng.uniform(-1, 1, 64) * a).astype(np.float32)
        x[0] = a
        y = ref.fake_quantize(x, cb)
        assert np.all(np.isfinite(y))
        if cb.scale_ceiling == FLT_MAX:
            assert abs(np.float64(y[0]) - np.float64(a)) <= 2**-21 * np.float64(a)


def test_scale_floor_values():
    assert resolve_codebook("e4m3").scale_floor == F32(2.0**-106)
    assert resolve_codebook("e5m2").scale_floor == F32(2.0**-92)
    assert resolve_codebook("e4m3").scale_ceiling == FLT_MAX
    assert resolve_codebook("bnb_e4m3").scale_ceiling == F32(2.0**126)


def test_fp16_near_max():
    x = np.float16([65504, -65504, 65472, 1.0, -3.0, 60000])
    for name in NATIVE8 + TABLES:
        y = ref.fake_quantize(x, name, 4)
        assert y.dtype == np.float16 and np.all(np.isfinite(y))
        assert np.max(np.abs(y.astype(np.float32))) <= 65504


@pytest.mark.parametrize("name", NATIVE8 + TABLES)
def test_error_is_at_most_half_a_step(name):
    """|x - Q(x)| <= half the gap between the neighbouring codes, times the scale (float64 oracle)."""
    cb = resolve_codebook(name)
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(4096) * rng.uniform(0.01, 100)).astype(np.float32)
    codes, absmax = ref.quantize_blockwise(x, cb, 512)
    y = ref.dequantize_blockwise(codes, absmax, cb, 512).astype(np.float64)
    v = np.unique(cb.values[cb.finite]).astype(np.float64)
    a = np.repeat(absmax.astype(np.float64), 512)
    s = x.astype(np.float64) * cb.max / a
    idx = np.clip(np.searchsorted(v, s), 1, v.size - 1)
    half_gap = (v[idx] - v[idx - 1]) / 2 * a / cb.max
    assert np.all(np.abs(y - x) <= half_gap * (1 + 2**-20) + 1e-30)


# §4 / shapes -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (7,), (3, 100), (2, 3, 50), (2, 1, 3, 33)])
def test_blocks_run_over_the_row_major_flattening(shape):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    codes, absmax = ref.quantize_blockwise(x, "e4m3", 64)
    assert codes.shape == x.shape and absmax.shape == (-(-x.size // 64),)
    flat_codes, flat_absmax = ref.quantize_blockwise(x.reshape(-1), "e4m3", 64)
    np.testing.assert_array_equal(codes.reshape(-1), flat_codes)
    for b in range(absmax.size):
        chunk = x.reshape(-1)[b * 64:(b + 1) * 64]
        assert absmax[b] == np.max(np.abs(chunk))
    y = ref.dequantize_blockwise(codes, absmax, "e4m3", 64, np.float16)
    assert y.shape == x.shape and y.dtype == np.float16


def test_global_is_one_group():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    codes, absmax = ref.quantize_global(x, "e5m2")
    c2, a2 = ref.quantize_blockwise(x, "e5m2", x.size)
    np.testing.assert_array_equal(codes, c2)
    assert absmax.shape == () and absmax == a2[0]
    _, empty_absmax = ref.quantize_global(np.zeros((0, 3), np.float32), "e5m2")
    assert empty_absmax == 0


def test_codes_without_a_value_decode_to_nan():
    codes = np.uint8([0x1, 0x10, 0xFF])
    y = ref.dequantize_global(codes, np.float32(6.0), "e2m1")
    assert y[0] == 0.5 and np.all(np.isnan(y[1:]))


# bad input ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "x, err, match",
    [
        (np.arange(4), TypeError, "x must be a floating-point array of dtype float16, bfloat16, float32, float64; got dtype int64"),
        (np.ones(4, bool), TypeError, "got dtype bool"),
        (np.ones(4, np.complex64), TypeError, "got dtype complex64"),
    ],
)
def test_bad_inputs(x, err, match):
    with pytest.raises(err, match=match):
        ref.quantize_blockwise(x, "e4m3", 64)
    with pytest.raises(err, match=match):
        ref.fake_quantize(x, "e4m3")


def test_bad_arguments():
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="blocksize must be a positive int, got 0"):
        ref.quantize_blockwise(x, "e4m3", 0)
    with pytest.raises(TypeError, match="blocksize must be a positive int, got float: 64.0"):
        ref.quantize_blockwise(x, "e4m3", 64.0)
    with pytest.raises(ValueError, match="unknown format 'e4m4'"):
        ref.quantize_blockwise(x, "e4m4", 64)
    codes, absmax = ref.quantize_blockwise(x, "e4m3", 4)
    with pytest.raises(TypeError, match="codes must have dtype uint8, got int32"):
        ref.dequantize_blockwise(codes.astype(np.int32), absmax, "e4m3", 4)
    with pytest.raises(ValueError, match=r"absmax must have shape \(2,\).*got \(1,\)"):
        ref.dequantize_blockwise(codes, absmax[:1], "e4m3", 4)
    with pytest.raises(TypeError, match="absmax must have dtype float32, got float64"):
        ref.dequantize_blockwise(codes, absmax.astype(np.float64), "e4m3", 4)
    with pytest.raises(TypeError, match="dtype must be a floating-point array of dtype .*; got dtype int8"):
        ref.dequantize_blockwise(codes, absmax, "e4m3", 4, np.int8)
