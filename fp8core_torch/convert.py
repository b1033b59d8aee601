"""Swap the matmul layers of a model for their FP8-simulated versions, and say what was done."""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

import fp8core.conversion as _conv
import fp8core.random
import fp8core.recipe
from fp8core.conversion import REASONS, LayerRecord
from fp8core_torch.conv1d import Conv1DFP8
from fp8core_torch.linear import LinearFP8, LinearFP8Global, LinearFP8Mixed

__all__ = ["convert_to_fp8"]

_MODES = {"mixed": LinearFP8Mixed, "global": LinearFP8Global}
_FP8 = (LinearFP8, Conv1DFP8)
# matmul-bearing torch modules convert_to_fp8 cannot swap (reported, never converted)
_UNSUPPORTED = (nn.modules.conv._ConvNd, nn.Bilinear, nn.RNNBase)


def _hf_conv1d() -> type | None:
    """transformers' Conv1D if transformers is already imported (a model holding one
    imported it), else None — never imports transformers."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _weights(mod: nn.Module) -> int:
    """Weight elements of a module's matmuls (2-D+ parameters of its own; biases and
    norms excluded)."""
    return sum(p.numel() for n, p in mod.named_parameters() if p.dim() >= 2 and "bias" not in n)


def _kind(mod: nn.Module) -> str:
    t = type(mod)
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__


def _record(fqn: str, mod: nn.Module, **kw: Any) -> LayerRecord:
    # nn.Linear: in_features / out_features; transformers' Conv1D: nx / nf
    fin = getattr(mod, "in_features", getattr(mod, "nx", None))
    fout = getattr(mod, "out_features", getattr(mod, "nf", None))
    return LayerRecord(fqn, _kind(mod), fin, fout, _weights(mod), **kw)


def convert_to_fp8(model: nn.Module, mode: str | None = None, *, recipe: Any = None,
                   module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
                   fw_format: Any = None, bw_format: Any = None,
                   bsz: int | None = None, bsz2: int | None = None,
                   include_subclasses: bool = False, seed: int = 0) -> nn.Module:
    """Replace the matmul layers of ``model`` by FP8 layers, in place, and report it.

    Converted: every ``nn.Linear`` (exact type) and, when transformers is imported,
    every transformers ``Conv1D`` (GPT-2 family; becomes :class:`Conv1DFP8`, same
    ``weight`` (in, out) and ``bias``, so state_dict keys and shapes are unchanged).
    ``nn.Linear`` subclasses only with ``include_subclasses=True`` (torchao converts
    every ``isinstance(m, nn.Linear)``; here a subclass may override ``forward``, which
    the swap would drop, so it is opt-in). ``nn.MultiheadAttention`` (both of its
    projections: its forward reads the weights directly), convolutions, ``nn.Bilinear``
    and RNNs stay high precision and are reported. ``nn.TransformerEncoderLayer``'s
    linears are converted, with a note (and a warning): its eval fast path without
    gradients bypasses them unless ``torch.backends.mha.set_fastpath_enabled(False)``.

    With ``recipe`` (a :class:`fp8core.recipe.LinearRecipe` or preset name) the layers
    become :class:`LinearFP8`; otherwise bitsandbytes' layers: ``mode`` ``"mixed"``
    (default) or ``"global"`` with ``fw_format`` / ``bw_format`` (default e4m3 / e5m2) and
    ``bsz`` / ``bsz2`` (default: from each layer's features). Like torchao's
    ``convert_to_float8_training``: ``module_filter_fn(module, fqn)`` returns whether to
    convert the candidate layer at fully-qualified name ``fqn`` (called for candidates
    only: an ``nn.Linear``, or a transformers ``Conv1D``, whose sizes are ``nx`` / ``nf``,
    not ``in_features`` / ``out_features``). The new layers share the old parameters. A model that *is* a layer is
    returned converted (it cannot be swapped in place).

    The report (:class:`fp8core.conversion.ConversionReport`: converted layers, skipped
    matmul-bearing modules with the reason, the FP8 fraction of matmul weights) is
    attached as ``model.fp8_conversion_report``, logged at INFO on the ``"fp8core"``
    logger, and a ``UserWarning`` names the modules when nothing was converted or a
    module that ``module_filter_fn`` did not exclude stays high precision.

    ``seed`` (default 0; used by a recipe that rounds stochastically, §14.3): each converted
    layer gets ``fp8core.random.layer_seed(seed, fqn)`` — from its module path, so
    fp8core_jax's convert_to_fp8 gives the same seeds to a twin model.

    Raises:
      ValueError: unknown ``mode`` or preset; ``recipe`` together with ``mode`` or the
        bitsandbytes options. TypeError: ``model`` is not an nn.Module, ``recipe`` not a
        recipe, ``include_subclasses`` not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _conv.check_include_subclasses(include_subclasses)
    kind, kw = fp8core.recipe.conversion(mode, recipe, fw_format, bw_format, bsz, bsz2)
    cls = LinearFP8 if kind == "recipe" else _MODES[kind]
    conv1d_recipe = kw["recipe"] if kind == "recipe" else fp8core.recipe.bnb_recipe(
        kind, kw["fw_format"], kw["bw_format"], kw["bsz"], kw["bsz2"])
    Conv1D = _hf_conv1d()
    stochastic = kind == "recipe" and kw["recipe"].stochastic_slots
    fp8core.random.check_seed(seed)

    def seeded(fqn: str) -> dict:
        """§14.3: each layer's seed from ``seed`` and its module path (as fp8core_jax's)."""
        return {"seed": fp8core.random.layer_seed(seed, fqn)} if stochastic else {}

    converted: list[LayerRecord] = []
    already: list[LayerRecord] = []
    skipped: list[LayerRecord] = []
    encoder_layers: list[tuple[str, nn.Module]] = []

    def swap(mod: nn.Module, fqn: str, exact: type, make: Callable) -> tuple[nn.Module | None, bool]:
        if type(mod) is not exact and not include_subclasses:
            base = "nn.Linear" if exact is nn.Linear else exact.__name__
            skipped.append(_record(fqn, mod, reason=REASONS["subclass"].format(base=base)))
            return None, False
        if module_filter_fn is not None and not module_filter_fn(mod, fqn):
            skipped.append(_record(fqn, mod, reason=REASONS["filtered"]))
            return None, False
        new = make(mod)
        converted.append(_record(fqn, mod, recipe=new.recipe.name))
        return new, False

    def visit(mod: nn.Module, fqn: str) -> tuple[nn.Module | None, bool]:
        """(replacement or None, descend into children?)"""
        if isinstance(mod, _FP8):
            already.append(_record(fqn, mod, recipe=mod.recipe.name))
            return None, False
        if isinstance(mod, nn.MultiheadAttention):
            skipped.append(LayerRecord(fqn, _kind(mod), mod.embed_dim, mod.embed_dim,
                                       _weights(mod), reason=REASONS["torch_mha"]))
            return None, False
        if isinstance(mod, nn.Linear):
            return swap(mod, fqn, nn.Linear, lambda m: cls.from_linear(m, **kw, **seeded(fqn)))
        if Conv1D is not None and isinstance(mod, Conv1D):
            return swap(mod, fqn, Conv1D, lambda m: Conv1DFP8.from_conv1d(m, recipe=conv1d_recipe))
        if isinstance(mod, nn.TransformerEncoderLayer):
            encoder_layers.append((fqn, mod))  # converted below; its fast path is a caveat
            return None, True
        if isinstance(mod, _UNSUPPORTED):
            skipped.append(LayerRecord(fqn, _kind(mod), None, None, _weights(mod),
                                       reason=REASONS["unsupported"].format(kind=_kind(mod))))
            return None, False
        return None, True

    done: dict[int, tuple] = {}  # a module shared by two parents is visited once

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if id(child) in done:
                new, descend = done[id(child)][1], False
            else:
                new, descend = visit(child, fqn)
                done[id(child)] = (child, new)  # child kept alive: ids stay unique
            if new is not None:
                setattr(parent, name, new)
            elif descend:
                walk(child, fqn)

    new, descend = visit(model, "")
    if new is not None:
        model = new
    elif descend:
        walk(model, "")
    bypassed = [fqn for fqn, layer in encoder_layers
                if isinstance(layer.linear1, _FP8) or isinstance(layer.linear2, _FP8)]
    notes = ((_conv.NOTES["torch_encoder_fastpath"].format(names=_conv.names(bypassed)),)
             if bypassed else ())
    report = _conv.ConversionReport("torch", tuple(converted), tuple(already), tuple(skipped),
                                    notes)
    model.fp8_conversion_report = report
    _conv.log(report)
    _conv.warn_if_incomplete(report)
    return model
