"""fp8core's fused C kernel (fp8core/csrc/fp8q.c) against the numpy reference, bit for bit.

Called directly on numpy memory (no framework): every native format the kernel
takes, every value / midpoint / neighbour of each format, the float16 / bfloat16
conversions over every bit pattern, and the thread partitioning. The torch tests
run their whole suites through the kernel too (fixture ``quant_path``).
"""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

import fp8core
from fp8core import _kernel as K
from fp8core import reference as R

pytestmark = [
    pytest.mark.skipif(K._LIB is None, reason="fp8core's C kernel is not built (no C compiler)"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

BF16 = np.dtype(ml_dtypes.bfloat16)
KERNEL_FORMATS = [n for n in fp8core.ELEMENT_FORMATS if K.supports(fp8core.resolve_codebook(n))]


def kernel_quantize(x: np.ndarray, cb, blocksize, out_dtype=None, *, nthreads=2,
                    want_codes=True, want_vals=True, openmp=False):
    """(codes, values, absmax) from the kernel for numpy ``x``; ``blocksize=None``: global."""
    x = np.ascontiguousarray(x).reshape(-1)
    n = x.size
    out_dtype = np.dtype(out_dtype or x.dtype)
    group = blocksize or n
    codes = np.full(n, 0xAB, np.uint8)
    vals = np.full(n, 12345, out_dtype)
    absmax = np.full(-(-n // group), -1, np.float32)
    K.quantize(x.ctypes.data, x.dtype.name, n, group, cb,
               codes_ptr=codes.ctypes.data if want_codes else None,
               vals_ptr=vals.ctypes.data if want_vals else None, out_dtype=out_dtype.name,
               absmax_ptr=absmax.ctypes.data, nthreads=nthreads, openmp=openmp)
    return codes, vals, absmax


def bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns in the array's own width, every NaN equal."""
    a = np.asarray(a)
    nan = np.isnan(a.astype(np.float32))
    if a.dtype.itemsize == 2:
        b = a.view(np.uint16).copy()
        b[nan] = 0x7FFF
        return b
    b = a.astype(np.float32).view(np.uint32).copy()
    b[nan] = 0x7FC00000
    return b


def assert_matches_reference(x: np.ndarray, cb, blocksize, **kw) -> None:
    codes, vals, absmax = kernel_quantize(x, cb, blocksize, **kw)
    if blocksize is None:
        c_ref, a_ref = R.quantize_global(x, cb)
    else:
        c_ref, a_ref = R.quantize_blockwise(x, cb, blocksize)
    v_ref = R.fake_quantize(x, cb, blocksize).reshape(-1)
    bad = np.flatnonzero(codes != c_ref.reshape(-1))
    assert bad.size == 0, (f"{cb.name}: {bad.size} codes differ, first at {bad[:4]}: "
                           f"x={x.reshape(-1)[bad[:4]]} got {codes[bad[:4]]} want {c_ref.reshape(-1)[bad[:4]]}")
    np.testing.assert_array_equal(bits(absmax), bits(np.asarray(a_ref, np.float32).reshape(-1)),
                                  err_msg=f"{cb.name}: absmax")
    bad = np.flatnonzero(bits(vals) != bits(v_ref))
    assert bad.size == 0, (f"{cb.name}: {bad.size} values differ, first at {bad[:4]}: "
                           f"x={x.reshape(-1)[bad[:4]]} got {vals[bad[:4]]} want {v_ref[bad[:4]]}")


def test_kernel_is_built_where_a_compiler_exists():
    """The extension is optional at install; on a machine with a C compiler a silent
    build failure would leave every user on the slow path — fail loudly here."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert K._LIB is not None


def test_jax_custom_calls_build_where_a_cxx_compiler_exists(monkeypatch):
    """JAX's FFI wrapper is compiled on first use; with a C++ compiler present that must
    work (a failure would only warn and leave JAX on the slower XLA path)."""
    pytest.importorskip("jax")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine")
    from fp8core_jax import _ffi

    monkeypatch.setattr(K, "ENABLED", True)
    assert _ffi.available(), _ffi._STATE.get("why")


def test_supports_native_formats_not_tables():
    assert set(KERNEL_FORMATS) == set(fp8core.ELEMENT_FORMATS)
    assert not K.supports(fp8core.resolve_codebook("bnb_e4m3"))


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
def test_every_value_midpoint_and_neighbour(fmt):
    """Rounding of every decision point of the format: all finite values, the exact
    midpoints between neighbours (ties to even), the float32 values just either side,
    and the same set negated — scaled by qscale = 1 (a group whose absmax is M)."""
    cb = fp8core.resolve_codebook(fmt)
    v = np.unique(cb.values[np.isfinite(cb.values)].astype(np.float64))
    mids = (v[:-1] + v[1:]) / 2
    pts = np.concatenate([v, mids]).astype(np.float32)
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))])
    pts = pts[np.abs(pts) <= cb.max]
    x = np.concatenate([pts, -pts, [cb.max, 0.0, -0.0]]).astype(np.float32)
    assert_matches_reference(x, cb, None)
    assert_matches_reference(x, cb, 64)


@pytest.mark.parametrize("fmt", KERNEL_FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("blocksize", [64, 1000, None])
def test_random_and_special_values(fmt, dtype, blocksize):
    """Wide magnitudes, saturation, float32 subnormals, ±0, and non-finite groups."""
    rng = np.random.default_rng(7)
    cb = fp8core.resolve_codebook(fmt)
    x = rng.standard_normal(6000) * np.exp(rng.uniform(-30, 30, 6000))
    x[::97] = 0.0
    x[1::97] = -0.0
    x[2::89] = 1e-40
    x[3::89] = -1e-39
    if blocksize == 1000:  # one NaN group, one inf group, one group of tiny values
        x[5], x[1500], x[2000:3000] = np.nan, -np.inf, 1e-30
    x = x.astype(np.float32).astype(np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else dtype)
    assert_matches_reference(x, cb, blocksize)


@pytest.mark.parametrize("openmp", [False, True], ids=["pthreads", "openmp"])
@pytest.mark.parametrize("nthreads", [1, 2, 3, 7])
@pytest.mark.parametrize("n,blocksize", [(1, 64), (100, 64), (70001, None), (70001, 4096),
                                         (2**18 + 3, 1000), (2**18, 64)])
def test_thread_partitions(nthreads, n, blocksize, openmp):
    """Blocks and element ranges split over threads (POSIX or an OpenMP team): same bits
    as one pass, partial tails."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-5, 5, n))).astype(np.float32)
    x[n // 2] = np.nan if blocksize is None else x[n // 2]
    assert_matches_reference(x, fp8core.resolve_codebook("e4m3"), blocksize, nthreads=nthreads,
                             openmp=openmp)


def _pool_case(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(2**17 + 5) * np.exp(rng.uniform(-4, 4, 2**17 + 5))).astype(np.float32)


def test_worker_pool_concurrent_callers():
    """POSIX-thread callers share one persistent worker pool; callers that find it busy
    (here: eight Python threads at once — ctypes drops the GIL) start threads of their
    own. Every call still has the reference's bits."""
    import concurrent.futures

    cb = fp8core.resolve_codebook("e4m3")
    cases = [_pool_case(s) for s in range(8)]
    want = [R.quantize_blockwise(x, cb, 1000)[0].reshape(-1) for x in cases]

    def run(i):
        return [kernel_quantize(cases[i], cb, 1000, nthreads=3)[0] for _ in range(5)]

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        for i, got in enumerate(ex.map(run, range(8))):
            for codes in got:
                np.testing.assert_array_equal(codes, want[i])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_worker_pool_after_fork():
    """A forked child has none of the parent's pool workers: its first multi-threaded
    call rebuilds the pool (without that it would wait forever for workers that do not
    exist in the child) and gives the reference's bits."""
    import os

    cb = fp8core.resolve_codebook("e4m3")
    x = _pool_case(1)
    kernel_quantize(x, cb, 1000, nthreads=2)            # the parent's pool exists now
    want = R.quantize_blockwise(x, cb, 1000)[0].reshape(-1)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                          # child: report and leave at once
        try:
            ok = np.array_equal(kernel_quantize(x, cb, 1000, nthreads=2)[0], want)
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    import select

    ready, _, _ = select.select([r], [], [], 60)
    out = os.read(r, 1) if ready else b"timeout"
    os.close(r)
    os.waitpid(pid, 0) if ready else os.kill(pid, 9)
    assert out == b"1", f"child result: {out!r}"


@pytest.mark.parametrize("want_codes,want_vals", [(True, False), (False, True)])
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_outputs_independent(want_codes, want_vals, out_dtype):
    """Codes only / values only (in any output dtype) equal the full call's outputs."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000).astype(np.float32)
    cb = fp8core.resolve_codebook("e5m2")
    full = kernel_quantize(x, cb, 256, out_dtype)
    part = kernel_quantize(x, cb, 256, out_dtype, want_codes=want_codes, want_vals=want_vals)
    if want_codes:
        np.testing.assert_array_equal(part[0], full[0])
        assert (part[1] == 12345).all()
    else:
        np.testing.assert_array_equal(bits(part[1]), bits(full[1]))
        assert (part[0] == 0xAB).all()
    want = R.fake_quantize(x, cb, 256).astype(np.dtype(ml_dtypes.bfloat16) if out_dtype == "bfloat16"
                                              else out_dtype)
    np.testing.assert_array_equal(bits(full[1]), bits(want))


@pytest.mark.parametrize("cb_name", ["e4m3", "e5m2fnuz", "float6_e2m3fn", "bnb_e4m3", "bnb_e5m2"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_dequantize_any_codebook(cb_name, out_dtype):
    """Table lookup × dscale for every code, including tables, NaN and inf groups."""
    cb = fp8core.resolve_codebook(cb_name)
    codes = np.tile(np.arange(256, dtype=np.uint8), 8)
    absmax = np.array([1.0, 3.5e-20, 0.0, np.nan, np.inf, 7e30, 448.0, 1e-40], np.float32)
    np_out = np.dtype(ml_dtypes.bfloat16) if out_dtype == "bfloat16" else np.dtype(out_dtype)
    vals = np.empty(codes.size, np_out)
    K.dequantize(codes.ctypes.data, codes.size, 256, absmax.ctypes.data, cb, vals_ptr=vals.ctypes.data,
                 out_dtype=out_dtype, nthreads=2, openmp=out_dtype == "float16")
    want = R.dequantize_blockwise(codes, absmax, cb, 256).astype(np_out)
    np.testing.assert_array_equal(bits(vals), bits(want))


def _cast(a: np.ndarray, out: np.dtype) -> np.ndarray:
    y = np.empty(a.size, out)
    K.cast(a.ctypes.data, a.dtype.name, y.ctypes.data, np.dtype(out).name, a.size)
    return y


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_widening_every_pattern(dtype):
    """float16 / bfloat16 -> float32: every one of the 65536 bit patterns, exact."""
    a = np.arange(65536, dtype=np.uint16).view(dtype)
    np.testing.assert_array_equal(bits(_cast(a, np.dtype(np.float32))), bits(a.astype(np.float32)))


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16])
def test_narrowing_at_every_decision_point(dtype):
    """float32 -> float16 / bfloat16, round half to even: every representable value, the
    exact midpoints above it, and the float32 neighbours of both (overflow to inf,
    subnormals, ±0, inf and NaN included) — against numpy / ml_dtypes."""
    v = np.arange(65536, dtype=np.uint16).view(dtype).astype(np.float32)
    v = v[np.isfinite(v)]
    up = np.nextafter(v.astype(dtype), np.array(np.inf, dtype)).astype(np.float32)
    finite_up = np.isfinite(up)
    mids = ((v[finite_up].astype(np.float64) + up[finite_up]) / 2).astype(np.float32)
    pts = np.concatenate([v, mids, [np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 65520.0, 65519.996]])
    pts = pts.astype(np.float32)
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))])
    np.testing.assert_array_equal(bits(_cast(pts, dtype)), bits(pts.astype(dtype)))


# ------------------------------------------------------------------ scale rules, 2-D tiles
SCALES = ["fp32", "pow2", "pow2_torchao"]
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}
#: (id, tile_rows, tile_cols); None = the whole axis. The user-facing classes first, then
#: odd sizes (partial tiles everywhere, narrow groups, tiles wider than a column chunk).
TILINGS = [
    ("rows(1,C)", 1, None), ("block(1,128)", 1, 128), ("tile(128,128)", 128, 128),
    ("cols(R,1)", None, 1), ("colblock(128,1)", 128, 1), ("global(R,C)", None, None),
    ("tile(2,3)", 2, 3), ("tile(5,40)", 5, 40), ("tile(7,16)", 7, 16), ("block(1,100)", 1, 100),
    ("colblock(3,1)", 3, 1),
]


def _tiling(shape, tr, tc):
    return tr or max(shape[0], 1), tc or max(shape[1], 1)


def tile_data(shape, dtype, seed=0) -> np.ndarray:
    """Wide magnitudes with the special values of §5 where tiles of every class see them:
    a zero region (whole zero tiles), NaN, -inf, float32 subnormals, -0.0 and ~3e38
    (inf once cast to float16)."""
    rng = np.random.default_rng(seed)
    r, c = shape
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-12, 12, shape))
    if r * c >= 12:
        x[: r // 3 + 1, : c // 3 + 1] = 0.0
        x.flat[5::37] = 1e-40
        x.flat[7::53] = -3e-39
        x.flat[11::97] = -0.0
        x[-1, -1] = np.nan
        x[r // 2, 0] = -np.inf
        x[0, -1] = 3.0e38
    return x.astype(np.float32).astype(DTYPES[np.dtype(dtype).name])


def kernel_quantize_tiles(x, cb, tr, tc, scale="fp32", out_dtype=None, *, want_codes=True,
                          want_vals=True, nthreads=2, openmp=False):
    """(codes, values, absmax grid) from the kernel for a 2-D numpy ``x``; untouched
    outputs keep the sentinels 0xAB / 12345 / -1."""
    x = np.ascontiguousarray(x)
    rows, cols = x.shape
    out_dtype = DTYPES[np.dtype(out_dtype or x.dtype).name]
    codes = np.full(x.shape, 0xAB, np.uint8)
    vals = np.full(x.shape, 12345, out_dtype)
    absmax = np.full((-(-rows // tr), -(-cols // tc)), -1, np.float32)
    K.quantize_tiles(x.ctypes.data, x.dtype.name, rows, cols, tr, tc, cb, scale=scale,
                     codes_ptr=codes.ctypes.data if want_codes else None,
                     vals_ptr=vals.ctypes.data if want_vals else None, out_dtype=out_dtype.name,
                     absmax_ptr=absmax.ctypes.data, nthreads=nthreads, openmp=openmp)
    return codes, vals, absmax


def kernel_dequantize_tiles(codes, absmax, cb, tr, tc, scale="fp32", dtype=np.float32, *,
                            nthreads=2, openmp=False):
    codes, absmax = np.ascontiguousarray(codes), np.ascontiguousarray(absmax, np.float32)
    out = np.full(codes.shape, 12345, DTYPES[np.dtype(dtype).name])
    K.dequantize_tiles(codes.ctypes.data, codes.shape[0], codes.shape[1], tr, tc, absmax.ctypes.data,
                       cb, scale=scale, vals_ptr=out.ctypes.data, out_dtype=out.dtype.name,
                       nthreads=nthreads, openmp=openmp)
    return out


def _first_diff(got, want, x, what):
    bad = np.argwhere(got != want)
    return (f"{what}: {len(bad)} differ, first at {bad[:3].tolist()}: "
            f"x={[x[tuple(i)] for i in bad[:3]] if x is not None else '-'} "
            f"got {[got[tuple(i)] for i in bad[:3]]} want {[want[tuple(i)] for i in bad[:3]]}")


def assert_tiles_match_reference(x, cb, tr, tc, scale="fp32", out_dtype=None, **kw):
    """Kernel codes, absmax grid and values (fake quantize in out_dtype, and dequantize of
    the reference's codes) equal the reference bit for bit."""
    out_dtype = DTYPES[np.dtype(out_dtype or x.dtype).name]
    codes, vals, absmax = kernel_quantize_tiles(x, cb, tr, tc, scale, out_dtype, **kw)
    c_ref, a_ref = R.quantize_tiles(x, cb, tr, tc, scale)
    v_ref = R.dequantize_tiles(c_ref, a_ref, cb, tr, tc, scale, out_dtype)
    assert (codes == c_ref).all(), _first_diff(codes, c_ref, x, f"{cb.name} codes")
    assert (bits(absmax) == bits(a_ref)).all(), _first_diff(bits(absmax), bits(a_ref), None, "absmax")
    assert (bits(vals) == bits(v_ref)).all(), _first_diff(bits(vals), bits(v_ref), x, "values")
    deq = kernel_dequantize_tiles(c_ref, a_ref, cb, tr, tc, scale, out_dtype,
                                  nthreads=kw.get("nthreads", 2), openmp=kw.get("openmp", False))
    assert (bits(deq) == bits(v_ref)).all(), _first_diff(bits(deq), bits(v_ref), x, "dequantized")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tiling", TILINGS, ids=[t[0] for t in TILINGS])
@pytest.mark.parametrize("shape", [(512, 256), (67, 131), (32, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiles_match_reference(shape, tiling, dtype, scale):
    """Every tile class on aligned, ragged (partial edge tiles) and small (tiles larger
    than the array) shapes, with zero tiles, NaN / inf tiles, subnormals and ~3e38."""
    tr, tc = _tiling(shape, *tiling[1:])
    assert_tiles_match_reference(tile_data(shape, dtype), fp8core.resolve_codebook("e4m3"), tr, tc, scale)


@pytest.mark.parametrize("fmt", ["e5m2", "e5m2fnuz", "float6_e3m2fn", "float4_e2m1fn"])
@pytest.mark.parametrize("tiling", [("cols(R,1)", None, 1), ("tile(5,40)", 5, 40),
                                    ("block(1,100)", 1, 100)], ids=lambda t: t[0])
def test_tiles_other_formats(fmt, tiling):
    """fnuz (one zero, NaN fill 0x80), sub-byte formats, e5m2 — the -0 and fill rules."""
    shape = (67, 131)
    tr, tc = _tiling(shape, *tiling[1:])
    for scale in SCALES:
        assert_tiles_match_reference(tile_data(shape, "float32", seed=3), fp8core.resolve_codebook(fmt),
                                     tr, tc, scale)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 7), (7, 1), (2, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tiling", [(1, 1), (1, 2), (2, 1), (2, 3), (128, 128), (1, 128), (128, 1)],
                         ids=lambda t: f"tile{t}")
def test_tiny_arrays(shape, tiling):
    """Arrays smaller than their tiles, single elements, and groups of one element."""
    x = (np.random.default_rng(sum(shape)).standard_normal(shape) * 1e3).astype(np.float32)
    x.flat[0] = -0.0
    for scale in SCALES:
        assert_tiles_match_reference(x, fp8core.resolve_codebook("e4m3"), *tiling, scale)


@pytest.mark.parametrize("tiling", [(2, 1500), (1, 1100), (3, 1), (4, 7)], ids=lambda t: f"tile{t}")
def test_tiles_wider_than_a_column_chunk(tiling):
    """More columns than one chunk of the band sweep (1024): several chunks per band,
    groups wider than a chunk, a partial last chunk."""
    assert_tiles_match_reference(tile_data((6, 2500), "bfloat16", seed=5),
                                 fp8core.resolve_codebook("e4m3"), *tiling, "pow2")


@pytest.mark.parametrize("openmp", [False, True], ids=["pthreads", "openmp"])
@pytest.mark.parametrize("nthreads", [1, 2, 3, 7])
@pytest.mark.parametrize("shape,tiling", [((300, 700), (300, 1)), ((300, 700), (128, 1)),
                                          ((300, 700), (128, 128)), ((300, 700), (1, 100)),
                                          ((3, 30000), (3, 1)), ((30000, 3), (7, 2))],
                         ids=["cols", "colblock128", "tile128", "block100", "one-band", "thin"])
def test_tile_thread_partitions(shape, tiling, nthreads, openmp):
    """Bands, and column chunks when there are fewer bands than threads, split over POSIX
    threads or an OpenMP team: the same bits as one thread."""
    x = tile_data(shape, "float32", seed=nthreads)
    assert_tiles_match_reference(x, fp8core.resolve_codebook("e4m3"), *tiling, "pow2_torchao",
                                 nthreads=nthreads, openmp=openmp)


@pytest.mark.parametrize("want_codes,want_vals", [(True, False), (False, True)], ids=["codes", "values"])
@pytest.mark.parametrize("out_dtype", list(DTYPES))
@pytest.mark.parametrize("in_dtype", list(DTYPES))
def test_tile_outputs_independent(in_dtype, out_dtype, want_codes, want_vals):
    """Codes only / values only (any input and output dtype) equal the full call's
    outputs, and the output not asked for is not written."""
    x = tile_data((67, 131), in_dtype, seed=2)
    cb = fp8core.resolve_codebook("e4m3")
    full = kernel_quantize_tiles(x, cb, 16, 1, "pow2", out_dtype)
    part = kernel_quantize_tiles(x, cb, 16, 1, "pow2", out_dtype, want_codes=want_codes,
                                 want_vals=want_vals)
    np.testing.assert_array_equal(bits(part[2]), bits(full[2]))
    if want_codes:
        np.testing.assert_array_equal(part[0], full[0])
        assert (part[1] == 12345).all()
    else:
        np.testing.assert_array_equal(bits(part[1]), bits(full[1]))
        assert (part[0] == 0xAB).all()
    c_ref, a_ref = R.quantize_tiles(x, cb, 16, 1, "pow2")
    want = R.dequantize_tiles(c_ref, a_ref, cb, 16, 1, "pow2", DTYPES[out_dtype])
    np.testing.assert_array_equal(bits(full[1]), bits(want))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("cb_name", ["e4m3", "e5m2fnuz", "float6_e2m3fn", "bnb_e4m3", "bnb_e5m2"])
@pytest.mark.parametrize("out_dtype", list(DTYPES))
def test_dequantize_tiles_any_codebook(cb_name, out_dtype, scale):
    """Every code of every codebook (tables included) × the dscale of tiles whose absmax
    is normal, tiny, zero, NaN, inf, huge or subnormal, on a column-block tiling."""
    cb = fp8core.resolve_codebook(cb_name)
    codes = np.tile(np.arange(256, dtype=np.uint8), (16, 2))[:, :509]
    absmax = np.array([1.0, 3.5e-20, 0.0, np.nan, np.inf, 7e30, 448.0, 1e-40, 3.3e38, 0.75],
                      np.float32)
    grid = np.resize(absmax, (-(-16 // 3), 509)).astype(np.float32)
    got = kernel_dequantize_tiles(codes, grid, cb, 3, 1, scale, out_dtype, openmp=out_dtype == "float16")
    want = R.dequantize_tiles(codes, grid, cb, 3, 1, scale, DTYPES[out_dtype])
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", [64, 1000, None], ids=["block64", "block1000", "global"])
def test_flat_entry_points_honour_the_scale_rule(blocksize, dtype, scale):
    """fp8q_quantize (blockwise, global) and fp8q_dequantize with each scale rule: flat
    blocks of the row-major order are (1, B) tiles of the (1, n) matrix."""
    x = tile_data((6, 1000), dtype, seed=9).reshape(-1)
    if blocksize == 1000:
        x[2000:3000] = 1e-30
    cb = fp8core.resolve_codebook("e4m3")
    n, group = x.size, blocksize or x.size
    codes = np.full(n, 0xAB, np.uint8)
    vals = np.full(n, 12345, x.dtype)
    absmax = np.full(-(-n // group), -1, np.float32)
    K.quantize(x.ctypes.data, x.dtype.name, n, group, cb, codes_ptr=codes.ctypes.data,
               vals_ptr=vals.ctypes.data, out_dtype=x.dtype.name, absmax_ptr=absmax.ctypes.data,
               nthreads=2, openmp=dtype == "float16", scale=scale)
    c_ref, a_ref = R.quantize_tiles(x.reshape(1, -1), cb, 1, group, scale)
    v_ref = R.dequantize_tiles(c_ref, a_ref, cb, 1, group, scale, x.dtype).reshape(-1)
    np.testing.assert_array_equal(codes, c_ref.reshape(-1))
    np.testing.assert_array_equal(bits(absmax), bits(a_ref.reshape(-1)))
    np.testing.assert_array_equal(bits(vals), bits(v_ref))
    deq = np.full(n, 12345, x.dtype)
    K.dequantize(codes.ctypes.data, n, group, absmax.ctypes.data, cb, vals_ptr=deq.ctypes.data,
                 out_dtype=x.dtype.name, nthreads=2, scale=scale)
    np.testing.assert_array_equal(bits(deq), bits(v_ref))


def test_pow2_torchao_round_up_at_every_threshold():
    """Absmax values whose q0 = fl(M / a) falls just below and at or above each finite
    threshold T[E]: the kernel takes E or E + 1 exactly where the reference does (both
    outcomes occur, so the comparison tests the rule), in quantize and dequantize."""
    from fp8core.recipe import pow2_torchao_thresholds

    cb = fp8core.resolve_codebook("e4m3")
    t = pow2_torchao_thresholds()
    targets = t[np.isfinite(t)]
    a = (np.float32(cb.max) / targets).astype(np.float32)
    cand = np.concatenate([a] + [np.nextafter(a, np.float32(s * np.inf)) for s in (1, -1)] +
                          [np.nextafter(np.nextafter(a, np.float32(s * np.inf)), np.float32(s * np.inf))
                           for s in (1, -1)])
    cand = cand[(cand > cb.scale_floor) & (cand < cb.scale_ceiling)].astype(np.float32)
    _, q_down, _ = R.group_scales(cand, cb, "pow2")
    _, q_torchao, _ = R.group_scales(cand, cb, "pow2_torchao")
    rounded_up = q_torchao != q_down
    assert rounded_up.any() and (~rounded_up).any(), "the candidates miss one side of the rule"
    x = np.stack([cand, -cand / 3, cand / 7], axis=1)          # each row: absmax = cand
    assert_tiles_match_reference(x, cb, 1, 3, "pow2_torchao")
    codes = np.full(x.shape, 0x7E, np.uint8)                    # 448: the largest code
    got = kernel_dequantize_tiles(codes, cand.reshape(-1, 1), cb, 1, 3, "pow2_torchao")
    want = R.dequantize_tiles(codes, cand.reshape(-1, 1), cb, 1, 3, "pow2_torchao")
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("scale", ["pow2", "pow2_torchao"])
def test_pow2_values_overflow_only_near_flt_max(scale):
    """Power-of-two scales round qscale down, so dscale = 1/qscale can exceed absmax / M:
    near FLT_MAX the largest codes dequantize to inf. The kernel gives the reference's
    bits (infs included), and infs occur only for |x| >= 2**127."""
    rng = np.random.default_rng(11)
    x = np.float32(3.4e38) * rng.uniform(-1, 1, (8, 64)).astype(np.float32)
    x[0, 0] = np.float32(3.4028235e38)
    x[4:] *= np.float32(1e-20)
    cb = fp8core.resolve_codebook("e4m3")
    assert_tiles_match_reference(x, cb, 1, 64, scale)
    c_ref, a_ref = R.quantize_tiles(x, cb, 1, 64, scale)
    v_ref = R.dequantize_tiles(c_ref, a_ref, cb, 1, 64, scale)
    assert np.isinf(v_ref).any(), "expected the reference to overflow near FLT_MAX"
    assert (np.abs(x[np.isinf(v_ref)]) >= 2.0**127).all()


def test_tile_arguments_checked():
    """Bad sizes, dtypes or scale rules raise ValueError (the C entry points return -1);
    empty arrays write nothing."""
    cb = fp8core.resolve_codebook("e4m3")
    x = np.zeros((4, 4), np.float32)
    out = np.zeros(16, np.uint8)
    am = np.full(16, -1, np.float32)
    kw = dict(codes_ptr=out.ctypes.data, vals_ptr=None, out_dtype="float32",
              absmax_ptr=am.ctypes.data, nthreads=1)
    with pytest.raises(ValueError, match="scale must be one of"):
        K.quantize_tiles(x.ctypes.data, "float32", 4, 4, 2, 2, cb, scale="pow3", **kw)
    with pytest.raises(ValueError, match="rejected"):
        K.quantize_tiles(x.ctypes.data, "float32", 4, 4, 0, 2, cb, **kw)
    with pytest.raises(ValueError, match="rejected"):
        K.quantize_tiles(x.ctypes.data, "float32", -1, 4, 2, 2, cb, **kw)
    with pytest.raises(ValueError, match="rejected"):  # a table is not rounded by the kernel
        K.quantize_tiles(x.ctypes.data, "float32", 4, 4, 2, 2, fp8core.resolve_codebook("bnb_e4m3"), **kw)
    with pytest.raises(ValueError, match="scale must be one of"):
        K.dequantize(out.ctypes.data, 16, 4, am.ctypes.data, cb, vals_ptr=x.ctypes.data,
                     out_dtype="float32", nthreads=1, scale="fp16")
    for rows, cols in ((0, 4), (4, 0)):
        K.quantize_tiles(x.ctypes.data, "float32", rows, cols, 2, 2, cb, **kw)
        K.dequantize_tiles(out.ctypes.data, rows, cols, 2, 2, am.ctypes.data, cb, vals_ptr=x.ctypes.data,
                           out_dtype="float32", nthreads=1)
    assert (am == -1).all() and (out == 0).all() and (x == 0).all()


# -------------------------------------------------------------------------- JAX's custom calls
@pytest.fixture(scope="module")
def ffi():
    pytest.importorskip("jax")
    from fp8core_jax import _ffi

    if not K.ENABLED or not _ffi.available():
        pytest.skip(f"JAX's custom calls are unavailable: {_ffi._STATE.get('why', 'FP8CORE_KERNEL=0')}")
    return _ffi


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tiling", [("cols(R,1)", None, 1), ("colblock(16,1)", 16, 1),
                                    ("tile(8,8)", 8, 8), ("block(1,100)", 1, 100)], ids=lambda t: t[0])
def test_ffi_tiles_match_reference(ffi, tiling, dtype, scale):
    """_ffi.quantize_tiles / dequantize_tiles under jax.jit on CPU: codes, absmax grid,
    fake-quantized and dequantized values equal the reference bit for bit."""
    import jax
    import jax.numpy as jnp

    shape = (67, 131)
    tr, tc = _tiling(shape, *tiling[1:])
    x = tile_data(shape, dtype, seed=4)
    cb = fp8core.resolve_codebook("e4m3")
    vals, codes, absmax = jax.jit(lambda x: ffi.quantize_tiles(x, cb, tr, tc, scale=scale, out_dtype=x.dtype,
                                                               want_codes=True))(jnp.asarray(x))
    c_ref, a_ref = R.quantize_tiles(x, cb, tr, tc, scale)
    v_ref = R.dequantize_tiles(c_ref, a_ref, cb, tr, tc, scale, x.dtype)
    np.testing.assert_array_equal(np.asarray(codes), c_ref)
    np.testing.assert_array_equal(bits(np.asarray(absmax)), bits(a_ref))
    np.testing.assert_array_equal(bits(np.asarray(vals)), bits(v_ref))
    deq = jax.jit(lambda c, a: ffi.dequantize_tiles(c, a, cb, tr, tc, x.dtype, scale=scale))(
        jnp.asarray(c_ref), jnp.asarray(a_ref))
    assert deq.shape == shape and deq.dtype == x.dtype
    np.testing.assert_array_equal(bits(np.asarray(deq)), bits(v_ref))


def test_ffi_tile_outputs_and_flat_scale_rules(ffi):
    """Codes only (values None) and values only (codes None) from _ffi.quantize_tiles; the
    flat _ffi.quantize / _ffi.dequantize honour ``scale=``; a table dequantizes."""
    import jax
    import jax.numpy as jnp

    x = tile_data((40, 96), "bfloat16", seed=6)
    cb = fp8core.resolve_codebook("e5m2")
    c_ref, a_ref = R.quantize_tiles(x, cb, 4, 1, "pow2_torchao")
    vals, codes, absmax = ffi.quantize_tiles(jnp.asarray(x), cb, 4, 1, scale="pow2_torchao", out_dtype=None,
                                             want_codes=True)
    assert vals is None
    np.testing.assert_array_equal(np.asarray(codes), c_ref)
    vals, codes, absmax = ffi.quantize_tiles(jnp.asarray(x), cb, 4, 1, scale="pow2_torchao",
                                             out_dtype=jnp.float32, want_codes=False)
    assert codes is None
    np.testing.assert_array_equal(bits(np.asarray(vals)),
                                  bits(R.dequantize_tiles(c_ref, a_ref, cb, 4, 1, "pow2_torchao")))
    np.testing.assert_array_equal(bits(np.asarray(absmax)), bits(a_ref))
    for scale in SCALES:
        flat = x.reshape(1, -1)
        fc_ref, fa_ref = R.quantize_tiles(flat, cb, 1, 64, scale)
        _, fcodes, fabsmax = jax.jit(lambda x: ffi.quantize(x, cb, 64, out_dtype=None, want_codes=True,
                                                            scale=scale))(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(fcodes), fc_ref.reshape(-1))
        np.testing.assert_array_equal(bits(np.asarray(fabsmax)), bits(fa_ref.reshape(-1)))
        fv = ffi.dequantize(jnp.asarray(fc_ref.reshape(-1)), jnp.asarray(fa_ref.reshape(-1)), cb, 64,
                            jnp.float32, scale=scale)
        np.testing.assert_array_equal(bits(np.asarray(fv)),
                                      bits(R.dequantize_tiles(fc_ref, fa_ref, cb, 1, 64, scale).reshape(-1)))
    table = fp8core.resolve_codebook("bnb_e4m3")
    tc = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    ta = np.array([[1.0], [np.nan], [0.0], [5e10]], np.float32)
    got = ffi.dequantize_tiles(jnp.asarray(tc), jnp.asarray(ta), table, 1, 256, jnp.float16)
    np.testing.assert_array_equal(bits(np.asarray(got)),
                                  bits(R.dequantize_tiles(tc, ta, table, 1, 256, dtype=np.float16)))
