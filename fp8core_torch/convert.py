"""Swap ``nn.Linear`` layers of a model for their FP8-simulated versions."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

import fp8core.recipe
from fp8core_torch.linear import LinearFP8, LinearFP8Global, LinearFP8Mixed

__all__ = ["convert_to_fp8"]

_MODES = {"mixed": LinearFP8Mixed, "global": LinearFP8Global}


def convert_to_fp8(model: nn.Module, mode: str | None = None, *, recipe: Any = None,
                   module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
                   fw_format: Any = None, bw_format: Any = None,
                   bsz: int | None = None, bsz2: int | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` (exact type, not subclasses) in ``model`` in place.

    With ``recipe`` (a :class:`fp8core.recipe.LinearRecipe` or preset name) the layers
    become :class:`LinearFP8`; otherwise bitsandbytes' layers: ``mode`` ``"mixed"``
    (default) or ``"global"`` with ``fw_format`` / ``bw_format`` (default e4m3 / e5m2) and
    ``bsz`` / ``bsz2`` (default: from each layer's features). Like torchao's
    ``convert_to_float8_training``: ``module_filter_fn(module, fqn)`` returns whether to
    convert the layer at fully-qualified name ``fqn``. The new layers share the old
    parameters. A model that *is* an nn.Linear is returned converted (it cannot be
    swapped in place).

    Raises:
      ValueError: unknown ``mode`` or preset; ``recipe`` together with ``mode`` or the
        bitsandbytes options. TypeError: ``model`` is not an nn.Module, ``recipe`` not a recipe.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kind, kw = fp8core.recipe.conversion(mode, recipe, fw_format, bw_format, bsz, bsz2)
    cls = LinearFP8 if kind == "recipe" else _MODES[kind]

    def wanted(mod: nn.Module, fqn: str) -> bool:
        return type(mod) is nn.Linear and (module_filter_fn is None or module_filter_fn(mod, fqn))

    if wanted(model, ""):
        return cls.from_linear(model, **kw)
    for fqn, mod in list(model.named_modules()):
        for name, child in list(mod.named_children()):
            child_fqn = f"{fqn}.{name}" if fqn else name
            if wanted(child, child_fqn):
                setattr(mod, name, cls.from_linear(child, **kw))
    return model
