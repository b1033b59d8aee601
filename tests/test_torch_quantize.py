"""fp8core_torch quantizers vs fp8core.reference, bit for bit.

Inputs come from numpy (seeded); codes are compared as uint8, absmax as uint32
views (NaN canonical) and values as bits (all NaNs equal).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import fp8core
from fp8core import reference as R
import fp8core_torch as T
import fp8core_torch.quantize as TQ
from fp8core_torch.config import resolve_spec

from _torch_helpers import (  # noqa: F401  (pinned_numerics is an autouse fixture)
    NP_DTYPES,
    assert_bits_equal,
    f32_bits,
    pinned_numerics,
    quant_path,
    random_input,
    to_numpy,
    to_torch,
)

CODEBOOKS = list(fp8core.ELEMENT_FORMATS) + ["bnb_e4m3", "bnb_e5m2"]
DTYPES = ["float32", "float16", "bfloat16", "float64"]
# the reference multiplies inf/NaN groups by qscale = 0 on purpose (§3.6)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.usefixtures("quant_path")]

TORCH_NATIVE = [n for n in fp8core.NATIVE_8BIT_FORMATS if fp8core.get_format(n).torch_dtype]


def check_all(x_np: np.ndarray, cb, blocksize) -> None:
    """quantize / dequantize / fake_quantize of x against the reference."""
    xt = to_torch(x_np)
    if blocksize is None:
        c_ref, a_ref = R.quantize_global(x_np, cb)
        c, a = T.quantize_global(xt, cb)
        d_ref = R.dequantize_global(c_ref, a_ref, cb)
        d = T.dequantize_global(to_torch(c_ref), to_torch(a_ref), cb)
    else:
        c_ref, a_ref = R.quantize_blockwise(x_np, cb, blocksize)
        c, a = T.quantize_blockwise(xt, cb, blocksize)
        d_ref = R.dequantize_blockwise(c_ref, a_ref, cb, blocksize)
        d = T.dequantize_blockwise(to_torch(c_ref), to_torch(a_ref), cb, blocksize)
    assert c.dtype == torch.uint8 and tuple(c.shape) == x_np.shape
    assert a.dtype == torch.float32 and tuple(a.shape) == a_ref.shape
    bad = np.flatnonzero(c.numpy().reshape(-1) != c_ref.reshape(-1))
    assert bad.size == 0, (f"codes: {bad.size} differ, first {bad[:5]}: x={x_np.reshape(-1)[bad[:5]]} "
                           f"got {c.numpy().reshape(-1)[bad[:5]]} want {c_ref.reshape(-1)[bad[:5]]}")
    np.testing.assert_array_equal(f32_bits(a.numpy()), f32_bits(a_ref), err_msg="absmax bits")
    assert_bits_equal(to_numpy(d), d_ref, "dequantized")
    f_ref = R.fake_quantize(x_np, cb, blocksize)
    f = T.fake_quantize(xt, cb, blocksize)
    assert f.dtype == xt.dtype
    assert_bits_equal(to_numpy(f), f_ref, "fake_quantize")


# ------------------------------------------------------------------ edge cases
def edge_blocks(cb_name: str, dtype: str) -> np.ndarray:
    """Blocks of 64: one edge case each (docs/numerics.md §5), plus a partial tail."""
    cb = fp8core.resolve_codebook(cb_name)
    m = float(cb.max)
    rng = np.random.default_rng(1)
    big = 65504.0 if dtype == "float16" else float(np.finfo(np.float32).max)
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    blocks = []
    z = np.zeros(64)
    z[1::2] = -0.0
    blocks.append(z)                                                 # all zero, ±0
    b = rng.standard_normal(64); b[3] = -0.0; b[4] = 0.0
    blocks.append(b)                                                 # normal with ±0
    b = rng.standard_normal(64); b[10] = np.nan
    blocks.append(b)                                                 # NaN block
    b = rng.standard_normal(64); b[11] = np.inf
    blocks.append(b)                                                 # +inf block
    b = rng.standard_normal(64); b[12] = -np.inf; b[13] = np.nan
    blocks.append(b)                                                 # -inf and NaN
    blocks.append(np.linspace(-100, 100, 64) * tiny)                 # float32 subnormals
    b = np.linspace(-1, 1, 64) * 1e-40; b[0] = 1.0
    blocks.append(b)                                                 # subnormals + normal max
    blocks.append(rng.uniform(-1, 1, 64) * 1e-35)                    # absmax < FLOOR (f32)
    b = rng.uniform(-1, 1, 64) * big; b[5] = big; b[6] = -big
    blocks.append(b)                                                 # near FLT_MAX / 65504
    blocks.append(rng.uniform(-1, 1, 64) * 1e30)                     # huge, table CEIL region
    # exact midpoints between neighbouring entries (ties), with M in the block so
    # that qscale = fl(M / M) = 1 and s = x
    vals = cb.sorted_values.astype(np.float64)
    mids = (vals[:-1] + vals[1:]) / 2
    mids32 = mids.astype(np.float32)
    mids = mids32[mids32.astype(np.float64) == mids].astype(np.float64)
    extra = np.concatenate([mids, np.nextafter(mids32, np.inf), np.nextafter(mids32, -np.inf)])
    for i in range(0, extra.size, 63):
        chunk = extra[i:i + 63]
        blocks.append(np.concatenate([[m], chunk, np.zeros(63 - chunk.size)]))
    x = np.concatenate(blocks + [rng.standard_normal(37)])           # partial last block
    with np.errstate(over="ignore"):
        return x.astype(NP_DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cb", CODEBOOKS)
def test_edge_cases_blockwise(cb, dtype):
    check_all(edge_blocks(cb, dtype), cb, 64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cb", CODEBOOKS)
def test_edge_cases_global(cb, dtype):
    x = edge_blocks(cb, dtype)
    check_all(x[:64 * 2], cb, None)                     # finite (zeros, ±0, normals)
    check_all(x[64 * 2:64 * 3], cb, None)               # NaN group
    check_all(x[64 * 3:64 * 4], cb, None)               # inf group
    check_all(x[64 * 8:64 * 9], cb, None)               # huge
    check_all(x[64 * 10:], cb, None)                    # midpoints


# ------------------------------------------------------------- random tensors
SHAPES = [((1000,), 64), ((3, 7, 50), 128), ((2, 3, 5, 37), 100), ((17, 64), 64), ((5,), 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bs", SHAPES, ids=[f"{s}-bs{b}" for s, b in SHAPES])
@pytest.mark.parametrize("cb", ["e4m3", "e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3",
                                "float8_e3m4", "float8_e4m3b11fnuz", "e2m3", "e3m2", "e2m1",
                                "bnb_e4m3"])
def test_random_shapes(cb, shape, bs, dtype):
    seed = zlib.crc32(repr((cb, shape, bs, dtype)).encode())
    x = random_input(np.random.default_rng(seed), shape, dtype)
    check_all(x, cb, bs)
    check_all(x, cb, None)


@pytest.mark.parametrize("cb", ["e4m3", "e5m2", "float8_e3m4", "bnb_e5m2"])
@pytest.mark.parametrize("bs", [64, 96, 1500])
def test_chunked_paths(cb, bs, monkeypatch):
    """The eager chunk loop (shrunk to 1000 elements) with chunk/block/tail boundaries."""
    monkeypatch.setattr(TQ, "_CHUNK", 1000)
    rng = np.random.default_rng(bs)
    for dtype in ("float32", "bfloat16"):
        x = random_input(rng, (7, 1003), dtype)
        x.reshape(-1)[2500] = np.nan
        check_all(x, cb, bs)
        check_all(x[1:], cb, None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_absmax_from_bits_every_pattern(dtype):
    """The eager float16/bfloat16 absmax (max of the magnitude bits) on every one of
    the 65536 bit patterns (NaNs, ±inf, ±0, subnormals): one pattern per block, pairs
    of patterns per block, and the whole set globally (shrunk scratch: row pieces and
    column pieces), against the reference."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    x = bits.view(np.float16) if dtype == "float16" else bits.view(NP_DTYPES["bfloat16"])
    perm = np.random.default_rng(5).permutation(65536)
    for cb in ("e4m3", "e5m2"):
        for bs in (1, 2):
            _, a_ref = R.quantize_blockwise(x[perm], cb, bs)
            _, a = T.quantize_blockwise(to_torch(x[perm]), cb, bs)
            np.testing.assert_array_equal(f32_bits(a.numpy()), f32_bits(a_ref))
    for chunk in (1000, TQ._CHUNK):
        TQ_CHUNK, TQ._CHUNK = TQ._CHUNK, chunk
        try:
            for sel in (perm, perm[np.abs(x[perm].astype(np.float32)) < np.inf],
                        perm[~np.isnan(x[perm].astype(np.float32))]):
                _, a_ref = R.quantize_global(x[sel], "e4m3")
                _, a = T.quantize_global(to_torch(x[sel]), "e4m3")
                np.testing.assert_array_equal(f32_bits(a.numpy()), f32_bits(a_ref))
                _, a_ref = R.quantize_blockwise(x[sel], "e4m3", 999)
                _, a = T.quantize_blockwise(to_torch(x[sel]), "e4m3", 999)
                np.testing.assert_array_equal(f32_bits(a.numpy()), f32_bits(a_ref))
        finally:
            TQ._CHUNK = TQ_CHUNK


def test_large_default_chunk():
    """More than one real chunk (2**20 elements) with a partial tail."""
    x = random_input(np.random.default_rng(3), (1_200_001,), "float32")
    check_all(x, "e4m3", 1024)
    check_all(x, "e5m2", None)


def test_empty():
    for cb in ("e4m3", "bnb_e4m3"):
        check_all(np.zeros((0, 5), np.float32), cb, 64)
        check_all(np.zeros((0,), np.float32), cb, None)


def test_non_contiguous_input():
    x = random_input(np.random.default_rng(4), (40, 30), "float32")
    xt = to_torch(x).t()  # row-major flattening of the transposed view
    c, a = T.quantize_blockwise(xt, "e4m3", 64)
    c_ref, a_ref = R.quantize_blockwise(np.ascontiguousarray(x.T), "e4m3", 64)
    np.testing.assert_array_equal(c.numpy(), c_ref)
    np.testing.assert_array_equal(f32_bits(a.numpy()), f32_bits(a_ref))


def test_code_tensor_as_codebook():
    table = torch.from_numpy(fp8core.create_fp8_map(True, 4, 3, 8).values.copy())
    x = random_input(np.random.default_rng(5), (300,), "float32")
    c, _ = T.quantize_blockwise(to_torch(x), table, 64)
    c_ref, _ = R.quantize_blockwise(x, "bnb_e4m3", 64)
    np.testing.assert_array_equal(c.numpy(), c_ref)


# ------------------------------------------- rounding primitives, exhaustively
def rounding_candidates(cb: fp8core.Codebook) -> np.ndarray:
    """Every float32 midpoint of neighbouring values, its float32 neighbours, the
    values and their neighbours, within [-M, M]; plus float32 subnormals/tiny."""
    v = cb.sorted_values.astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    v32 = cb.sorted_values.astype(np.float32)
    pts = [v32, mids]
    for p in (v32, mids):
        pts += [np.nextafter(p, np.float32(np.inf)), np.nextafter(p, np.float32(-np.inf))]
    sub = np.float32(np.finfo(np.float32).smallest_subnormal)
    pts.append(np.array([0.0, -0.0, sub, -sub, 1e-40, -1e-40, 1.2e-38, -1.2e-38], np.float32))
    s = np.concatenate(pts).astype(np.float32)
    m = np.float32(cb.max)
    return s[(s >= -m) & (s <= m)]


@pytest.mark.parametrize("sign_form", ["signed_k", "copysign_x", "scratch"])
@pytest.mark.parametrize("fmt", [n for n in fp8core.ELEMENT_FORMATS])
def test_round_native_exhaustive(fmt, sign_form):
    """The float32 arithmetic rounding equals ml_dtypes' cast on every decision point."""
    cb = fp8core.resolve_codebook(fmt)
    spec = resolve_spec(fmt)
    if sign_form == "copysign_x" and not spec.has_negative_zero:
        pytest.skip("the copysign form is only used for formats with -0")
    s = rounding_candidates(cb)
    want = s.astype(cb.format.ml_dtype).astype(np.float32)
    st = torch.from_numpy(s.copy())
    k = torch.empty(st.shape, dtype=torch.int32) if sign_form != "signed_k" else None
    sign_src = torch.from_numpy(s.copy()) if sign_form == "copysign_x" else None
    got = TQ._round_native_(st, spec, k, sign_src).numpy()
    bad = np.flatnonzero(f32_bits(got) != f32_bits(want))
    assert bad.size == 0, f"{fmt}: s={s[bad[:5]]} got {got[bad[:5]]} want {want[bad[:5]]}"


@pytest.mark.parametrize("fmt", TORCH_NATIVE)
def test_torch_native_cast_matches_ml_dtypes(fmt):
    """torch's float32 -> float8 cast (after the clamp) equals ml_dtypes' on every
    midpoint and neighbour. (The backend only casts already-rounded values to get
    codes, but this documents that torch's own rounding agrees.)"""
    cb = fp8core.resolve_codebook(fmt)
    s = rounding_candidates(cb)
    want = s.astype(cb.format.ml_dtype).view(np.uint8)
    got = torch.from_numpy(s.copy()).to(getattr(torch, fmt)).view(torch.uint8).numpy()
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{fmt}: s={s[bad[:5]]} got {got[bad[:5]]} want {want[bad[:5]]}"


@pytest.mark.parametrize("cb", CODEBOOKS)
def test_decode_all_codes(cb):
    codebook = fp8core.resolve_codebook(cb)
    spec = resolve_spec(cb)
    tabs = TQ._tables(spec, torch.device("cpu"))
    codes = torch.arange(256, dtype=torch.uint8)
    np.testing.assert_array_equal(f32_bits(TQ._decode(codes, spec, tabs).numpy()),
                                  f32_bits(codebook.values256))


@pytest.mark.parametrize("fmt", TORCH_NATIVE)
def test_decode_cast_into_exhaustive(fmt):
    """The eager decode of float8 codes (float16 bit patterns for e4m3, factor folded
    into dscale) gives fl(value[code] * dscale) for every code with a value, over
    extreme scales; NaN dscale (non-finite groups) gives NaN."""
    codebook = fp8core.resolve_codebook(fmt)
    spec = resolve_spec(fmt)
    codes = torch.arange(256, dtype=torch.uint8)
    has_value = ~np.isnan(codebook.values256)
    for d in (1.0, 2.0**-115, 3.0e-3, 1.7, 3.4028235e38 / 448, float("nan")):
        dscale = torch.tensor([d], dtype=torch.float32)
        s = torch.empty(256, dtype=torch.float32)
        ds = TQ._decode_cast_into_(s, codes.view(spec.torch_dtype), spec, dscale)
        got = (s * ds).numpy()
        want = codebook.values256 * np.float32(d)
        if np.isnan(d):
            assert np.isnan(got).all()
        else:
            np.testing.assert_array_equal(f32_bits(got[has_value]), f32_bits(want[has_value]))


@pytest.mark.parametrize("cb", CODEBOOKS)
def test_sorted_values_are_values_of_sorted_codes(cb):
    """The fused table path gathers sorted_values directly; it must equal value[code]."""
    codebook = fp8core.resolve_codebook(cb)
    np.testing.assert_array_equal(f32_bits(codebook.values256[codebook.sorted_codes]),
                                  f32_bits(codebook.sorted_values))


# ------------------------------------------------------------------ bad input
def test_bad_inputs():
    x = torch.randn(10)
    with pytest.raises(TypeError, match="x must be a floating-point array.*got dtype int64"):
        T.quantize_blockwise(torch.arange(10), "e4m3", 4)
    with pytest.raises(TypeError, match="got dtype complex64"):
        T.fake_quantize(torch.zeros(3, dtype=torch.complex64), "e4m3")
    with pytest.raises(TypeError, match="got dtype bool"):
        T.quantize_global(torch.zeros(3, dtype=torch.bool), "e4m3")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        T.quantize_global(np.zeros(3, np.float32), "e4m3")
    with pytest.raises(ValueError, match="blocksize must be a positive int, got 0"):
        T.quantize_blockwise(x, "e4m3", 0)
    with pytest.raises(ValueError, match="blocksize must be a positive int, got -3"):
        T.fake_quantize(x, "e4m3", -3)
    with pytest.raises(TypeError, match="blocksize must be a positive int, got float: 1.5"):
        T.quantize_blockwise(x, "e4m3", 1.5)
    with pytest.raises(ValueError, match="unknown format 'e9m9'"):
        T.quantize_global(x, "e9m9")
    with pytest.raises(ValueError, match="scale-only"):
        T.quantize_global(x, "e8m0")
    with pytest.raises(ValueError, match=r"shape \(256,\), got shape \(255,\)"):
        T.quantize_global(x, torch.linspace(-1, 1, 255))
    c, a = T.quantize_blockwise(x, "e4m3", 4)
    with pytest.raises(TypeError, match="codes must have dtype uint8, got int64"):
        T.dequantize_blockwise(c.long(), a, "e4m3", 4)
    with pytest.raises(ValueError, match=r"absmax must have shape \(3,\).*got \(2,\)"):
        T.dequantize_blockwise(c, a[:2], "e4m3", 4)
    with pytest.raises(TypeError, match="absmax must have dtype float32, got float64"):
        T.dequantize_blockwise(c, a.double(), "e4m3", 4)
    with pytest.raises(TypeError, match="dtype must be a floating-point.*got dtype int32"):
        T.dequantize_blockwise(c, a, "e4m3", 4, dtype=torch.int32)


def test_missing_kernel_is_said_once_and_the_torch_ops_give_the_bits(monkeypatch):
    """Without the compiled kernel (an install without a C compiler) the first CPU quantize
    warns once, naming what runs instead; the results are still the reference's."""
    import warnings

    from fp8core import _kernel
    from fp8core_torch import quantize as Q

    monkeypatch.setattr(_kernel, "_LIB", None)
    monkeypatch.setattr(_kernel, "ENABLED", True)
    monkeypatch.setattr(Q, "_NOT_BUILT_WARNED", False)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [T.fake_quantize(x, "e4m3", 32) for _ in range(3)]
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "fp8core_torch: fp8core's C kernel" in msgs[0] \
        and "the torch ops" in msgs[0], msgs
    want = R.fake_quantize(x.numpy(), "e4m3", 32)
    for g in got:
        np.testing.assert_array_equal(g.numpy().view(np.uint32), want.view(np.uint32))
