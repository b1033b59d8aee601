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
* **scale clamped** (``n_scale_clamped``): groups with a finite, non-zero absmax whose
  scale hit a limit of its scale rule — for the fp32 / pow2 rules an absmax outside
  ``[codebook.scale_floor, codebook.scale_ceiling]`` (§3.3 clips it), for the MX rules
  an e8m0 byte at either end of its range (0 or 254, §11): the group's scale could not
  follow its values, so it under- or over-flows as a whole.

Recipe layers (:class:`fp8core.recipe.LinearRecipe`) are measured slot by slot with
:func:`operand_stats` / :func:`recipe_layer_stats`: each slot's operand in the
orientation its GEMM quantizes it (docs/numerics.md §9.1); a slot that reuses another
slot's quantized value, or stays in high precision, has no record.

Elements of groups whose absmax is NaN or inf (they dequantize to NaN, §3.6) are
counted in ``n_nonfinite`` and excluded from the other counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fp8core import mx as _mx
from fp8core import recipe as _recipe
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
    "operand_stats",
    "recipe_layer_stats",
    "slot_operand",
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
      n_scale_clamped: finite groups with a non-zero absmax whose scale hit its rule's
        limit (module docstring).
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
    n_scale_clamped: int = 0

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
    def scale_clamped_frac(self) -> float:
        """``n_scale_clamped / n_groups`` (0 when there is no group)."""
        return self.n_scale_clamped / self.n_groups if self.n_groups else 0.0

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
    ok = np.isfinite(absmax)[group_of]               # elements of finite groups
    return _stats_of(x32, y, codes, ok, absmax, cb, "fp32")


def _stats_of(x32: np.ndarray, y: np.ndarray, codes: np.ndarray, ok: np.ndarray,
              absmax: np.ndarray, cb: Codebook, scale: str) -> QuantStats:
    """The record of flat float32 inputs ``x32``, their dequantized ``y`` and ``codes``,
    ``ok`` the elements of finite groups, ``absmax`` the flat group absmax."""
    xs, ys = x32[ok].astype(np.float64), y[ok].astype(np.float64)
    nonzero = xs != 0
    at_max = np.abs(cb.values256[codes[ok]]) == cb.max
    fin = absmax[np.isfinite(absmax)]
    return QuantStats(
        numel=int(x32.size),
        n_nonfinite=int(x32.size - np.count_nonzero(ok)),
        n_nonzero=int(np.count_nonzero(nonzero)),
        n_underflow=int(np.count_nonzero(nonzero & (ys == 0))),
        n_saturated=int(np.count_nonzero(at_max)),
        signal_energy=float(np.sum(xs * xs)),
        noise_energy=float(np.sum((xs - ys) ** 2)),
        n_groups=int(absmax.size),
        absmax_min=float(fin.min()) if fin.size else math.nan,
        absmax_max=float(fin.max()) if fin.size else math.nan,
        n_scale_clamped=_n_scale_clamped(absmax, cb, scale),
    )


def _n_scale_clamped(absmax: np.ndarray, cb: Codebook, scale: str) -> int:
    a = np.asarray(absmax, np.float32).reshape(-1)
    live = np.isfinite(a) & (a > 0)
    if scale in _mx.MX_SCALE_RULES:
        b = _mx.scale_bytes(a, cb, _mx.mode_of(scale))
        hit = (b == 0) | (b == 254)
    else:
        hit = (a < cb.scale_floor) | (a > cb.scale_ceiling)
    return int(np.count_nonzero(live & hit))


def operand_stats(x: Any, rule: Any, *, axis: int = -1) -> QuantStats:
    """Statistics of ``fake_quantize_operand(x, rule, axis=axis)`` (module docstring).

    Args:
      x: float array; ``axis`` is its contraction axis (as
        :func:`fp8core.quantize_operand`).
      rule: an :class:`fp8core.recipe.OperandRule`.

    Elements that dequantize to a non-finite value are exactly those of groups whose
    absmax is NaN or inf (§3.6, §11); they are counted in ``n_nonfinite``. A
    stochastically rounded rule (§14) is measured as its round-to-nearest twin: the
    same groups, absmax and scales (so the scale range and clamping are the slot's
    own), with the error of nearest rounding — the expectation SR is unbiased around.
    """
    rule = _recipe.nearest_rule(_recipe.check_rule(rule))
    x = np.asarray(x)
    codes, absmax = _ref.quantize_operand(x, rule, axis=axis)
    y = _ref.dequantize_operand(codes, absmax, rule, axis=axis).reshape(-1)
    x32 = x.astype(np.float32).reshape(-1)
    return _stats_of(x32, y, codes.reshape(-1), np.isfinite(y), absmax.reshape(-1),
                     rule.format, rule.scale)


def slot_operand(recipe: Any, slot: str, X: Any, B: Any, dY: Any = None
                 ) -> tuple[np.ndarray, int] | None:
    """The high-precision operand slot ``slot`` of ``recipe`` quantizes and its
    contraction axis (docs/numerics.md §9.1), or None when the slot quantizes nothing of
    its own (high precision, or :data:`~fp8core.recipe.REUSE` of another slot's value).

    ``X (..., K)`` is the layer input, ``B (K, N)`` the weight as the GEMM's right
    operand (``Wᵀ``), ``dY (..., N)`` the output gradient (None: forward slots only).
    With ``recipe.wgrad_transform`` the wgrad operands are the rotated ones
    (:func:`fp8core.reference.wgrad_rotated`).
    """
    recipe = _recipe.get_recipe(recipe)
    if slot not in _recipe.SLOTS:
        raise ValueError(f"slot must be one of {', '.join(_recipe.SLOTS)}, got {slot!r}")
    if recipe.rule(slot) is None or (slot in _recipe.REUSE_SOURCE
                                     and recipe.source(slot) == "reuse"):
        return None
    X, B = np.asarray(X), np.asarray(B)
    x2 = X.reshape(-1, X.shape[-1])
    if slot == "input":
        return x2, -1
    if slot == "weight":
        return B, 0
    if slot == "weight_for_grad_input":
        return B, -1
    if dY is None:
        return None
    g2 = np.asarray(dY).reshape(-1, B.shape[1])
    if slot == "grad_output":
        return g2, -1
    t = x2 if slot == "input_for_grad_weight" else g2
    if recipe.wgrad_transform is not None:
        t = _ref.wgrad_rotated(t, t.dtype)
    return t, 0


def recipe_layer_stats(layer: str, recipe: Any, X: Any, B: Any, dY: Any = None, *,
                       step: int = 0) -> list[StatsRecord]:
    """Records of the slots of one recipe layer that quantize an operand of their own,
    in :data:`fp8core.recipe.SLOTS` order (``operand`` = the slot name).

    Args:
      layer: layer name.
      recipe: the layer's :class:`~fp8core.recipe.LinearRecipe` (or a preset name).
      X: the layer input ``(..., K)``; B: the weight ``(K, N)`` (``Wᵀ``, JAX's kernel);
        dY: the output gradient ``(..., N)`` or None (forward slots only). Numpy arrays.
      step: stored in each record.
    """
    recipe = _recipe.get_recipe(recipe)
    out = []
    for slot in _recipe.SLOTS:
        got = slot_operand(recipe, slot, X, B, dY)
        if got is None:
            continue
        t, axis = got
        rule = recipe.rule(slot)
        out.append(StatsRecord(layer, slot, rule.format.name, _block_label(rule), int(step),
                               operand_stats(t, rule, axis=axis)))
    return out


def _block_label(rule: Any) -> Any:
    g = rule.granularity
    if g.kind == "tensor":
        return None
    return str(g) if rule.scale == "fp32" else f"{g} {rule.scale}"


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
        n_scale_clamped=sum(s.n_scale_clamped for s in stats),
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
      blocksize: block size, ``None`` for global quantization (recipe slots: the
        granularity and scale rule as text, e.g. ``"block(32) mx_rceil"``).
      step: training step (or any caller-chosen index).
      stats: the :class:`QuantStats`.
    """

    layer: str
    operand: str
    codebook: str
    blocksize: int | str | None
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
    ("scale_clamped_pct", "clamped %"),
)


def summary_rows(records: Sequence[StatsRecord]) -> list[dict[str, Any]]:
    """One row per (layer, operand), pooled exactly over steps, in first-seen order.

    Row keys: ``layer, operand, codebook, blocksize ("global" if None), n_records,
    sqnr_db, underflow_pct, saturated_pct, absmax_min, absmax_max, scale_clamped_pct``.
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
            "scale_clamped_pct": 100.0 * st.scale_clamped_frac,
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
