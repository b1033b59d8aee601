"""Format specs and codebooks against ml_dtypes (the independent oracle)."""

import ml_dtypes
import numpy as np
import pytest

import fp8core
from fp8core import Codebook, create_fp8_map, get_format, resolve_codebook


@pytest.mark.parametrize("name", fp8core.FORMAT_NAMES)
def test_format_figures_come_from_ml_dtypes(name):
    spec = get_format(name)
    fi = ml_dtypes.finfo(getattr(ml_dtypes, name))
    assert spec.name == name
    assert spec.total_bits == fi.bits
    assert spec.mantissa_bits == fi.nmant
    assert spec.exponent_bits == fi.nexp
    assert spec.max == float(fi.max)
    assert spec.smallest_normal == float(fi.smallest_normal)
    assert spec.smallest_subnormal == float(fi.smallest_subnormal)
    assert spec.ml_dtype == np.dtype(getattr(ml_dtypes, name))
    # every pattern decodes exactly as ml_dtypes decodes it
    patterns = np.arange(2**fi.bits, dtype=np.uint8)
    expected = [float(np.array(p).view(getattr(ml_dtypes, name))) for p in patterns]
    np.testing.assert_array_equal(spec.decode(), np.array(expected, np.float32))
    for c in spec.nan_codes:
        assert np.isnan(expected[c])
    for c in spec.inf_codes:
        assert np.isinf(expected[c])
    assert spec.has_nan == any(np.isnan(expected))
    assert spec.has_inf == any(np.isinf(expected))


def test_format_specific_facts():
    e4m3 = get_format("e4m3")
    assert (e4m3.name, e4m3.max, e4m3.has_inf, e4m3.nan_codes) == ("float8_e4m3fn", 448.0, False, (0x7F, 0xFF))
    e5m2 = get_format("e5m2")
    assert (e5m2.name, e5m2.max, e5m2.inf_codes) == ("float8_e5m2", 57344.0, (0x7C, 0xFC))
    fnuz = get_format("float8_e4m3fnuz")
    assert fnuz.nan_codes == (0x80,) and not fnuz.has_negative_zero
    assert get_format("e2m1").total_bits == 4 and get_format("e2m1").max == 6.0
    assert not get_format("e8m0").signed
    assert e4m3.torch_dtype == "float8_e4m3fn" and get_format("e3m4").torch_dtype is None
    assert "e4m3" in e4m3.aliases


def test_format_lookup_is_case_insensitive_and_hashable():
    assert get_format("E4M3") is get_format("float8_e4m3fn")
    assert hash(get_format("e5m2")) == hash(get_format("float8_e5m2"))
    with pytest.raises(Exception):
        get_format("e4m3").max = 1.0  # frozen


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown format 'e9m9'.*float8_e4m3fn.*aliases.*e5m2"):
        get_format("e9m9")
    with pytest.raises(TypeError, match="format must be a format name"):
        get_format(3)


@pytest.mark.parametrize("name", fp8core.ELEMENT_FORMATS)
def test_native_codebook(name):
    cb = Codebook.from_format(name)
    spec = get_format(name)
    np.testing.assert_array_equal(cb.values, spec.decode())
    assert cb.max == np.float32(spec.max)
    assert cb.min_nonzero == np.float32(spec.smallest_subnormal)
    assert cb.finite.sum() == cb.num_codes - len(spec.nan_codes) - len(spec.inf_codes)
    # data can be viewed as a real float8 tensor: codes are the bit patterns
    finite_codes = np.flatnonzero(cb.finite).astype(np.uint8)
    np.testing.assert_array_equal(finite_codes.view(spec.ml_dtype).astype(np.float32), cb.values[cb.finite])
    if cb.nan_code is not None:
        assert cb.nan_code == np.float32(np.nan).astype(spec.ml_dtype).view(np.uint8)
    assert cb.values[cb.zero_code] == 0 and not np.signbit(cb.values[cb.zero_code])
    assert hash(cb) == hash(Codebook.from_format(name)) and cb == resolve_codebook(name)


def test_scale_only_format_is_not_an_element_codebook():
    with pytest.raises(ValueError, match="float8_e8m0fnu is a scale-only format"):
        resolve_codebook("e8m0")


def test_resolve_codebook_inputs_and_errors():
    assert resolve_codebook("bnb_e4m3") == create_fp8_map(True, 4, 3, 8)
    table = create_fp8_map(True, 5, 2, 8).values
    cb = resolve_codebook(table)
    assert not cb.is_native and np.array_equal(cb.values, table)
    with pytest.raises(ValueError, match=r"codebook: codebook table must have shape \(256,\), got shape \(255,\)"):
        resolve_codebook(table[:255])
    with pytest.raises(TypeError, match="dtype int64"):
        resolve_codebook(np.arange(256))
    with pytest.raises(ValueError, match="only finite"):
        resolve_codebook(np.full(256, np.nan))
    with pytest.raises(TypeError, match="got NoneType"):
        resolve_codebook(None)
    with pytest.raises(ValueError, match="unknown format 'fp9'.*legacy tables: bnb_e4m3, bnb_e5m2"):
        resolve_codebook("fp9")


# --- bitsandbytes legacy maps, against entries worked out by hand -------------

def test_legacy_map_e4m3_hand_worked():
    t = create_fp8_map(True, 4, 3, 8).values
    # bias 8; largest normal: e=1 -> (1 + 7/8) * 2**8 = 480; smallest: e=0, m=1 -> 2**-11
    assert t.shape == (256,)
    assert t[0] == -1.0 and t[255] == 1.0
    assert t[254] == np.float32(448.0) / np.float32(480.0)        # (1 + 6/8) * 2**8
    assert t[129] == np.float32(2.0**-11) / np.float32(480.0)     # smallest positive
    assert t[127] == 0 and t[128] == 0                            # zero appears twice
    # e = 15 -> 2**-(15 - 8 - 1) = 2**-6: the smallest normal binade
    assert np.float32(2.0**-6) / np.float32(480.0) in t
    # the gap: nothing between the largest subnormal 7*2**-11 and 2**-6
    pos = t[t > 0] * 480.0
    assert not np.any((pos > 7 * 2.0**-11 * 1.0001) & (pos < 2.0**-6 * 0.9999))


def test_legacy_map_e5m2_hand_worked():
    t = create_fp8_map(True, 5, 2, 8).values
    mx = 1.75 * 2.0**16  # bias 16, e=1: (1 + 3/4) * 2**16
    assert t[255] == 1.0 and t[0] == -1.0
    assert t[254] == np.float32(1.5 * 2.0**16) / np.float32(mx)
    assert t[129] == np.float32(2.0**-18) / np.float32(mx)        # (1/4) * 2**-16
    assert t[127] == 0 and t[128] == 0


def test_legacy_map_4bit_hand_worked():
    t = create_fp8_map(True, 2, 1, 4).values
    # bias 2: e=0 -> 0, 0.125; e=1 -> 4, 6; e=2 -> 2, 3; e=3 -> 1, 1.5 (max 6), both signs,
    # 16 values padded with 240 zeros
    positive = np.float32([0.125, 1, 1.5, 2, 3, 4, 6]) / np.float32(6)
    np.testing.assert_array_equal(t[249:], positive)
    np.testing.assert_array_equal(t[:7], -positive[::-1])
    assert np.all(t[7:249] == 0)


def test_legacy_map_rejects_inconsistent_bits():
    with pytest.raises(ValueError, match="exponent_bits \\+ precision_bits must equal total_bits - 1"):
        create_fp8_map(True, 4, 4, 8)
    with pytest.raises(TypeError, match="exponent_bits must be an int"):
        create_fp8_map(True, 4.0, 3, 8)
