"""OCP microscaling (MX) block scales: the e8m0 scale byte of a block from its absmax,
under each of torchao 0.18's four ``ScaleCalculationMode`` rules (docs/numerics.md §11).

A block's shared scale is a power of two stored as a ``float8_e8m0fnu`` byte ``b``
(value ``2**(b - 127)``; ``0xFF`` is NaN). The rules, with ``a`` the block's absmax
(§3.2: NaN-propagating, a float32-subnormal maximum stored as +0), ``E(v)`` the biased
float32 exponent field of ``v``, ``emax`` the exponent of the element format's largest
power of two (e4m3 8, e5m2 15, e2m3 2, e3m2 4, e2m1 2) and ``mbits`` its mantissa bits:

* ``floor`` (the OCP MX v1.0 rule): ``b = clamp(E(a) − 127 − emax, −127, 128) + 127``;
* ``ceil``: as floor with ``E(a) + 1`` when ``a``'s mantissa field is non-zero;
* ``even``: as floor of ``a'`` whose bits are ``(bits(a) + 2**(22 − mbits)) & 0xFF800000``
  (``a`` rounded to ``mbits`` mantissa bits, ties away from zero, a carry moving it
  to the next binade);
* ``rceil`` (cuBLAS' UE8M0 rule, in torchao's eager form): ``d = fl(a / max)``;
  ``b = clamp(ceil(fl(log2 d)), −127, 127) + 127`` with a correctly rounded float32
  ``log2`` (``d = 0`` gives ``b = 0``); ``a = +inf`` gives ``b = 254``.

A NaN absmax gives ``b = 255`` in every mode. Elements are scaled by ``qscale`` and
decoded with ``dscale`` (both exact powers of two, :func:`byte_scales`):

* floor / ceil / even: ``qscale = 2**(127 − max(b, 1))`` — torchao divides by
  ``max(2**(b − 127), 2**−126)``, the same rounding for a power of two;
* rceil: ``qscale = 2**(127 − b)``, except ``1`` for ``b = 0``;
* every mode: ``dscale = 2**(b − 127)`` (a float32 subnormal for ``b = 0``), NaN for ``b = 255``.

Backends do not re-derive the rules: every rule is monotone in ``a``, so
:func:`byte_table` gives the absmax bit patterns at which ``b`` steps, and a backend's
byte is a search of ``bits(a)`` in it (integer compares: no float32-subnormal arithmetic
that a flush-to-zero unit would change).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from fp8core.codebooks import Codebook

__all__ = [
    "SCALE_MODES",
    "MX_SCALE_RULES",
    "MX_ELEMENT_FORMATS",
    "E8M0_NAN",
    "mode_of",
    "element_emax",
    "pack_unit",
    "scale_bytes",
    "byte_scales",
    "byte_table",
    "binade_table",
    "e8m0_values",
    "mx_rule",
    "scales_shape",
    "scales_layout",
    "expand_scales",
    "check_scales",
]

#: torchao 0.18 ``ScaleCalculationMode`` values.
SCALE_MODES: tuple[str, ...] = ("floor", "ceil", "even", "rceil")
#: The scale rules of :class:`fp8core.recipe.OperandRule` that are MX modes.
MX_SCALE_RULES: tuple[str, ...] = tuple(f"mx_{m}" for m in SCALE_MODES)
#: Element formats the OCP MX v1.0 spec defines (and torchao's ``to_mx`` takes).
MX_ELEMENT_FORMATS: tuple[str, ...] = (
    "float8_e4m3fn", "float8_e5m2", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn")
#: The e8m0 NaN byte.
E8M0_NAN = 255

_U32 = np.uint32


def mode_of(scale_rule: str) -> str:
    """``"mx_floor"`` → ``"floor"`` (ValueError for a rule that is not an MX mode)."""
    if scale_rule not in MX_SCALE_RULES:
        raise ValueError(f"not an MX scale rule: {scale_rule!r}; MX rules: {', '.join(MX_SCALE_RULES)}")
    return scale_rule[3:]


def _element(codebook: Codebook):
    fmt = codebook.format
    if fmt is None or fmt.name not in MX_ELEMENT_FORMATS:
        raise ValueError(
            f"{codebook.name} is not an MX element format; MX defines {', '.join(MX_ELEMENT_FORMATS)}")
    return fmt


def element_emax(codebook: Codebook) -> int:
    """The exponent of the largest power of two ≤ the element format's max
    (``F8E4M3_MAX_POW2`` … in torchao's constants)."""
    return math.frexp(float(_element(codebook).max))[1] - 1


def pack_unit(codebook: Codebook) -> int:
    """Elements per whole number of bytes when packed (an MX block size must be a
    multiple): 1 for 8-bit, 2 for 4-bit (two per byte), 4 for 6-bit (four per 3 bytes)."""
    bits = _element(codebook).total_bits
    return 8 // math.gcd(8, bits)


def _floor_bytes(bits: np.ndarray, emax: int, up: np.ndarray | bool = False) -> np.ndarray:
    """``clamp(E − 127 (+ up) − emax, −127, 128) + 127`` (torchao clamps after ceil's +1)."""
    e = ((bits >> _U32(23)) & _U32(0xFF)).astype(np.int64) - 127 + up
    return (np.clip(e - emax, -127, 128) + 127).astype(np.int64)


@functools.lru_cache(maxsize=None)
def _log2_round_down() -> dict[int, float]:
    """``T[k]`` for ``k`` in −149 … 127: a float32 ``d`` in ``(2**k, 2**(k+1))`` has a
    correctly rounded float32 ``log2`` equal to ``k`` exactly when ``d ≤ T[k]``.

    ``fl(log2 d) = k`` iff ``log2 d − k < h``, ``h`` half the float32 spacing just above
    ``k`` toward ``k + 1`` (no ties: the log of a float32 that is not a power of two is
    irrational). With ``d = 2**k (1 + j·u)`` (``u`` the spacing of ``d``'s binade relative
    to ``2**k``), that is ``j·u < expm1(h ln 2)``.
    """
    out = {}
    for k in range(-149, 128):
        if k == 0:
            out[k] = 1.0                      # log2 just above 0 is representable: never 0
            continue
        mag = abs(k)
        m = math.floor(math.log2(mag))
        if k > 0:
            spacing = 2.0 ** (m - 23)          # [k, k + 1) lies in k's binade
        else:                                  # (k, k + 1): magnitudes just below |k|
            spacing = 2.0 ** (m - 24) if mag == 2 ** m else 2.0 ** (m - 23)
        u = 2.0 ** -23 if k >= -126 else 2.0 ** -(k + 149)
        lim = math.expm1(spacing / 2 * math.log(2)) / u
        assert abs(lim - round(lim)) > 1e-6, (k, lim)    # far from an integer: float64 is enough
        j = math.ceil(lim) - 1
        out[k] = float(np.float32(2.0 ** k * (1 + j * u)))
    return out


def _ceil_log2(d: np.ndarray) -> np.ndarray:
    """``ceil(fl(log2 d))`` (correctly rounded float32 log2) of positive finite float32 ``d``."""
    t = _log2_round_down()
    mant, exp = np.frexp(d.astype(np.float64))          # exact: d = mant · 2**exp, mant ∈ [0.5, 1)
    k = exp.astype(np.int64) - 1
    pow2 = mant == 0.5
    thr = np.array([t[int(v)] for v in k.reshape(-1)], np.float64).reshape(k.shape)
    return np.where(pow2 | (d.astype(np.float64) <= thr), k, k + 1)


def scale_bytes(absmax: Any, codebook: Codebook, mode: str) -> np.ndarray:
    """The e8m0 byte of each block from its float32 ``absmax`` (§3.2 form) — the rules of
    the module docstring, computed directly (the specification; see :func:`byte_table`)."""
    a = np.ascontiguousarray(np.asarray(absmax, np.float32))
    bits = a.view(_U32)
    fmt = _element(codebook)
    emax = element_emax(codebook)
    nan = np.isnan(a)
    if mode == "floor":
        b = _floor_bytes(bits, emax)
    elif mode == "ceil":
        b = _floor_bytes(bits, emax, ((bits & _U32(0x7FFFFF)) > 0).astype(np.int64))
    elif mode == "even":
        rounded = (bits.astype(np.uint64) + (1 << (22 - fmt.mantissa_bits))) & 0xFF800000
        b = _floor_bytes(rounded.astype(_U32), emax)
    elif mode == "rceil":
        with np.errstate(invalid="ignore"):
            d = (a / np.float32(fmt.max)).astype(np.float32)
        b = np.zeros(a.shape, np.int64)
        pos = np.isfinite(d) & (d > 0)
        if pos.any():
            b[pos] = np.clip(_ceil_log2(d[pos]), -127, 127) + 127
        b = np.where(np.isinf(a), 254, b)
    else:
        raise ValueError(f"scale_mode must be one of {', '.join(SCALE_MODES)}, got {mode!r}")
    return np.where(nan, E8M0_NAN, b).astype(np.uint8)


def byte_scales(b: Any, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(finite, qscale, dscale)`` float32 of e8m0 bytes under ``mode`` (module docstring);
    a NaN byte gives ``finite = False``, ``qscale = 0``, ``dscale = NaN``."""
    b = np.asarray(b).astype(np.int64)
    if mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {', '.join(SCALE_MODES)}, got {mode!r}")
    finite = b != E8M0_NAN
    if mode == "rceil":                                # torchao/TE: 1 for b = 0 (not 2**127)
        qscale = np.where(b == 0, 1.0, np.ldexp(1.0, 127 - b))
    else:
        qscale = np.ldexp(1.0, 127 - np.maximum(b, 1))
    dscale = np.ldexp(1.0, b - 127)
    qscale = np.where(finite, qscale, 0.0).astype(np.float32)
    dscale = np.where(finite, dscale, np.nan).astype(np.float32)
    return finite, qscale, dscale


def e8m0_values(b: Any) -> np.ndarray:
    """float32 value of e8m0 bytes: ``2**(b − 127)``, NaN for 255."""
    b = np.asarray(b).astype(np.int64)
    return np.where(b == E8M0_NAN, np.nan, np.ldexp(1.0, b - 127)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def byte_table(format_name: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds, bytes)``: uint32 absmax bit patterns (ascending, the first 0) and
    the byte from each one up to the next — for absmax ``a`` (not NaN),
    ``byte = bytes[searchsorted(thresholds, bits(a), side="right") − 1]``, equal to
    :func:`scale_bytes` for every float32 ``a`` in ``[0, +inf]`` (each rule is monotone
    in ``a``; the steps are found by bisection on the bit patterns)."""
    from fp8core.codebooks import resolve_codebook
    cb = resolve_codebook(format_name)

    def byte_of(bits: np.ndarray) -> np.ndarray:
        return scale_bytes(bits.astype(_U32).view(np.float32), cb, mode).astype(np.int64)

    top = np.array([0x7F800000], _U32)
    lo_b, hi_b = int(byte_of(np.array([0], _U32))[0]), int(byte_of(top)[0])
    targets = np.arange(lo_b + 1, hi_b + 1)
    lo = np.zeros(targets.size, np.int64)                  # byte(lo) < target
    hi = np.full(targets.size, 0x7F800000, np.int64)       # byte(hi) ≥ target
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = byte_of(mid) >= targets
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    starts = np.unique(np.concatenate([[0], hi]))
    thresholds = starts.astype(_U32)
    values = byte_of(thresholds).astype(np.uint8)
    assert np.all(np.diff(values.astype(np.int64)) > 0)
    thresholds.setflags(write=False)
    values.setflags(write=False)
    return thresholds, values


@functools.lru_cache(maxsize=None)
def binade_table(format_name: str, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`byte_table` per float32 binade, and :func:`byte_scales` as exponents: four
    read-only int32[256] arrays ``(base, step, qexp, dexp)``.

    ``base[E]`` is the byte at the first bit pattern of the binade with exponent field
    ``E``, ``step[E]`` the bit pattern inside it where the byte steps up by one
    (``2**31 − 1``: none). Every rule steps at most once inside a binade (checked here), so
    for absmax bits ``u`` (not NaN) the byte is ``base[u >> 23] + (u >= step[u >> 23])``:
    two lookups and an integer compare. ``qexp[b]``, ``dexp[b]``: the ``k`` of
    ``qscale = 2**k`` and ``dscale = 2**k`` of each byte (0 for the NaN byte, unused).
    Backends that cannot search (the C kernel, XLA) execute the rules from these.
    """
    thresholds, values = byte_table(format_name, mode)
    t = thresholds.astype(np.int64)
    starts = np.arange(256, dtype=np.int64) << 23
    base = values[np.searchsorted(t, starts, side="right") - 1].astype(np.int32)
    step = np.full(256, 0x7FFFFFFF, np.int32)
    for e, lo in enumerate(starts):
        inner = t[(t > lo) & (t < lo + (1 << 23))]
        if inner.size > 1 or (inner.size and values[t == inner[0]][0] != base[e] + 1):
            raise AssertionError(f"{format_name}/{mode}: more than one byte step in binade {e}")
        if inner.size:
            step[e] = inner[0]
    finite, qscale, dscale = byte_scales(np.arange(256), mode)

    def log2(v: np.ndarray) -> np.ndarray:
        frac, exp = np.frexp(np.where(finite, v, 1).astype(np.float64))
        if not np.all(frac == 0.5):
            raise AssertionError("MX scales are powers of two")
        return (exp - 1).astype(np.int32)

    out = (base, step, log2(qscale), log2(dscale))
    for a in out:
        a.setflags(write=False)
    return out


# ---------------------------------------------------------------- quantize_mx's arguments
def mx_rule(element_format: Any, block_size: Any, scale_mode: Any):
    """The :class:`fp8core.recipe.OperandRule` ``quantize_mx`` runs (every backend), with
    the errors naming its arguments."""
    from fp8core import _validation, recipe
    from fp8core.codebooks import resolve_codebook
    cb = resolve_codebook(element_format, argname="element_format")
    if cb.format is None or cb.format.name not in MX_ELEMENT_FORMATS:
        raise ValueError(f"element_format must be an MX element format "
                         f"({', '.join(MX_ELEMENT_FORMATS)}), got {cb.name}")
    _validation.check_blocksize(block_size, argname="block_size")
    unit = pack_unit(cb)
    if block_size % unit:
        raise ValueError(f"block_size must be a positive multiple of {unit} for {cb.name} "
                         f"({unit} elements pack to whole bytes), got {block_size}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {', '.join(SCALE_MODES)}, got {scale_mode!r}")
    return recipe.OperandRule(cb, recipe.block(int(block_size)), f"mx_{scale_mode}")


def scales_shape(shape: tuple[int, ...], block_size: int, axis: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` (−1, or 0 of a 2-D shape) shortened to ``ceil(n / block_size)``."""
    ax = axis % len(shape) if shape else 0
    out = list(shape)
    out[ax] = -(-shape[ax] // block_size)
    return tuple(out)


def scales_layout(groups: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """quantize_operand's ``(rows, groups)`` absmax-grid layout → :func:`scales_shape`."""
    if len(shape) == 2 and axis in (0, -2):
        return np.ascontiguousarray(groups.T)
    return np.ascontiguousarray(groups.reshape(*shape[:-1], groups.shape[-1]))


def expand_scales(s: np.ndarray, shape: tuple[int, ...], block_size: int, axis: int) -> np.ndarray:
    """Per-block values broadcast to every element of their block (``shape``)."""
    ax = axis % len(shape)
    return np.repeat(s, block_size, axis=ax).take(np.arange(shape[ax]), axis=ax)


def check_scales(dtype_name: str, shape: tuple[int, ...], codes_shape: tuple[int, ...],
                 block_size: int, axis: int) -> None:
    if dtype_name != "uint8":
        raise TypeError(f"scales must be uint8 e8m0 bytes, got dtype {dtype_name}")
    want = scales_shape(codes_shape, block_size, axis)
    if tuple(shape) != want:
        raise ValueError(f"scales must have shape {want} for codes of shape {codes_shape} "
                         f"(block_size={block_size}, axis={axis}), got {tuple(shape)}")
