"""Per-codebook constants and constant tensors for the torch backend.

Everything here is derived from an :class:`fp8core.Codebook` (never re-derived):
the python-float constants of docs/numerics.md §3.3 and the rounding plan used by
:mod:`fp8core_torch.quantize`. :class:`QuantSpec` is frozen and hashable, so it can
be ``ctx`` data of an autograd Function and a constant under ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch

import fp8core
from fp8core import _validation
from fp8core.codebooks import Codebook

__all__ = ["QuantSpec", "CodebookTensors", "resolve_spec", "codebook_tensors", "dtype_name"]

#: Rounding plans. ``"arith"``: native formats, rounded in float32 arithmetic
#: (exact, see quantize._round_native); ``"table"``: searchsorted over thresholds.
ARITH = "arith"
TABLE = "table"

_F32_EXP_MASK = 0x7F800000


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Python constants of one codebook (all exact float32 values as python floats).

    Attributes:
      codebook: the fp8core codebook these constants come from.
      max, inv_max, scale_floor, scale_ceiling: M, fl(1/M), FLOOR, CEIL (§3.3).
      plan: ``"arith"`` for native formats, ``"table"`` for table codebooks.
      mantissa_bits: native formats' explicit mantissa bits.
      k_min_bits: float32 bit pattern of the exponent field of the format's
        smallest normal (the finest binade rounding ever uses).
      k_max_bits: exponent field of M's binade (bounds K for NaN inputs, no overflow).
      k_shift_bits: ``(23 - mantissa_bits) << 23``: turns a binade 2**e into
        K = 2**(e + 23 - mantissa_bits), whose float32 ulp is the format's quantum.
      has_negative_zero: negatives rounding to zero keep their sign (§3.5).
      torch_dtype: torch's float8 dtype for this format, if torch has it.
      fill_code, zero_code, negzero_code: codes of §3.6 / §3.5.
      by_name: whether the codebook's name resolves back to it (native formats, bnb
        tables): only those can cross a custom op's schema as a string.
    """

    codebook: Codebook
    max: float
    inv_max: float
    scale_floor: float
    scale_ceiling: float
    plan: str
    mantissa_bits: int
    k_min_bits: int
    k_shift_bits: int
    k_max_bits: int
    has_negative_zero: bool
    torch_dtype: torch.dtype | None
    fill_code: int
    zero_code: int
    negzero_code: int | None
    by_name: bool = False

    @property
    def name(self) -> str:
        return self.codebook.name

    @property
    def needs_tables(self) -> bool:
        """Whether codes/values need the codebook tensors (tables, formats torch lacks)."""
        return self.torch_dtype is None

    @classmethod
    def from_codebook(cls, codebook: Codebook) -> "QuantSpec":
        return _spec(codebook)


@functools.lru_cache(maxsize=None)
def _spec(cb: Codebook) -> QuantSpec:
    mbits = kmin = shift = kmax = 0
    torch_dtype = None
    neg0 = False
    if cb.is_native:
        fmt = cb.format
        plan = ARITH
        mbits = fmt.mantissa_bits
        emin = int(round(math.log2(fmt.smallest_normal)))
        kmin = (emin + 127) << 23
        shift = (23 - mbits) << 23
        kmax = (math.floor(math.log2(float(cb.max))) + 127) << 23
        neg0 = fmt.has_negative_zero
        if fmt.torch_dtype is not None:
            torch_dtype = getattr(torch, fmt.torch_dtype, None)
    else:
        plan = TABLE
    _host_arrays(cb)  # fills the codebook's cached arrays now: traced code (torch.compile)
    #                   reading them later then runs no numpy (dynamo cannot trace setflags)
    return QuantSpec(
        codebook=cb,
        max=float(cb.max),
        inv_max=float(cb.inv_max),
        scale_floor=float(cb.scale_floor),
        scale_ceiling=float(cb.scale_ceiling),
        plan=plan,
        mantissa_bits=mbits,
        k_min_bits=kmin,
        k_shift_bits=shift,
        k_max_bits=kmax,
        has_negative_zero=neg0,
        torch_dtype=torch_dtype,
        fill_code=int(cb.fill_code),
        zero_code=int(cb.zero_code),
        negzero_code=cb.negzero_code,
        by_name=_resolves_by_name(cb),
    )


def _resolves_by_name(cb: Codebook) -> bool:
    try:
        return fp8core.resolve_codebook(cb.name) == cb
    except (TypeError, ValueError):
        return False


def resolve_spec(spec: Any, *, argname: str = "codebook") -> QuantSpec:
    """A :class:`QuantSpec` from a format name, a Codebook, a QuantSpec or 256 values.

    Torch tensors are moved to the host and handed to :func:`fp8core.resolve_codebook`
    (a code tensor must hold 256 real floating-point values; bfloat16 and float8 tensors
    are converted to float32 first, exactly).
    """
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dtype.is_floating_point and spec.dtype not in (torch.float16, torch.float32,
                                                               torch.float64):
            # bfloat16 and the float8 dtypes have no numpy twin: float32 holds them exactly
            spec = spec.detach().to(torch.float32)
        spec = spec.detach().cpu().numpy()
    return _spec(fp8core.resolve_codebook(spec, argname=argname))


class CodebookTensors(NamedTuple):
    """The codebook's constant tensors on one device.

    values256: float32 value per code (NaN padded); sorted_values: float32;
    sorted_codes: int64 (gather index friendly); thresholds: float32.
    """

    values256: torch.Tensor
    sorted_values: torch.Tensor
    sorted_codes: torch.Tensor
    thresholds: torch.Tensor


def _host_arrays(cb: Codebook) -> dict[str, np.ndarray]:
    return {
        "values256": np.ascontiguousarray(cb.values256, dtype=np.float32),
        "sorted_values": np.ascontiguousarray(cb.sorted_values, dtype=np.float32),
        "sorted_codes": cb.sorted_codes.astype(np.int64),
        "thresholds": np.ascontiguousarray(cb.thresholds, dtype=np.float32),
    }


@functools.lru_cache(maxsize=64)
def codebook_tensors(cb: Codebook, device: torch.device) -> CodebookTensors:
    """Constant tensors of ``cb`` on ``device`` (pure function of hashable inputs)."""
    arrs = _host_arrays(cb)
    return CodebookTensors(**{k: torch.from_numpy(v.copy()).to(device) for k, v in arrs.items()})


def codebook_buffers(cb: Codebook, prefix: str) -> dict[str, torch.Tensor]:
    """Module-buffer form of :func:`codebook_tensors`: float arrays stored as int32 bit
    patterns so ``module.half()`` / ``.to(dtype)`` cannot round them."""
    out = {}
    for k, v in _host_arrays(cb).items():
        t = torch.from_numpy(v.copy())
        if t.dtype == torch.float32:
            t = t.view(torch.int32)
        out[f"{prefix}_{k}"] = t
    return out


def tensors_from_buffers(bufs: dict[str, torch.Tensor], prefix: str) -> CodebookTensors:
    def f(k: str) -> torch.Tensor:
        t = bufs[f"{prefix}_{k}"]
        return t.view(torch.float32) if t.dtype == torch.int32 else t

    return CodebookTensors(f("values256"), f("sorted_values"), f("sorted_codes"), f("thresholds"))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the names fp8core._validation uses)."""
    return str(dtype).removeprefix("torch.")


def check_tensor(x: Any, argname: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")


def check_float_tensor(x: Any, argname: str = "x") -> None:
    check_tensor(x, argname)
    _validation.check_float_dtype(dtype_name(x.dtype), argname=argname)
