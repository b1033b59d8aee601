"""OCP MX block scaling (docs/numerics.md §11): the e8m0 scale rules worked by hand, the
bisected byte tables equal to the rules, the reference equal to torchao 0.18's ``to_mx`` /
``to_dtype`` (scale bytes, element codes, dequantized bits) for every element format and
scale mode, and the argument errors."""

from __future__ import annotations

import numpy as np
import pytest

import fp8core
import fp8core.mx as mx
from fp8core import reference as R
from fp8core.recipe import OperandRule, axiswise, block, tile

NAN = np.array(0x7FC00000, np.uint32).view(np.float32)
E4M3 = fp8core.resolve_codebook("e4m3")


# ---------------------------------------------------------------- the rules by hand
@pytest.mark.parametrize("fmt,emax", [("e4m3", 8), ("e5m2", 15), ("e2m3", 2), ("e3m2", 4),
                                      ("e2m1", 2)])
def test_element_emax_is_torchaos_max_pow2(fmt, emax):
    assert mx.element_emax(fp8core.resolve_codebook(fmt)) == emax


@pytest.mark.parametrize("mode,amax,byte", [
    ("floor", 1.0, 119), ("floor", 1.5, 119), ("floor", 448.0, 127), ("floor", 0.0, 0),
    ("floor", np.inf, 247),                       # E = 255: 128 − 8 + 127
    ("ceil", 1.0, 119), ("ceil", 1.5, 120), ("ceil", 2.0 ** -120, 0),  # clamped after the +1
    ("even", 1.5, 119),                           # 1.1000b: + 2**18 does not carry
    ("even", 1.9375, 120),                        # 1.1111b: rounds to 2.0
    ("even", 1.875, 119), ("even", 1.96875, 120),  # 1.111b has 3 mantissa bits; 1.11111b carries
    ("rceil", 448.0, 127),                        # d = 1: log2 0
    ("rceil", 449.0, 128), ("rceil", 1.0, 119),   # d = 1/448: ceil(−8.8) = −8
    ("rceil", 0.0, 0), ("rceil", np.inf, 254),
    ("floor", NAN, 255), ("ceil", NAN, 255), ("even", NAN, 255), ("rceil", NAN, 255),
])
def test_scale_bytes_by_hand(mode, amax, byte):
    assert mx.scale_bytes(np.float32(amax), E4M3, mode) == byte


def test_byte_scales_by_hand():
    finite, q, d = mx.byte_scales(np.array([0, 1, 119, 254, 255]), "floor")
    assert finite.tolist() == [True, True, True, True, False]
    assert q[:4].tolist() == [2.0 ** 126, 2.0 ** 126, 2.0 ** 8, 2.0 ** -127]   # ≥ 2**-126 divisor
    assert d[:4].tolist() == [2.0 ** -127, 2.0 ** -126, 2.0 ** -8, 2.0 ** 127] and np.isnan(d[4])
    _, q, _ = mx.byte_scales(np.array([0, 1, 254]), "rceil")
    assert q.tolist() == [1.0, 2.0 ** 126, 2.0 ** -127]                        # 1 for byte 0


@pytest.mark.parametrize("fmt", mx.MX_ELEMENT_FORMATS)
@pytest.mark.parametrize("mode", mx.SCALE_MODES)
def test_byte_tables_equal_the_rules(fmt, mode):
    """The bisected steps give the rule's byte at, just below and just above every step,
    and at random absmax bit patterns."""
    cb = fp8core.resolve_codebook(fmt)
    thr, values = mx.byte_table(fmt, mode)
    assert thr[0] == 0 and np.all(np.diff(thr.astype(np.int64)) > 0)
    rng = np.random.default_rng(0)
    t = thr.astype(np.int64)
    bits = np.unique(np.clip(np.concatenate([t, t - 1, t + 1, rng.integers(0, 0x7F800001, 4000),
                                             [0x7F800000]]), 0, 0x7F800000)).astype(np.uint32)
    a = bits.view(np.float32)
    looked_up = values[np.searchsorted(thr, bits, side="right") - 1]
    assert np.array_equal(looked_up, mx.scale_bytes(a, cb, mode))


def test_quantize_mx_by_hand():
    """One e4m3 block, floor: absmax 6 → byte 2 − 8 + 127 = 121, elements × 2**6."""
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [6.0, -1.0, 0.1, 2.0 ** -12]
    codes, scales = fp8core.quantize_mx(x, "e4m3")
    assert scales.tolist() == [[121]]
    want = (x * 64).astype(fp8core.get_format("e4m3").ml_dtype).view(np.uint8)
    assert np.array_equal(codes, want)
    y = fp8core.dequantize_mx(codes, scales, "e4m3")
    assert y[0, :4].tolist() == [6.0, -1.0, np.float32(0.1015625), 2.0 ** -12]


def test_quantize_mx_axis0_and_partial_blocks():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((70, 5)).astype(np.float32)
    codes, scales = fp8core.quantize_mx(x, "e2m1", block_size=32, axis=0)
    assert scales.shape == (3, 5)
    for j in range(5):
        c, s = fp8core.quantize_mx(x[:, j][None], "e2m1", block_size=32)
        assert np.array_equal(codes[:, j], c[0]) and np.array_equal(scales[:, j], s[0])
    y = fp8core.dequantize_mx(codes, scales, "e2m1", axis=0)
    assert y.shape == x.shape


# ---------------------------------------------------------------- torchao
def _torchao():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao==0.18.0)")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.kernels import unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    dtypes = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
              "float6_e2m3fn": "fp6_e2m3", "float6_e3m2fn": "fp6_e3m2",
              "float4_e2m1fn": torch.float4_e2m1fn_x2}
    return torch, to_mx, to_dtype, unpack_uint4, ScaleCalculationMode, dtypes


def _special_blocks() -> np.ndarray:
    """Blocks of 32 spanning 2**±60, plus zero, −0, ±inf, float32-subnormal, huge and tiny
    blocks, and values on element-format rounding midpoints."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((48, 256)) * np.exp2(rng.integers(-60, 60, (48, 8)).repeat(32, 1)))
    x = x.astype(np.float32)
    x[3, :32] = 0
    x[4, :32] = -0.0
    x[5, 5], x[5, 40] = np.inf, -np.inf
    x[6, :32] = 1e-40
    x[6, 32:64] = -3e-39
    x[7, 0] = 3.4e38
    x[8, :32] *= 1e-37
    x[9, :32] = np.arange(32) * 0.25 - 4     # e2m1 / e2m3 midpoints under scale 1
    x[10, :32] = np.linspace(-448, 448, 32)
    return x


@pytest.mark.parametrize("fmt", mx.MX_ELEMENT_FORMATS)
@pytest.mark.parametrize("mode", mx.SCALE_MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_equals_torchao_to_mx(fmt, mode, dtype):
    torch, to_mx, to_dtype, unpack_uint4, Mode, dtypes = _torchao()
    x = torch.from_numpy(_special_blocks()).to(getattr(torch, dtype))
    scale, data = to_mx(x, dtypes[fmt], 32, Mode(mode))
    t_scales = scale.view(torch.uint8).numpy()
    raw = data.view(torch.uint8)
    t_codes = (unpack_uint4(raw) if fmt == "float4_e2m1fn" else raw).numpy()
    codes, scales = fp8core.quantize_mx(x.float().numpy(), fmt, scale_mode=mode)
    assert np.array_equal(scales, t_scales)
    assert np.array_equal(codes, t_codes)
    for out in ("float32", "bfloat16"):
        t_y = to_dtype(data, scale, dtypes[fmt], 32, getattr(torch, out)).float().numpy()
        y = fp8core.dequantize_mx(codes, scales, fmt, dtype=out).astype(np.float32)
        assert np.array_equal(y.view(np.uint32), t_y.view(np.uint32)), out


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float4_e2m1fn"])
def test_nan_blocks_scale_255_and_decode_to_nan_like_torchao(fmt):
    """A block holding NaN: byte 255 as torchao, every element decodes to NaN in both;
    fp8core's codes are the fill code (torchao's are whatever its cast makes of NaN)."""
    torch, to_mx, to_dtype, unpack_uint4, Mode, dtypes = _torchao()
    x = np.ones((2, 64), np.float32)
    x[1, 40] = np.nan
    for mode in mx.SCALE_MODES:
        scale, data = to_mx(torch.from_numpy(x), dtypes[fmt], 32, Mode(mode))
        codes, scales = fp8core.quantize_mx(x, fmt, scale_mode=mode)
        assert np.array_equal(scales, scale.view(torch.uint8).numpy())
        assert scales[1, 1] == 255 and (codes[1, 32:] == fp8core.resolve_codebook(fmt).fill_code).all()
        y = fp8core.dequantize_mx(codes, scales, fmt)
        t_y = to_dtype(data, scale, dtypes[fmt], 32, torch.float32).numpy()
        assert np.isnan(y[1, 32:]).all() and np.isnan(t_y[1, 32:]).all()
        assert np.array_equal(y[:, :32], t_y[:, :32]) and np.array_equal(y[0], t_y[0])


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("call,exc,msg", [
    (lambda: fp8core.quantize_mx(np.ones(32, np.float32), "e4m3fnuz"), ValueError,
     r"element_format must be an MX element format \(float8_e4m3fn, .*\), got float8_e4m3fnuz"),
    (lambda: fp8core.quantize_mx(np.ones(32, np.float32), "e2m1", block_size=33), ValueError,
     r"block_size must be a positive multiple of 2 for float4_e2m1fn"),
    (lambda: fp8core.quantize_mx(np.ones(32, np.float32), "e3m2", block_size=30), ValueError,
     r"block_size must be a positive multiple of 4 for float6_e3m2fn"),
    (lambda: fp8core.quantize_mx(np.ones(32, np.float32), "e4m3", block_size=0), ValueError,
     r"block_size must be a positive int, got 0"),
    (lambda: fp8core.quantize_mx(np.ones(32, np.float32), "e4m3", scale_mode="round"),
     ValueError, r"scale_mode must be one of floor, ceil, even, rceil, got 'round'"),
    (lambda: fp8core.dequantize_mx(np.zeros((2, 64), np.uint8), np.zeros((2, 3), np.uint8), "e4m3"),
     ValueError, r"scales must have shape \(2, 2\) for codes of shape \(2, 64\)"),
    (lambda: fp8core.dequantize_mx(np.zeros((2, 64), np.uint8), np.zeros((2, 2), np.float32), "e4m3"),
     TypeError, r"scales must be uint8 e8m0 bytes, got dtype float32"),
    (lambda: OperandRule("e4m3fnuz", block(32), "mx_floor"), ValueError,
     r"OperandRule.scale='mx_floor' is an MX block scale, but OperandRule.format is float8_e4m3fnuz"),
    (lambda: OperandRule("e4m3", axiswise(), "mx_rceil"), ValueError,
     r"granularity must be block\(B\) .* or tile\(B\) .* got axiswise"),
    (lambda: OperandRule("e2m1", tile(15), "mx_even"), ValueError,
     r"an MX block of float4_e2m1fn must hold a positive multiple of 2 elements"),
    (lambda: OperandRule("bnb_e4m3", block(32), "mx_floor"), ValueError, r"needs a native format"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_mx_arguments_name_the_argument(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_mx_rules_run_in_the_operand_engine():
    """An MX rule is a scale rule: quantize_operand's absmax gives the same bytes, and tiles
    (the 32×32 weight option) are one byte per tile."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    rule = OperandRule("e4m3", tile(32), "mx_rceil")
    codes, absmax = R.quantize_operand(w, rule)
    assert absmax.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            t = w[32 * i:32 * i + 32, 32 * j:32 * j + 32]
            c, s = fp8core.quantize_mx(t.reshape(1, -1), "e4m3", block_size=1024, scale_mode="rceil")
            assert np.array_equal(codes[32 * i:32 * i + 32, 32 * j:32 * j + 32].reshape(1, -1), c)
            assert mx.scale_bytes(absmax[i, j], rule.format, "rceil") == s[0, 0]
