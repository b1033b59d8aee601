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
