"""FP8 (and MX sub-byte) format specifications, derived from ml_dtypes.

Every figure here is read from ``ml_dtypes.finfo`` or obtained by decoding the
format's bit patterns with ml_dtypes; nothing numeric is typed in. Format names
follow ml_dtypes (``float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, "fn" =
finite with NaN, no infinities; "fnuz" = finite, NaN, unsigned zero).
"""

from __future__ import annotations

import dataclasses
import functools

import ml_dtypes
import numpy as np

from fp8core import _validation

__all__ = [
    "FormatSpec",
    "FORMAT_NAMES",
    "ALIASES",
    "get_format",
    "all_formats",
]

#: Every element/scale type ml_dtypes provides, in the order the docs list them.
FORMAT_NAMES: tuple[str, ...] = (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3",
    "float8_e3m4",
    "float8_e4m3b11fnuz",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
)

#: Short names. ``e4m3``/``e5m2`` mean the OCP FP8 formats used for training.
ALIASES: dict[str, str] = {
    "e4m3": "float8_e4m3fn",
    "e4m3fn": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "e4m3fnuz": "float8_e4m3fnuz",
    "e5m2fnuz": "float8_e5m2fnuz",
    "e4m3_ieee": "float8_e4m3",
    "e3m4": "float8_e3m4",
    "e4m3b11fnuz": "float8_e4m3b11fnuz",
    "e8m0": "float8_e8m0fnu",
    "e8m0fnu": "float8_e8m0fnu",
    "e2m3": "float6_e2m3fn",
    "e3m2": "float6_e3m2fn",
    "e2m1": "float4_e2m1fn",
}

# Which frameworks name the dtype (torch 2.13, jax 0.10). Naming metadata only:
# fp8core never imports either framework.
_TORCH_DTYPES = frozenset(
    {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
)
_JAX_DTYPES = frozenset(FORMAT_NAMES)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """One floating-point storage format, as ml_dtypes defines it.

    Attributes:
      name: the ml_dtypes name, e.g. ``"float8_e4m3fn"``.
      aliases: short names that resolve to this format.
      exponent_bits, mantissa_bits, total_bits: the bit layout (``total_bits``
        counts the sign bit when there is one).
      signed: whether the format has a sign bit.
      max: largest finite value.
      smallest_normal, smallest_subnormal: smallest positive normal and
        subnormal values (equal when the format has no subnormals).
      has_inf, has_nan, has_negative_zero: special values the format encodes.
      inf_codes, nan_codes: bit patterns that decode to ±inf / NaN.
      torch_dtype, jax_dtype: the framework dtype names, or ``None`` where the
        framework has no such dtype.
    """

    __hash__ = _validation.cached_hash
    __getstate__ = _validation.state_without_hash

    name: str
    aliases: tuple[str, ...]
    exponent_bits: int
    mantissa_bits: int
    total_bits: int
    signed: bool
    max: float
    smallest_normal: float
    smallest_subnormal: float
    has_inf: bool
    has_nan: bool
    has_negative_zero: bool
    inf_codes: tuple[int, ...]
    nan_codes: tuple[int, ...]
    torch_dtype: str | None
    jax_dtype: str | None

    @property
    def ml_dtype(self) -> np.dtype:
        """The numpy dtype ml_dtypes provides for this format."""
        return np.dtype(getattr(ml_dtypes, self.name))

    @property
    def num_codes(self) -> int:
        return 1 << self.total_bits

    def decode(self) -> np.ndarray:
        """float32 value of every bit pattern 0 … 2**total_bits − 1."""
        return _decode(self.name)

    def __repr__(self) -> str:
        return f"FormatSpec({self.name!r}, max={self.max!r}, bits={self.total_bits})"


@functools.lru_cache(maxsize=None)
def _decode(name: str) -> np.ndarray:
    dtype = getattr(ml_dtypes, name)
    bits = ml_dtypes.finfo(dtype).bits
    values = np.arange(1 << bits, dtype=np.uint8).view(dtype).astype(np.float32)
    values.setflags(write=False)
    return values


@functools.lru_cache(maxsize=None)
def _build(name: str) -> FormatSpec:
    dtype = getattr(ml_dtypes, name)
    fi = ml_dtypes.finfo(dtype)
    values = _decode(name)
    codes = np.arange(values.size)
    inf_codes = tuple(int(c) for c in codes[np.isinf(values)])
    nan_codes = tuple(int(c) for c in codes[np.isnan(values)])
    negative_zero = bool(np.any((values == 0) & np.signbit(values)))
    signed = bool(np.any(values < 0)) or negative_zero
    return FormatSpec(
        name=name,
        aliases=tuple(sorted(a for a, n in ALIASES.items() if n == name)),
        exponent_bits=int(fi.nexp),
        mantissa_bits=int(fi.nmant),
        total_bits=int(fi.bits),
        signed=signed,
        max=float(fi.max),
        smallest_normal=float(fi.smallest_normal),
        smallest_subnormal=float(fi.smallest_subnormal),
        has_inf=bool(inf_codes),
        has_nan=bool(nan_codes),
        has_negative_zero=negative_zero,
        inf_codes=inf_codes,
        nan_codes=nan_codes,
        torch_dtype=name if name in _TORCH_DTYPES else None,
        jax_dtype=name if name in _JAX_DTYPES else None,
    )


def _valid_names() -> str:
    return ", ".join(FORMAT_NAMES) + "; aliases: " + ", ".join(sorted(ALIASES))


def get_format(name: str | FormatSpec) -> FormatSpec:
    """Look up a format by ml_dtypes name or alias.

    Raises:
      TypeError: ``name`` is not a string.
      ValueError: ``name`` is not a known format; the message lists the valid ones.
    """
    if isinstance(name, FormatSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a format name (str), got {type(name).__name__}: {name!r}")
    canonical = ALIASES.get(name.lower(), name.lower())
    if canonical not in FORMAT_NAMES:
        raise ValueError(f"unknown format {name!r}; valid formats: {_valid_names()}")
    return _build(canonical)


def all_formats() -> tuple[FormatSpec, ...]:
    """Every format spec, in ``FORMAT_NAMES`` order."""
    return tuple(_build(n) for n in FORMAT_NAMES)
