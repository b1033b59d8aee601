"""Quantization statistics: how much an FP8 fake-quantization loses, per operand.

The math lives here once, in numpy, on top of :mod:`fp8core.reference`; the
PyTorch and JAX collectors only capture the operands a layer quantizes, convert
them to numpy and call :func:`layer_stats`. Records therefore have the same names
and the same numbers in both frameworks whenever the captured operands have the
same bits.

Definitions (for one tensor ``x`` quantized with codebook ``C`` of largest finite
magnitude ``M``, by groups as in docs/numerics.md §3; ``x`` is upcast to float32
first, ``Q(x)`` is :func:`fp8core.fake_quantize` in float32; sums are float64):

* **SQNR** ``10·log10(Σx² / Σ(x − Q(x))²)`` in dB; ``+inf`` when ``Q(x) == x``
  exactly (including an all-zero tensor); ``NaN`` if ``x`` has a non-finite value.
* **underflow**: among the finite, non-zero elements of ``x``, the fraction whose
  ``Q(x)`` is ±0 (float32-subnormal inputs count as non-zero and always underflow,
  §3.3). 0 when ``x`` has no non-zero element.
* **saturated**: among the finite elements, the fraction quantized to the
  codebook's largest magnitude ±M, i.e. whose code has ``|value[code]| == M``.
  That is every element with ``|fl(x·qscale)| ≥ M`` (which the §3.4 clamp maps to
  ±M) plus those that round up to M. With the contract's absmax scaling each group
  with a non-zero absmax puts its absmax element there, so the floor is about
  ``(groups with absmax > 0) / numel``; more means ties at the maximum or a group
  whose absmax exceeded the codebook's scale ceiling.
* **scale range**: min and max of the per-group absmax (the ``absmax`` the
  quantizer returns; groups with NaN/inf absmax excluded). Global quantization has
  one group, so min == max.

Elements of groups whose absmax is NaN or inf (they dequantize to NaN, §3.6) are
counted in ``n_nonfinite`` and excluded from the other counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fp8core import reference as _ref
from fp8core.blocks import plan_blocks, select_block_size
from fp8core.codebooks import Codebook, resolve_codebook

__all__ = [
    "OPERANDS",
    "QuantStats",
    "StatsRecord",
    "OperandSpec",
    "quantization_stats",
    "layer_operand_specs",
    "specs_of_layer",
    "layer_stats",
    "merge_stats",
    "summary_rows",
    "summary_table",
]

#: The operands an FP8 linear layer quantizes (docs/numerics.md §6), in table order.
OPERANDS: tuple[str, ...] = ("activation", "weight", "gradient")


@dataclasses.dataclass(frozen=True)
class QuantStats:
    """Exact counts and float64 energies of one quantization (or a merge of several).

    Counts and energies add up under :func:`merge_stats`, so statistics pooled over
    steps are exact (pooled SQNR = total signal / total noise), not averages of dB.

    Attributes:
      numel: elements.
      n_nonfinite: elements in groups whose absmax is NaN or inf.
      n_nonzero: finite, non-zero elements (in finite groups).
      n_underflow: non-zero elements whose quantized value is ±0.
      n_saturated: finite elements quantized to ±M.
      signal_energy: Σx² (float64) over finite groups.
      noise_energy: Σ(x − Q(x))² (float64) over finite groups.
      n_groups: quantization groups (1 for global quantization).
      absmax_min: smallest finite group absmax (NaN if none).
      absmax_max: largest finite group absmax (NaN if none).
    """

    numel: int
    n_nonfinite: int
    n_nonzero: int
    n_underflow: int
    n_saturated: int
    signal_energy: float
    noise_energy: float
    n_groups: int
    absmax_min: float
    absmax_max: float

    @property
    def sqnr_db(self) -> float:
        """``10·log10(signal / noise)``; +inf if exact, NaN if any value is non-finite."""
        if self.n_nonfinite:
            return math.nan
        if self.noise_energy == 0.0:
            return math.inf
        if self.signal_energy == 0.0:  # unreachable: zeros quantize exactly
            return -math.inf
        return 10.0 * math.log10(self.signal_energy / self.noise_energy)

    @property
    def underflow_frac(self) -> float:
        """``n_underflow / n_nonzero`` (0 when there is no non-zero element)."""
        return self.n_underflow / self.n_nonzero if self.n_nonzero else 0.0

    @property
    def saturated_frac(self) -> float:
        """``n_saturated / finite elements`` (0 when there is none)."""
        n_finite = self.numel - self.n_nonfinite
        return self.n_saturated / n_finite if n_finite else 0.0


def quantization_stats(x: Any, codebook: Any, blocksize: int | None = None) -> QuantStats:
    """Statistics of ``fake_quantize(x, codebook, blocksize)`` (definitions: module docstring).

    Args:
      x: float16 / bfloat16 / float32 / float64 array (numpy or anything
        ``np.asarray`` accepts), any shape.
      codebook: format name or alias, legacy name, :class:`Codebook` or 256 values.
      blocksize: ``None`` for one absmax per tensor (global), else elements per
        block of the row-major flattening.

    Returns:
      A :class:`QuantStats`.
    """
    x = np.asarray(x)
    cb = resolve_codebook(codebook)
    if blocksize is None:
        codes, absmax = _ref.quantize_global(x, cb)
        y = _ref.dequantize_global(codes, absmax, cb)
        absmax = absmax.reshape(1)
        group_of = np.zeros(x.size, np.intp)
    else:
        codes, absmax = _ref.quantize_blockwise(x, cb, blocksize)
        y = _ref.dequantize_blockwise(codes, absmax, cb, blocksize)
        plan = plan_blocks(x.size, blocksize)
        group_of = np.arange(plan.numel) // plan.blocksize
    x32 = x.astype(np.float32).reshape(-1)
    y = y.reshape(-1)
    codes = codes.reshape(-1)
    finite_group = np.isfinite(absmax)
    ok = finite_group[group_of]                      # elements of finite groups
    xs, ys = x32[ok].astype(np.float64), y[ok].astype(np.float64)
    nonzero = xs != 0
    at_max = np.abs(cb.values256[codes[ok]]) == cb.max
    finite_absmax = absmax[finite_group]
    return QuantStats(
        numel=int(x.size),
        n_nonfinite=int(x.size - np.count_nonzero(ok)),
        n_nonzero=int(np.count_nonzero(nonzero)),
        n_underflow=int(np.count_nonzero(nonzero & (ys == 0))),
        n_saturated=int(np.count_nonzero(at_max)),
        signal_energy=float(np.sum(xs * xs)),
        noise_energy=float(np.sum((xs - ys) ** 2)),
        n_groups=int(absmax.size),
        absmax_min=float(finite_absmax.min()) if finite_absmax.size else math.nan,
        absmax_max=float(finite_absmax.max()) if finite_absmax.size else math.nan,
    )


def merge_stats(stats: Iterable[QuantStats]) -> QuantStats:
    """Pool several :class:`QuantStats` (e.g. one operand over many steps) exactly."""
    stats = list(stats)
    if not stats:
        raise ValueError("merge_stats needs at least one QuantStats")
    lows = [s.absmax_min for s in stats if not math.isnan(s.absmax_min)]
    highs = [s.absmax_max for s in stats if not math.isnan(s.absmax_max)]
    return QuantStats(
        numel=sum(s.numel for s in stats),
        n_nonfinite=sum(s.n_nonfinite for s in stats),
        n_nonzero=sum(s.n_nonzero for s in stats),
        n_underflow=sum(s.n_underflow for s in stats),
        n_saturated=sum(s.n_saturated for s in stats),
        signal_energy=math.fsum(s.signal_energy for s in stats),
        noise_energy=math.fsum(s.noise_energy for s in stats),
        n_groups=sum(s.n_groups for s in stats),
        absmax_min=min(lows) if lows else math.nan,
        absmax_max=max(highs) if highs else math.nan,
    )


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    """How a layer quantizes one operand: codebook and block size (``None`` = global)."""

    codebook: Codebook
    blocksize: int | None


@dataclasses.dataclass(frozen=True)
class StatsRecord:
    """Statistics of one operand of one FP8 layer at one step.

    Attributes:
      layer: the layer's name in its model (``named_modules`` name in PyTorch, the
        dotted NNX graph path in JAX; the experiment names both alike).
      operand: ``"activation"`` (A), ``"weight"`` (B, laid out ``(in, out)``) or
        ``"gradient"`` (g = dL/d output).
      codebook: the codebook's name (e.g. ``"float8_e4m3fn"``).
      blocksize: block size, ``None`` for global quantization.
      step: training step (or any caller-chosen index).
      stats: the :class:`QuantStats`.
    """

    layer: str
    operand: str
    codebook: str
    blocksize: int | None
    step: int
    stats: QuantStats


def layer_operand_specs(mode: str, in_features: int, out_features: int, *,
                        fw_format: Any = "e4m3", bw_format: Any = "e5m2",
                        bsz: int | None = None, bsz2: int | None = None) -> dict[str, OperandSpec]:
    """What ``LinearFP8Mixed`` / ``LinearFP8Global`` quantize (docs/numerics.md §6).

    Mixed: activation blockwise (fw, ``bsz``), weight global (fw), gradient
    blockwise (bw, ``bsz2``); the weight gradient is full precision. Global: all
    three global. ``bsz``/``bsz2`` of ``None`` or -1 pick
    ``select_block_size(in_features)`` / ``select_block_size(out_features)``.

    Raises:
      ValueError: unknown ``mode``.
    """
    fw = resolve_codebook(fw_format, argname="fw_format")
    bw = resolve_codebook(bw_format, argname="bw_format")
    if mode == "mixed":
        bsz = select_block_size(in_features) if bsz in (None, -1) else bsz
        bsz2 = select_block_size(out_features) if bsz2 in (None, -1) else bsz2
        return {"activation": OperandSpec(fw, bsz), "weight": OperandSpec(fw, None),
                "gradient": OperandSpec(bw, bsz2)}
    if mode == "global":
        return {"activation": OperandSpec(fw, None), "weight": OperandSpec(fw, None),
                "gradient": OperandSpec(bw, None)}
    raise ValueError(f"mode must be 'mixed' or 'global', got {mode!r}")


def specs_of_layer(layer: Any) -> dict[str, OperandSpec]:
    """:func:`layer_operand_specs` of an FP8 layer of either framework.

    Both ``fp8core_torch`` and ``fp8core_jax.nn`` layers expose the same attributes:
    ``mode``, ``in_features``, ``out_features``, ``fw_codebook``, ``bw_codebook``,
    ``bsz``, ``bsz2``.
    """
    return layer_operand_specs(layer.mode, layer.in_features, layer.out_features,
                               fw_format=layer.fw_codebook, bw_format=layer.bw_codebook,
                               bsz=layer.bsz, bsz2=layer.bsz2)


def layer_stats(layer: str, specs: Mapping[str, OperandSpec], operands: Mapping[str, Any], *,
                step: int = 0) -> list[StatsRecord]:
    """Records for the operands of one layer, in :data:`OPERANDS` order.

    Args:
      layer: layer name.
      specs: from :func:`layer_operand_specs`.
      operands: numpy arrays by operand name (any subset of :data:`OPERANDS`);
        the weight as B, ``(in_features, out_features)``.
      step: stored in each record.
    """
    out = []
    for op in OPERANDS:
        if op not in operands:
            continue
        spec = specs[op]
        st = quantization_stats(np.asarray(operands[op]), spec.codebook, spec.blocksize)
        out.append(StatsRecord(layer, op, spec.codebook.name, spec.blocksize, int(step), st))
    return out


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer"), ("operand", "operand"), ("codebook", "format"), ("blocksize", "block"),
    ("n_records", "records"), ("sqnr_db", "SQNR dB"), ("underflow_pct", "underflow %"),
    ("saturated_pct", "saturated %"), ("absmax_min", "absmax min"), ("absmax_max", "absmax max"),
)


def summary_rows(records: Sequence[StatsRecord]) -> list[dict[str, Any]]:
    """One row per (layer, operand), pooled exactly over steps, in first-seen order.

    Row keys: ``layer, operand, codebook, blocksize ("global" if None), n_records,
    sqnr_db, underflow_pct, saturated_pct, absmax_min, absmax_max``.
    """
    groups: dict[tuple[str, str], list[StatsRecord]] = {}
    for r in records:
        groups.setdefault((r.layer, r.operand), []).append(r)
    rows = []
    for (layer, operand), recs in groups.items():
        st = merge_stats(r.stats for r in recs)
        rows.append({
            "layer": layer,
            "operand": operand,
            "codebook": recs[0].codebook,
            "blocksize": "global" if recs[0].blocksize is None else recs[0].blocksize,
            "n_records": len(recs),
            "sqnr_db": st.sqnr_db,
            "underflow_pct": 100.0 * st.underflow_frac,
            "saturated_pct": 100.0 * st.saturated_frac,
            "absmax_min": st.absmax_min,
            "absmax_max": st.absmax_max,
        })
    return rows


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("absmax_min", "absmax_max"):
            return f"{value:.4g}"
        if key == "sqnr_db":
            return "inf" if math.isinf(value) and value > 0 else f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def summary_table(records: Sequence[StatsRecord]) -> str:
    """A fixed-width text table of :func:`summary_rows` (same format for every framework)."""
    rows = summary_rows(records)
    header = [title for _, title in _COLUMNS]
    cells = [[_fmt(key, row[key]) for key, _ in _COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(header)]
    left = {0, 1, 2}  # text columns
    def line(values):
        return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    lines = [line(header), line(["-" * w for w in widths])]
    lines += [line(c) for c in cells]
    return "\n".join(lines)
