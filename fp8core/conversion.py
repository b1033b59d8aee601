"""What ``convert_to_fp8`` did — one record for both backends (numpy-free, framework-free).

Both ``fp8core_torch.convert_to_fp8`` and ``fp8core_jax.nn.convert_to_fp8`` build a
:class:`ConversionReport`, attach it to the model they return as
``model.fp8_conversion_report``, log its table at INFO on ``logging.getLogger("fp8core")``
and, through :func:`warn_if_incomplete`, raise a ``UserWarning`` when nothing was
converted or when a matmul-bearing module the user did not filter out stays in high
precision. The reasons a module is skipped and the warning texts live here only.

Example::

    model = convert_to_fp8(model, recipe="ROWWISE")
    print(model.fp8_conversion_report)          # a short table
    model.fp8_conversion_report.fp8_fraction    # share of matmul weights now FP8
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

__all__ = ["ConversionReport", "LayerRecord", "NOTES", "REASONS", "check_include_subclasses",
           "log", "names", "warn_if_incomplete"]

logger = logging.getLogger("fp8core")

#: Why a matmul-bearing module was not converted (``LayerRecord.reason`` is one of these,
#: formatted). ``"filtered"`` is the only reason that never warns.
REASONS = {
    "filtered": "filtered out by module_filter_fn",
    "subclass": ("subclass of {base}, not converted (pass include_subclasses=True to convert "
                 "it; its own forward would be replaced)"),
    "torch_mha": ("nn.MultiheadAttention: F.multi_head_attention_forward reads in_proj_weight and "
                  "out_proj.weight directly, so neither projection can be swapped without changing "
                  "the module's code; stays high precision"),
    "unsupported": "{kind} is not supported by convert_to_fp8; stays high precision",
    "linear_general": ("nnx.LinearGeneral with batch_axis or non-trailing contraction axes "
                       "(axis={axis}); stays high precision"),
    "einsum": "nnx.Einsum ({einsum}) is not converted; stays high precision",
}

#: Caveats about converted layers that a module may bypass (``ConversionReport.notes``).
NOTES = {
    "torch_encoder_fastpath": (
        "nn.TransformerEncoderLayer {names}: in eval mode without gradients PyTorch's fast path "
        "(torch._transformer_encoder_layer_fwd) reads linear1/linear2's weights directly and runs "
        "them in high precision; call torch.backends.mha.set_fastpath_enabled(False) for FP8 "
        "inference"),
}

#: How many module names a warning spells out before "and N more".
WARN_NAMES = 4


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One matmul-bearing module met by ``convert_to_fp8``.

    Attributes:
      fqn: dotted path in the model (``""`` for the model itself).
      kind: the module's type as found (``"nn.Linear"``, ``"Conv1D"``, ``"nnx.Linear"``, …).
      in_features, out_features: the contraction and output sizes (None if not defined).
      params: weight elements of its matmuls (biases not counted).
      recipe: the recipe name it runs (converted or already FP8), else None.
      reason: why it stays high precision (skipped), else None.
    """

    fqn: str
    kind: str
    in_features: int | None
    out_features: int | None
    params: int
    recipe: str | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """The result of one ``convert_to_fp8`` call.

    Attributes:
      framework: ``"torch"`` or ``"jax"``.
      converted: layers replaced by FP8 layers in this call.
      already_fp8: FP8 layers that were there before (left as they are).
      skipped: matmul-bearing modules left in high precision, each with its reason.
      notes: caveats (:data:`NOTES`), e.g. a module whose fast path bypasses its converted
        layers in some modes.
    """

    framework: str
    converted: tuple[LayerRecord, ...] = ()
    already_fp8: tuple[LayerRecord, ...] = ()
    skipped: tuple[LayerRecord, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def matmul_params(self) -> int:
        """Weight elements of every matmul-bearing module found."""
        return sum(r.params for r in (*self.converted, *self.already_fp8, *self.skipped))

    @property
    def fp8_params(self) -> int:
        """Weight elements whose matmuls now run in FP8 (converted + already FP8)."""
        return sum(r.params for r in (*self.converted, *self.already_fp8))

    @property
    def fp8_fraction(self) -> float:
        """``fp8_params / matmul_params`` (0.0 for a model without matmuls)."""
        total = self.matmul_params
        return self.fp8_params / total if total else 0.0

    @property
    def unexpected_skips(self) -> tuple[LayerRecord, ...]:
        """Skipped modules the user did not filter out (the ones that warn)."""
        return tuple(r for r in self.skipped if r.reason != REASONS["filtered"])

    def summary(self) -> str:
        """One line: counts and the FP8 fraction."""
        return (f"convert_to_fp8 ({self.framework}): {len(self.converted)} converted, "
                f"{len(self.already_fp8)} already FP8, {len(self.skipped)} high precision; "
                f"{self.fp8_fraction:.1%} of {self.matmul_params:,} matmul weights are FP8")

    def __str__(self) -> str:
        rows = ([("converted", r, r.recipe) for r in self.converted]
                + [("already FP8", r, r.recipe) for r in self.already_fp8]
                + [("high precision", r, r.reason) for r in self.skipped])
        cells = [("status", "module", "type", "in", "out", "weights", "recipe / reason")]
        cells += [(s, r.fqn or "<model>", r.kind, _n(r.in_features), _n(r.out_features),
                   f"{r.params:,}", str(what)) for s, r, what in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(6)]
        lines = [self.summary()]
        for c in cells:
            lines.append("  ".join(c[i].ljust(widths[i]) for i in range(6)) + "  " + c[6])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


def names(fqns: list[str]) -> str:
    """``'a', 'b', 'c', 'd' and 3 more`` (the first :data:`WARN_NAMES`)."""
    more = len(fqns) - WARN_NAMES
    return ", ".join(repr(f or "<model>") for f in fqns[:WARN_NAMES]) + (
        f" and {more} more" if more > 0 else "")


def _names(records: tuple[LayerRecord, ...]) -> str:
    shown = ", ".join(f"{r.fqn or '<model>'!r} ({r.kind})" for r in records[:WARN_NAMES])
    more = len(records) - WARN_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def check_include_subclasses(value: object) -> None:
    """``convert_to_fp8``'s ``include_subclasses`` must be a bool (both backends).

    Raises:
      TypeError: anything else (``1``, ``"yes"``, None).
    """
    if not isinstance(value, bool):
        raise TypeError(f"include_subclasses must be True or False, got {value!r}")


def log(report: ConversionReport) -> None:
    """Log the report's table at INFO on the ``"fp8core"`` logger."""
    logger.info("%s", report)


def warn_if_incomplete(report: ConversionReport, stacklevel: int = 3) -> None:
    """``UserWarning`` when ``report`` converted nothing, or skipped a matmul-bearing
    module the user did not filter out (names the first few, with a count)."""
    for note in report.notes:
        warnings.warn(f"convert_to_fp8: {note}", UserWarning, stacklevel=stacklevel)
    if not report.converted:
        already = (f" ({len(report.already_fp8)} layer(s) were FP8 already)"
                   if report.already_fp8 else "")
        warnings.warn(
            f"convert_to_fp8 converted no layer{already}; "
            f"{len(report.skipped)} matmul-bearing module(s) stay high precision"
            + (f": {_names(report.skipped)}" if report.skipped else "")
            + "; print(model.fp8_conversion_report) for the reasons", UserWarning,
            stacklevel=stacklevel)
        return
    odd = report.unexpected_skips
    if odd:
        warnings.warn(
            f"convert_to_fp8 left {len(odd)} matmul-bearing module(s) in high precision that "
            f"module_filter_fn did not exclude: {_names(odd)}; print(model.fp8_conversion_report) "
            "for the reasons", UserWarning, stacklevel=stacklevel)
