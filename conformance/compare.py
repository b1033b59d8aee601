"""Comparisons: bits as bits, and matmul-level results against a float64 oracle.

Codes compare as uint8, absmax as uint32 views, values as the bits of their own
dtype (all NaNs are one NaN). Every failure message names the first differing
element with both values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool
    worst_ulps: float = 0.0
    worst_rel: float = 0.0
    message: str = ""


def _bits(a: np.ndarray) -> np.ndarray:
    """Bits of a float array with every NaN replaced by the dtype's canonical quiet NaN."""
    a = np.asarray(a)
    if a.dtype.kind == "u":
        return a
    uint = _UINT[a.dtype.itemsize]
    b = a.view(uint).copy()
    canonical = np.array(np.nan, dtype=np.float32).astype(a.dtype).view(uint)
    b[np.isnan(a.astype(np.float64))] = canonical
    return b


def _ordered(bits: np.ndarray, itemsize: int) -> np.ndarray:
    """Map float bits to integers whose difference counts ulps (sign-magnitude → two's complement)."""
    b = bits.astype(np.int64)
    sign = np.int64(1) << np.int64(8 * itemsize - 1)
    if itemsize == 8:  # avoid overflow: treat the top bit separately
        return np.where(bits >> np.uint64(63), -(bits & np.uint64(2**63 - 1)).astype(np.int64), b)
    return np.where(b & sign, -(b & (sign - 1)), b)


def _fmt(v) -> str:
    v = np.asarray(v)
    if v.dtype.kind == "u":
        return f"0x{int(v):02X}"
    bits = v.reshape(1).view(_UINT[v.dtype.itemsize])[0]
    return f"{float(v)!r} (0x{int(bits):0{2 * v.dtype.itemsize}X})"


def compare_bits(name: str, expected: np.ndarray, actual: np.ndarray) -> Outcome:
    """Bit-for-bit equality (NaN payloads ignored); reports the first difference and max ulps."""
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return Outcome(False, np.inf, np.inf,
                       f"{name}: expected {expected.dtype.name}{list(expected.shape)}, "
                       f"got {actual.dtype.name}{list(actual.shape)}")
    eb, ab = _bits(expected), _bits(actual)
    diff = eb != ab
    if not diff.any():
        return Outcome(True)
    first = np.unravel_index(int(np.flatnonzero(diff)[0]), diff.shape)
    if expected.dtype.kind == "u":
        ulps = float(np.max(np.abs(eb.astype(np.int64) - ab.astype(np.int64))))
    else:
        ulps = float(np.max(np.abs(_ordered(eb, expected.dtype.itemsize)[diff]
                                   - _ordered(ab, expected.dtype.itemsize)[diff])))
    return Outcome(False, ulps, np.inf,
                   f"{name}: {int(diff.sum())} of {diff.size} elements differ; first at index "
                   f"{tuple(int(i) for i in first)}: expected {_fmt(expected[first])}, "
                   f"got {_fmt(actual[first])}")


def accumulation_bound(x: np.ndarray, y: np.ndarray, oracle: np.ndarray, compute_dtype: str,
                       out_dtype: str) -> np.ndarray:
    """Elementwise error bound for ``x @ y`` computed with float32 accumulation.

    ``(K + 2) · 2**-24 · (|x| @ |y|)`` for the accumulation (a standard dot-product
    bound, K = the contracted length), plus one rounding of the result to the
    compute dtype and one to the output dtype, plus the smallest normal of the
    compute dtype for products that underflow.
    """
    k = x.shape[-1]
    absprod = np.matmul(np.abs(x.astype(np.float64)), np.abs(y.astype(np.float64)))
    rounding = (_UNIT_ROUNDOFF[compute_dtype] + _UNIT_ROUNDOFF[out_dtype]) * np.abs(oracle)
    tiny = np.finfo(np.float16).smallest_normal if compute_dtype == "float16" else 2.0**-126
    return (k + 2) * 2.0**-24 * absprod + rounding + tiny


def compare_tolerance(name: str, oracle: np.ndarray, actual: np.ndarray, bound: np.ndarray,
                      ulp_dtype=None) -> Outcome:
    """``|actual − oracle| ≤ bound`` elementwise.

    Reports the worst error in ulps *at the output's scale* (the ulp, in
    ``ulp_dtype`` — default the actual dtype — of the largest |oracle| value) and
    relative to that scale.
    """
    actual = np.asarray(actual)
    if oracle.shape != actual.shape:
        return Outcome(False, np.inf, np.inf, f"{name}: expected shape {list(oracle.shape)}, got {list(actual.shape)}")
    a64 = actual.astype(np.float64)
    err = np.abs(a64 - oracle)
    err = np.where(np.isnan(a64) & np.isnan(oracle), 0.0, err)
    bad = ~(err <= bound)
    finite = np.abs(oracle[np.isfinite(oracle)])
    scale = float(finite.max()) if finite.size else 0.0
    ulp_dtype = np.dtype(ulp_dtype or actual.dtype)
    ulp = float(np.spacing(np.array(scale).astype(ulp_dtype)).astype(np.float64)) if scale else 1.0
    worst = float(np.nanmax(err)) if err.size else 0.0
    ulps, rel = worst / ulp, (worst / scale if scale else worst)
    if not bad.any():
        return Outcome(True, ulps, rel)
    first = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
    return Outcome(False, ulps, rel,
                   f"{name}: {int(bad.sum())} of {bad.size} elements outside the bound; first at index "
                   f"{tuple(int(i) for i in first)}: oracle {oracle[first]!r}, got {a64[first]!r}, "
                   f"|err| {err[first]:.3g} > bound {bound[first]:.3g}")
