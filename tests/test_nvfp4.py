"""NVFP4 (docs/numerics.md §13): the reference equal to torchao 0.18's ``nvfp4_quantize`` /
``NVFP4Tensor.dequantize`` bit for bit (codes, block-scale bytes, tensor scale, decoded
values; with and without the per-tensor scale; float32 and bfloat16 inputs; special
blocks), TransformerEngine's chain against hand-worked blocks and against a float32
transcription of its reference quantizer written here in torch, the special cases of
§13.1, and the argument errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fp8core
import fp8core.nvfp4 as nv

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)


def _bits(a):
    return np.asarray(a, np.float32).reshape(-1).view(np.uint32)


def _wide(shape, seed, spread=20.0):
    """Normal data with per-row magnitudes spanning 2**±spread (blocks far below the amax)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, (shape[0], 1)))
    return x.astype(np.float32)


def _specials(shape=(8, 64), seed=1):
    x = _wide(shape, seed, 8.0)
    x[0, :16] = 0.0                                  # zero block
    x[0, 16:32] = -0.0                               # −0 block
    x[1, 3] = np.inf                                 # inf in a block
    x[1, 20] = -np.inf
    x[2, :16] = 1e-40                                # float32 subnormals
    x[2, 16:20] = [-3e-39, 2e-45, 6.0, -1e-41]       # subnormals beside a normal
    x[3, 16:32] = x[3, 16:32] * np.float32(1e-30)    # a block far below the amax
    return x


# ---------------------------------------------------------------- torchao 0.18
torch = None


def _torchao():
    global torch
    torch = pytest.importorskip("torch", reason="torch is not installed")
    t = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor",
                            reason="torchao (0.18, prototype.mx_formats) is not installed")
    k = pytest.importorskip("torchao.prototype.mx_formats.kernels", reason="torchao kernels")
    return t, k


def _torchao_quantize(x_t, per_tensor):
    t, k = _torchao()
    pts = t.per_tensor_amax_to_scale(torch.max(torch.abs(x_t))) if per_tensor else None
    scales, packed = t.nvfp4_quantize(x_t, 16, pts)
    codes = k.unpack_uint4(packed).reshape(x_t.shape).numpy()
    deq = t.NVFP4Tensor.to_nvfp4(x_t, per_tensor_scale=pts).dequantize(torch.float32).numpy()
    return codes, scales.view(torch.uint8).reshape(x_t.shape[0], -1).numpy(), pts, deq


def _check_torchao(x32_or_bf16, per_tensor, nan_blocks=None):
    x_t = torch.from_numpy(x32_or_bf16) if x32_or_bf16.dtype == np.float32 else \
        torch.from_numpy(x32_or_bf16.astype(np.float32)).to(torch.bfloat16)
    codes_a, bytes_a, pts, deq_a = _torchao_quantize(x_t, per_tensor)
    codes, sbytes, ts = fp8core.quantize_nvfp4(x_t.float().numpy(), per_tensor_scale=per_tensor)
    deq = fp8core.dequantize_nvfp4(codes, sbytes, ts)
    nan_a = np.isnan(bytes_a.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.array_equal(nan_a, sbytes == nv.E4M3_NAN_BYTE)
    assert np.array_equal(bytes_a[~nan_a], sbytes[~nan_a]), "block-scale bytes"
    keep = ~np.repeat(nan_a, 16, axis=1)              # NaN blocks' codes: not compared (§13.1)
    assert np.array_equal(codes_a[keep], codes[keep]), np.argwhere((codes_a != codes) & keep)[:5]
    want_ts = F32(1.0) if pts is None else pts.numpy().astype(np.float32)
    assert _bits(ts) == _bits(want_ts) or (np.isnan(ts) and np.isnan(want_ts))
    same = (_bits(deq_a) == _bits(deq)) | (np.isnan(deq_a.reshape(-1)) & np.isnan(deq.reshape(-1)))
    assert same.all(), np.argwhere(~same)[:5]


@pytest.mark.parametrize("per_tensor", [False, True], ids=["single", "two_level"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_equals_torchao_nvfp4_quantize(dtype, per_tensor):
    _torchao()
    x = _wide((32, 256), seed=0)
    if dtype == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16)
    _check_torchao(x, per_tensor)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["single", "two_level"])
def test_equals_torchao_on_special_blocks(per_tensor):
    _torchao()
    x = _specials()
    if per_tensor:                      # an inf makes torchao's t inf: check the finite rows too
        _check_torchao(x[[0, 2, 3, 4, 5]], per_tensor)
    _check_torchao(x, per_tensor)


def test_equals_torchao_with_nan_single_level():
    _torchao()
    x = _specials()
    x[4, 40] = np.nan
    _check_torchao(x, False)


def test_equals_torchao_bf16_output():
    t, _ = _torchao()
    x_t = torch.from_numpy(_wide((16, 64), seed=3)).to(torch.bfloat16)
    pts = t.per_tensor_amax_to_scale(torch.max(torch.abs(x_t)))
    deq_a = t.NVFP4Tensor.to_nvfp4(x_t, per_tensor_scale=pts).dequantize(torch.bfloat16)
    codes, sbytes, ts = fp8core.quantize_nvfp4(x_t.float().numpy())
    deq = fp8core.dequantize_nvfp4(codes, sbytes, ts, dtype=ml_dtypes.bfloat16)
    assert np.array_equal(deq_a.view(torch.int16).numpy(), deq.view(np.int16))


# ---------------------------------------------------------------- hand-worked (§13.2)
def _doc_example():
    x = np.zeros((1, 64), np.float32)
    x[0, :4] = [10, 5, -1.25, 0.3]
    x[0, 16:18] = [0.02, -0.01]
    x[0, 32:34] = [0.0002, -0.0001]
    x[0, 48] = 0.00001
    return x


def test_te_hand_worked_blocks():
    """§13.2 by hand, A = 10. S = fl(2688/10) = fl(268.8); t = fl(1/S); S·fl(1/6) = 44.8 (to
    float32). Block scales: 10·44.8 = 448 → 0x7E; 0.02·44.8 = 0.896 → e4m3 0.875 (1.110b·2**-1:
    0x36); 0.0002·44.8 = 0.00896 = 4.59·2**-9 → subnormal 5·2**-9 (0x05); 1e-5·44.8 = 0.23·2**-9
    → 0 (0x00). Multipliers r = 1/(s·t): block 0: fl(448·t) = 1.6666667 (t is above 10/2688),
    r = 0.59999996, just below 0.6: 10·r → 6 (code 7), 5·r → 3 (5), −1.25·r = −0.74999994,
    inside the tie at −0.75 → −0.5 (0x9), 0.3·r = 0.18 → 0; block 1: 1/(0.875·t) = 307.2: 6.144 → 6
    (7), −3.072 → −3 (0xD); block 2: 1/(5·2**-9·t) = 27525.12: 5.505 → 6 (7), −2.75 → −3 (0xD,
    tie to even); block 3: s = 0 → r = FLT_MAX: 1e-5·FLT_MAX → clamp 6 (7)."""
    codes, sbytes, ts = fp8core.quantize_nvfp4(_doc_example(), variant="te")
    S = np.float32(268.8)
    t = F32(1) / S
    assert _bits(ts) == _bits(t) and _bits(t) == 0x3B73CF3E
    assert sbytes.tolist() == [[0x7E, 0x36, 0x05, 0x00]]
    c = codes[0]
    assert c[:4].tolist() == [7, 5, 9, 0] and c[16:18].tolist() == [7, 13]
    assert c[32:34].tolist() == [7, 13] and c[48] == 7
    assert not c[[i for i in range(64) if i not in (0, 1, 2, 3, 16, 17, 32, 33, 48)]].any()
    deq = fp8core.dequantize_nvfp4(codes, sbytes, ts)[0]
    # decoded: value · fl(t · s), in float64 from the hand values (each product exact in float64)
    for i, (v, s) in {0: (6, 448), 1: (3, 448), 2: (-0.5, 448), 16: (6, .875), 17: (-3, .875),
                      32: (6, 5 * 2.0 ** -9), 33: (-3, 5 * 2.0 ** -9), 48: (6, 0.0)}.items():
        assert deq[i] == F32(v * float(F32(float(t) * s))), i


def test_torchao_hand_worked_blocks():
    """§13.2, torchao: t = fl(10/2688) (0x3B73CF3D, one ulp below TE's); block 2's scale
    0.0002/6/t = 0.00896 is clamped to 2**-6 (0x08), r = fl(fl(1/t)/2**-6) = 268.8·64 = 17203.2:
    0.0002·r = 3.44 → 3 (5), −1.72 → −1.5 (0xB); block 3: 1e-5·r = 0.17 → 0. Block 0:
    r = fl(fl(1/t)/448) = fl(268.8/448) = 0.59999996, so −1.25·r → −0.5 (0x9) here too."""
    codes, sbytes, ts = fp8core.quantize_nvfp4(_doc_example(), variant="torchao")
    assert _bits(ts) == 0x3B73CF3D and _bits(ts) == _bits(F32(10) / F32(2688))
    assert sbytes.tolist() == [[0x7E, 0x36, 0x08, 0x08]]
    c = codes[0]
    assert c[:4].tolist() == [7, 5, 9, 0] and c[16:18].tolist() == [7, 13]
    assert c[32:34].tolist() == [5, 11] and c[48] == 0


def test_te_single_level_by_hand():
    """Without the per-tensor scale S = t = 1: s = e4m3(m · fl(1/6)); m = 6 → fl(6·fl(1/6)) = 1
    (0x38), elements rounded as they are; m = 0.006 → 0.001 = 0.512·2**-9 → 2**-9 (0x01),
    r = 512: 0.006 → 3.072 → 3 (5), −1.5·2**-9 → −1.5 (0xB)."""
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [6, 0.25, -0.75, 2.5]                  # ties: 0.25 → 0, 0.75 → 1, 2.5 → 2
    x[0, 16:18] = [0.006, -1.5 * 2.0 ** -9]
    codes, sbytes, ts = fp8core.quantize_nvfp4(x, variant="te", per_tensor_scale=False)
    assert ts == 1.0 and sbytes.tolist() == [[0x38, 0x01]]
    assert codes[0, :4].tolist() == [7, 0, 0xA, 4] and codes[0, 16:18].tolist() == [5, 0xB]


# ------------------------------------------- TE's reference quantizer, transcribed in torch
def _te_oracle(x32: np.ndarray, tiles: bool = False):
    """TransformerEngine ``NVFP4QuantizerRef._quantize_blockwise_reference`` (1x16 or 16x16,
    no RHT), its float32 torch ops transcribed; its ``cast_to_fp4x2`` thresholds with −0 kept
    as code 8 (TE stores code 0 there: §13.2)."""
    x = torch.from_numpy(x32)
    m_, n_ = x.shape
    xb = x.view(m_, n_ // 16, 16)
    if tiles:            # TE: the 16x16 tile amax, repeated for each of the tile's 16 rows
        tile_max = torch.amax(torch.abs(x.unfold(0, 16, 16).unfold(1, 16, 16)), dim=(-1, -2))
        vec_max = tile_max.repeat_interleave(16, dim=0).unsqueeze(-1)
    else:
        vec_max = torch.amax(torch.abs(xb), dim=-1, keepdim=True)
    six, e4max = torch.tensor(6.0), torch.tensor(448.0)
    fmax = torch.tensor(torch.finfo(torch.float32).max)
    gamax = torch.max(torch.abs(x)).view(1)
    genc = torch.min(torch.div(e4max * six, gamax), fmax)
    genc = torch.where(genc == 0.0, torch.ones_like(genc), genc)
    gdec = torch.div(1.0, genc)
    dec = torch.min(vec_max * (genc * torch.reciprocal(six)), fmax)
    dec = torch.clamp(dec, min=-e4max, max=e4max).to(torch.float8_e4m3fn)
    enc = torch.min(torch.div(1.0, dec.to(torch.float32) * gdec), fmax)
    y = torch.clamp(xb * enc, -six, six).reshape(m_, n_)
    a = y.abs()
    code = torch.zeros_like(y, dtype=torch.uint8)
    for lo, incl, c in ((0.25, False, 1), (0.75, True, 2), (1.25, False, 3), (1.75, True, 4),
                        (2.5, False, 5), (3.5, True, 6), (5.0, False, 7)):
        code = torch.where((a >= lo) if incl else (a > lo), torch.tensor(c, dtype=torch.uint8), code)
    code = code | (torch.signbit(y).to(torch.uint8) << 3)
    return code.numpy(), dec.view(torch.uint8).reshape(m_, -1).numpy(), gdec.numpy()[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_te_equals_its_reference_quantizer_transcribed(seed):
    global torch
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = _wide((32, 128), seed=seed, spread=12.0)
    x[5, :16] = 0.0
    x[6, 16:32] *= np.float32(1e-6)                  # block scales → e4m3 subnormal / 0
    codes_o, bytes_o, t_o = _te_oracle(x)
    codes, sbytes, ts = fp8core.quantize_nvfp4(x, variant="te")
    assert _bits(ts) == _bits(t_o)
    assert np.array_equal(sbytes, bytes_o)
    assert (sbytes < 8).any()                        # the no-lower-clamp path is exercised
    assert np.array_equal(codes, codes_o), np.argwhere(codes != codes_o)[:5]


def test_te_tiles_equal_its_reference_quantizer_transcribed():
    global torch
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = _wide((48, 64), seed=7, spread=10.0)
    codes_o, bytes_o, t_o = _te_oracle(x, tiles=True)
    codes, sbytes, ts = fp8core.quantize_nvfp4(x, variant="te", block_size=(16, 16))
    assert sbytes.shape == (3, 4) and _bits(ts) == _bits(t_o)
    assert np.array_equal(np.repeat(sbytes, 16, axis=0), bytes_o)     # TE repeats a tile's scale
    assert np.array_equal(codes, codes_o), np.argwhere(codes != codes_o)[:5]


@pytest.mark.parametrize("variant", nv.VARIANTS)
def test_tiles_are_blocks_when_every_row_holds_the_tile_max(variant):
    """A tile whose 16 rows each contain the tile's max (±) quantizes as its 16 row blocks do:
    the tile's scale is every row block's, and the codes agree; tiles are the same for x.T
    (transposed) and for axis=0."""
    x = _wide((40, 50), seed=8, spread=4.0)
    for i in range(0, 40, 16):
        for j in range(0, 50, 16):
            tile = x[i:i + 16, j:j + 16]
            top = np.abs(tile).max()
            tile[:, 0] = np.where(np.arange(tile.shape[0]) % 2, -top, top)
    c, s, t = fp8core.quantize_nvfp4(x, variant=variant, block_size=(16, 16))
    c1, s1, t1 = fp8core.quantize_nvfp4(x, variant=variant)
    assert s.shape == (3, 4) and np.array_equal(np.repeat(s, 16, axis=0)[:40], s1)
    assert np.array_equal(c, c1) and _bits(t) == _bits(t1)
    ct, st, _ = fp8core.quantize_nvfp4(x.T.copy(), variant=variant, block_size=(16, 16))
    assert np.array_equal(ct, c.T) and np.array_equal(st, s.T)
    c0, s0, _ = fp8core.quantize_nvfp4(x, variant=variant, block_size=(16, 16), axis=0)
    assert np.array_equal(c0, c) and np.array_equal(s0, s)
    d = fp8core.dequantize_nvfp4(c, s, t, block_size=(16, 16))
    assert np.array_equal(_bits(d), _bits(fp8core.dequantize_nvfp4(c1, s1, t1)))


# ---------------------------------------------------------------- §13.1 specials
def test_all_zero_tensor():
    x = np.zeros((2, 32), np.float32)
    codes, sbytes, ts = fp8core.quantize_nvfp4(x)                 # torchao: t = 1, not 0/0
    assert ts == 1.0 and (sbytes == 0x08).all() and not codes.any()
    codes, sbytes, ts = fp8core.quantize_nvfp4(x, variant="te")   # S = FLT_MAX
    assert _bits(ts) == _bits(F32(1) / FLT_MAX) and 0 < ts < np.finfo(np.float32).tiny
    assert not sbytes.any() and not codes.any()
    assert not fp8core.dequantize_nvfp4(codes, sbytes, ts).any()


@pytest.mark.parametrize("variant", nv.VARIANTS)
def test_nan_block_and_nan_tensor(variant):
    x = _wide((2, 48), seed=4, spread=2.0)
    x[1, 20] = np.nan
    codes, sbytes, ts = fp8core.quantize_nvfp4(x, variant=variant, per_tensor_scale=False)
    assert sbytes[1, 1] == 0x7F and (sbytes != 0x7F).sum() == 5 and not codes[1, 16:32].any()
    deq = fp8core.dequantize_nvfp4(codes, sbytes, ts)
    assert (_bits(deq[1, 16:32]) == 0x7FC00000).all() and np.isfinite(np.delete(deq, range(64, 80))).all()
    codes, sbytes, ts = fp8core.quantize_nvfp4(x, variant=variant)
    assert _bits(ts) == 0x7FC00000 and (sbytes == 0x7F).all() and not codes.any()


@pytest.mark.parametrize("variant", nv.VARIANTS)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_partial_block_and_axis0_and_3d(variant, per_tensor):
    x = _wide((12, 40), seed=5, spread=6.0)
    kw = dict(variant=variant, per_tensor_scale=per_tensor)
    padded = np.concatenate([x, np.zeros((12, 8), np.float32)], axis=1)   # +0 changes no max
    c, s, t = fp8core.quantize_nvfp4(x, **kw)
    cp, sp, tp = fp8core.quantize_nvfp4(padded, **kw)
    assert c.shape == x.shape and s.shape == (12, 3) == nv.scales_shape(x.shape, 16, -1)
    assert np.array_equal(c, cp[:, :40]) and np.array_equal(s, sp) and _bits(t) == _bits(tp)
    c0, s0, t0 = fp8core.quantize_nvfp4(x.T.copy(), axis=0, **kw)
    assert np.array_equal(c0, c.T) and np.array_equal(s0, s.T) and _bits(t0) == _bits(t)
    d0 = fp8core.dequantize_nvfp4(c0, s0, t0, axis=0)
    assert np.array_equal(_bits(d0.T), _bits(fp8core.dequantize_nvfp4(c, s, t)))
    c3, s3, _ = fp8core.quantize_nvfp4(x.reshape(3, 4, 40), **kw)
    assert np.array_equal(c3.reshape(12, 40), c) and np.array_equal(s3.reshape(12, 3), s)


def test_decoded_error_is_within_half_a_step_of_the_block_scale():
    """Independent float64 bound: |x − deq| ≤ half e2m1's step (1 at the top) times t·s, for
    blocks whose scale is not clamped."""
    x = _wide((16, 64), seed=6, spread=3.0)
    for variant in nv.VARIANTS:
        c, s, t = fp8core.quantize_nvfp4(x, variant=variant)
        deq = fp8core.dequantize_nvfp4(c, s, t).astype(np.float64)
        sv = np.repeat(s.view(ml_dtypes.float8_e4m3fn).astype(np.float64), 16, axis=1) * float(t)
        err = np.abs(x.astype(np.float64) - deq)
        assert (err <= sv * 1.0 * (1 + 2 ** -10) + 1e-30).all()
        assert np.median(err / np.abs(x)) < 0.15


def test_e2m1_round_table_equals_ml_dtypes_at_every_midpoint():
    mid, tie_up, codes = nv.e2m1_round_table()
    m = np.concatenate([mid, np.nextafter(mid, 0), np.nextafter(mid, 7), [0, 6]]).astype(np.float32)
    idx = sum(((m >= mj) if up else (m > mj)).astype(int) for mj, up in zip(mid, tie_up))
    assert np.array_equal(codes[idx], m.astype(ml_dtypes.float4_e2m1fn).view(np.uint8))
    assert mid.tolist() == [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


# ---------------------------------------------------------------- argument errors
@pytest.mark.parametrize("kw,exc,words", [
    (dict(block_size=32), ValueError, ["block_size", "32", "16"]),
    (dict(block_size=0), ValueError, ["block_size", "0"]),
    (dict(block_size=16.0), TypeError, ["block_size", "16.0"]),
    (dict(variant="nvidia"), ValueError, ["variant", "'nvidia'", "'torchao'", "'te'"]),
    (dict(per_tensor_scale=1), TypeError, ["per_tensor_scale", "bool", "1"]),
    (dict(axis=1), ValueError, ["axis", "1", "-1"]),
    (dict(block_size=(16, 32)), ValueError, ["block_size", "(16, 32)", "(16, 16)"]),
    (dict(block_size=(16, 16)), ValueError, ["block_size=(16, 16)", "2-D", "3-D"]),
])
def test_quantize_errors_name_the_argument(kw, exc, words):
    with pytest.raises(exc) as e:
        fp8core.quantize_nvfp4(np.zeros((2, 3, 32), np.float32), **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_dequantize_errors():
    c, s, t = fp8core.quantize_nvfp4(np.ones((2, 32), np.float32))
    with pytest.raises(ValueError, match=r"block_scales must have shape \(2, 2\)"):
        fp8core.dequantize_nvfp4(c, s[:, :1], t)
    with pytest.raises(TypeError, match="block_scales must be uint8"):
        fp8core.dequantize_nvfp4(c, s.astype(np.int32), t)
    with pytest.raises(TypeError, match="tensor_scale must be a float32 scalar"):
        fp8core.dequantize_nvfp4(c, s, np.float64(1.0))
    with pytest.raises(ValueError, match="block_size must be one of 16"):
        fp8core.dequantize_nvfp4(c, s, t, block_size=8)
    with pytest.raises(ValueError, match="0 … 15"):
        fp8core.dequantize_nvfp4(c + 16, s, t)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        fp8core.quantize_nvfp4(np.ones((2, 32), np.int32))
