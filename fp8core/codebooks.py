"""Codebooks: the map from an 8-bit code to the float32 value it stands for.

Two kinds, one interface:

* **native** codebooks belong to an ml_dtypes format. The code *is* the format's
  bit pattern (decoded with ml_dtypes), so quantized data can be viewed as a real
  float8 tensor. Rounding is round-to-nearest-even, exactly ml_dtypes' cast.
* **table** codebooks are 256 float32 entries indexed by code, as bitsandbytes
  used them (``create_fp8_map``). Rounding is to the nearest entry; an exact tie
  goes to the lower entry; equal entries resolve to the lowest code.

A codebook is a frozen, hashable value: usable as torch ``ctx`` data and as a
static argument under ``jax.jit``. Arrays derived from it are computed once and
cached on the instance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from fp8core import _validation
from fp8core import formats as _formats

__all__ = [
    "Codebook",
    "create_fp8_map",
    "resolve_codebook",
    "LEGACY_NAMES",
]

_F32 = np.float32
F32_SMALLEST_NORMAL = _F32(np.finfo(np.float32).smallest_normal)  # 2**-126
F32_MAX = _F32(np.finfo(np.float32).max)
#: float32 bit pattern every backend stores for a NaN absmax.
CANONICAL_NAN_BITS = np.uint32(0x7FC00000)

TABLE_SIZE = 256

#: Names that resolve to bitsandbytes' legacy maps (see ``create_fp8_map``).
LEGACY_NAMES: dict[str, tuple[bool, int, int, int]] = {
    "bnb_e4m3": (True, 4, 3, 8),
    "bnb_e5m2": (True, 5, 2, 8),
}

_SCALE_ONLY = {"float8_e8m0fnu"}


@dataclasses.dataclass(frozen=True)
class Codebook:
    """Code → value map plus everything the quantizers derive from it.

    Attributes:
      name: a readable name (the format name for native codebooks).
      format: the :class:`FormatSpec` for native codebooks, ``None`` for tables.
      table: the float32 values indexed by code, as little-endian bytes (kept as
        bytes so the codebook stays hashable; use :attr:`values`).

    Build one with :meth:`from_format`, :meth:`from_table`, :func:`create_fp8_map`
    or :func:`resolve_codebook`.
    """

    __hash__ = _validation.cached_hash
    __getstate__ = _validation.state_without_hash

    name: str
    format: _formats.FormatSpec | None
    table: bytes = dataclasses.field(repr=False)

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_format(cls, fmt: str | _formats.FormatSpec) -> "Codebook":
        """The native codebook of a format (all 2**bits patterns decoded)."""
        return _native(_formats.get_format(fmt).name)

    @classmethod
    def from_table(cls, values: Any, name: str | None = None) -> "Codebook":
        """A table codebook from 256 finite values indexed by code.

        ``values`` may be of any real floating dtype, ml_dtypes' float8/6/4 included
        (converted to float32 exactly).

        Raises:
          TypeError: ``values`` is not a real floating-point array.
          ValueError: wrong shape or length, non-finite entries, all zero, or no zero
            entry (zeros, values that round to zero and the fill code of non-finite
            groups are coded as the table's zero, docs/numerics.md §1).
        """
        arr = np.asarray(values)
        if arr.dtype.kind != "f" and arr.dtype.name not in ("bfloat16", *_formats.FORMAT_NAMES):
            raise TypeError(
                f"codebook table must be a real floating-point array of {TABLE_SIZE} values, "
                f"got dtype {arr.dtype.name}"
            )
        if arr.shape != (TABLE_SIZE,):
            raise ValueError(
                f"codebook table must have shape ({TABLE_SIZE},), got shape {tuple(arr.shape)}"
            )
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError("codebook table must contain only finite values")
        if not np.any(arr != 0):
            raise ValueError("codebook table must contain a non-zero value")
        if name is None:
            name = f"table[{arr.min():.4g}..{arr.max():.4g}]"
        return cls(name=name, format=None, table=arr.astype("<f4").tobytes())

    def __post_init__(self) -> None:
        if self.format is None:
            vals = np.frombuffer(self.table, dtype="<f4")
            if not np.any(vals == 0):
                raise ValueError(
                    "codebook table must contain a zero entry (0.0 or -0.0): zeros, values that "
                    "round to zero and non-finite groups are coded as it; the smallest |entry| "
                    f"is {float(np.min(np.abs(vals))):.6g}"
                )
        if self.format is not None and self.format.name in _SCALE_ONLY:
            raise ValueError(
                f"{self.format.name} is a scale-only format (unsigned, no zero) and cannot be "
                f"used as an element codebook; use it for scales, or pick one of: "
                f"{', '.join(n for n in _formats.FORMAT_NAMES if n not in _SCALE_ONLY)}"
            )

    # ------------------------------------------------------------- properties
    @property
    def is_native(self) -> bool:
        return self.format is not None

    @property
    def tie_rule(self) -> str:
        """``"even"`` (native: IEEE round-half-to-even) or ``"lower"`` (tables)."""
        return "even" if self.is_native else "lower"

    @functools.cached_property
    def values(self) -> np.ndarray:
        """float32 value of every code (NaN/inf where the format encodes them)."""
        v = np.frombuffer(self.table, dtype="<f4").astype(np.float32)
        v.setflags(write=False)
        return v

    @property
    def num_codes(self) -> int:
        return int(self.values.size)

    @functools.cached_property
    def values256(self) -> np.ndarray:
        """:attr:`values` padded with NaN to 256 entries: any uint8 code decodes."""
        v = np.full(TABLE_SIZE, np.nan, dtype=np.float32)
        v[: self.num_codes] = self.values
        v.setflags(write=False)
        return v

    @functools.cached_property
    def finite(self) -> np.ndarray:
        """Boolean mask of codes with a finite value."""
        m = np.isfinite(self.values)
        m.setflags(write=False)
        return m

    @functools.cached_property
    def max(self) -> np.float32:
        """M: the largest finite magnitude. Scaled values are clamped to [−M, M]."""
        return _F32(np.max(np.abs(self.values[self.finite])))

    @functools.cached_property
    def inv_max(self) -> np.float32:
        """fl32(1 / M), the constant every dequantization multiplies by."""
        return _F32(1) / self.max

    @functools.cached_property
    def min_nonzero(self) -> np.float32:
        """Smallest non-zero finite magnitude."""
        mags = np.abs(self.values[self.finite])
        return _F32(mags[mags > 0].min())

    @functools.cached_property
    def zero_code(self) -> int:
        """Code that +0.0 (and every value rounding to zero) quantizes to."""
        zeros = np.flatnonzero(self.finite & (self.values == 0) & ~np.signbit(self.values))
        if zeros.size == 0:  # a table whose only zero is -0.0
            zeros = np.flatnonzero(self.finite & (self.values == 0))
        return int(zeros[0])

    @functools.cached_property
    def negzero_code(self) -> int | None:
        """Native formats with a −0 pattern: its code; otherwise ``None``."""
        if not self.is_native or not self.format.has_negative_zero:
            return None
        return int(np.flatnonzero((self.values == 0) & np.signbit(self.values))[0])

    @functools.cached_property
    def nan_code(self) -> int | None:
        """The code ml_dtypes gives +NaN, or ``None`` if the format has no NaN."""
        if not self.is_native or not self.format.has_nan:
            return None
        return int(np.array([np.nan], np.float32).astype(self.format.ml_dtype).view(np.uint8)[0])

    @property
    def fill_code(self) -> int:
        """Code stored for every element of a group whose absmax is NaN or ±inf."""
        return self.nan_code if self.nan_code is not None else self.zero_code

    @functools.cached_property
    def scale_floor(self) -> np.float32:
        """Smallest absmax used to build scales (a power of two).

        Chosen so that (a) ``M / floor`` is finite, (b) dequantized non-zero values
        are float32 normals (no backend's flush-to-zero can change them), and (c) a
        float32 subnormal input always quantizes to a signed zero.
        """
        k = math.ceil(math.log2(4.0 * float(self.max) / float(self.min_nonzero)))
        return _F32(2.0 ** max(-126, -126 + k))

    @functools.cached_property
    def scale_ceiling(self) -> np.float32:
        """Largest absmax used to build scales: keeps ``M / absmax`` a float32 normal."""
        m = float(self.max)
        exp = math.floor(math.log2(m)) + 126
        ceiling = F32_MAX if 2.0**exp >= float(F32_MAX) else _F32(2.0**exp)
        # the largest code must dequantize to a finite value at this absmax
        while not np.isfinite(self.max * (ceiling * self.inv_max)):
            ceiling = _F32(2.0 ** (math.floor(math.log2(float(ceiling))) - 1))
        return ceiling

    @functools.cached_property
    def _search(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes = np.flatnonzero(self.finite)
        vals = self.values[codes].astype(np.float64)
        order = np.lexsort((codes, vals))  # by value, then by code (lowest first)
        vals, codes = vals[order], codes[order]
        keep = np.ones(vals.size, dtype=bool)
        keep[1:] = vals[1:] != vals[:-1]  # −0 == +0: one entry, lowest code
        vals, codes = vals[keep], codes[keep]
        if self.is_native:
            codes = np.where(vals == 0, self.zero_code, codes)
            tie_up = (codes[1:] & 1) == 0  # half-to-even: the mantissa LSB is the code LSB
        else:
            tie_up = np.zeros(vals.size - 1, dtype=bool)
        mids = (vals[:-1] + vals[1:]) / 2.0  # exact in float64
        t = mids.astype(np.float32)
        exact = t.astype(np.float64) == mids
        down = np.nextafter(t, _F32(-np.inf))
        # s > threshold  <=>  s rounds to the upper neighbour (for float32 s)
        thresholds = np.where(exact, np.where(tie_up, down, t), np.where(t > mids, down, t))
        out = (vals.astype(np.float32), codes.astype(np.uint8), thresholds.astype(np.float32))
        for a in out:
            a.setflags(write=False)
        return out

    @property
    def sorted_values(self) -> np.ndarray:
        """Distinct finite values, ascending (float32)."""
        return self._search[0]

    @property
    def sorted_codes(self) -> np.ndarray:
        """The code of each entry of :attr:`sorted_values` (uint8)."""
        return self._search[1]

    @property
    def thresholds(self) -> np.ndarray:
        """float32 decision thresholds between neighbours of :attr:`sorted_values`.

        For a float32 ``s`` in [−M, M], the rounded entry index is the number of
        thresholds strictly below ``s`` (``searchsorted(thresholds, s, "left")``).
        The thresholds encode the tie rule exactly; see docs/numerics.md.
        """
        return self._search[2]

    def __repr__(self) -> str:
        kind = "native" if self.is_native else "table"
        return f"Codebook({self.name!r}, {kind}, max={float(self.max)!r})"


@functools.lru_cache(maxsize=None)
def _native(name: str) -> Codebook:
    fmt = _formats.get_format(name)
    return Codebook(name=fmt.name, format=fmt, table=fmt.decode().astype("<f4").tobytes())


@functools.lru_cache(maxsize=None, typed=True)  # typed: 4.0 must not hit the cache of 4
def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> Codebook:
    """bitsandbytes' legacy FP8 map, as a 256-entry table codebook.

    For every exponent field e in 0 … 2**E − 1 and mantissa pattern m of P bits,
    with bias = 2**(E − 1)::

        value = (m / 2**P) * 2**(-bias)                 if e == 0
        value = (1 + m / 2**P) * 2**(-(e - bias - 1))   otherwise

    plus the negation of each value when ``signed`` (so zero appears twice). The
    list is sorted, padded with zeros to 256 entries when ``total_bits < 8``,
    sorted again, and divided by its maximum in float32. These maps are *not*
    the OCP formats: (True, 4, 3, 8) peaks at 480 before normalization, has other
    subnormals and a gap near the bottom. See docs/numerics.md.

    Raises:
      ValueError: the bit counts are inconsistent (E + P must equal
        total_bits − signed) or out of range.
    """
    for arg, v in (("exponent_bits", exponent_bits), ("precision_bits", precision_bits),
                   ("total_bits", total_bits)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{arg} must be an int, got {type(v).__name__}: {v!r}")
    sign = 1 if signed else 0
    if not 2 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in 2..8, got {total_bits}")
    if exponent_bits < 1 or precision_bits < 0 or exponent_bits + precision_bits != total_bits - sign:
        raise ValueError(
            f"exponent_bits + precision_bits must equal total_bits - {sign} (signed={signed}); "
            f"got exponent_bits={exponent_bits}, precision_bits={precision_bits}, "
            f"total_bits={total_bits}"
        )
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for e in range(2**exponent_bits):
        for m in range(2**precision_bits):
            frac = m / 2**precision_bits
            value = frac * 2.0**-bias if e == 0 else (1 + frac) * 2.0 ** -(e - bias - 1)
            values.append(value)
            if signed:
                values.append(-value)
    values.sort()
    values += [0.0] * (TABLE_SIZE - len(values))
    values.sort()
    table = np.array(values, dtype=np.float32)
    table = table / table.max()
    name = f"bnb_fp8_map(signed={signed},e={exponent_bits},p={precision_bits},bits={total_bits})"
    return Codebook(name=name, format=None, table=table.astype("<f4").tobytes())


def resolve_codebook(spec: Any, *, argname: str = "codebook") -> Codebook:
    """Turn anything the library accepts as a codebook into a :class:`Codebook`.

    Accepts a :class:`Codebook`, a format name or alias (``"e4m3"``), a legacy
    name (``"bnb_e4m3"``, ``"bnb_e5m2"``), or 256 table values (any array-like;
    backends convert their tensors to numpy first).
    """
    if isinstance(spec, Codebook):
        return spec
    if isinstance(spec, str):
        if spec.lower() in LEGACY_NAMES:
            return create_fp8_map(*LEGACY_NAMES[spec.lower()])
        try:
            return Codebook.from_format(spec)
        except ValueError as err:
            raise ValueError(
                f"{argname}: {err}; legacy tables: {', '.join(LEGACY_NAMES)}"
            ) from None
    if isinstance(spec, _formats.FormatSpec):
        return Codebook.from_format(spec)
    from fp8core import recipe as _recipe  # (recipe imports this module)
    if isinstance(spec, (_recipe.LinearRecipe, _recipe.OperandRule)):
        kind = type(spec).__name__
        raise TypeError(
            f"{argname} must be a format name, a Codebook or {TABLE_SIZE} table values, got "
            f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind}; recipes go to recipe= (LinearFP8, matmul_fp8, "
            f"convert_to_fp8) and operand rules to quantize_operand"
        )
    if spec is None or isinstance(spec, (bool, int, float, complex)):
        raise TypeError(
            f"{argname} must be a format name, a Codebook or {TABLE_SIZE} table values, "
            f"got {type(spec).__name__}: {spec!r}"
        )
    try:
        return Codebook.from_table(spec)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{argname}: {err}") from None
