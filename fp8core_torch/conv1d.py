"""An FP8 drop-in for transformers' ``Conv1D`` (GPT-2 family), without importing transformers.

transformers' ``Conv1D(nf, nx)`` is a linear layer whose ``weight`` is stored ``(in, out)``
= ``(nx, nf)`` and which always has a ``bias``: ``y = x @ weight + bias``. That is exactly
:func:`fp8core_torch.matmul_fp8`'s ``B`` layout (K, N), so :class:`Conv1DFP8` passes its
weight as is (no transpose). Parameters and ``state_dict`` keys/shapes are ``Conv1D``'s, so
``save_pretrained`` → ``from_pretrained`` → ``convert_to_fp8`` round-trips.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import fp8core.recipe
from fp8core import _validation
from fp8core_torch.linear import _check_input, _warn_rows_once
from fp8core_torch.matmul import _apply_module, _check_reduction, _recipe_specs

__all__ = ["Conv1DFP8"]


class Conv1DFP8(nn.Module):
    """transformers' ``Conv1D`` whose three GEMMs follow ``recipe``:
    ``matmul_fp8(x, weight, recipe=recipe, bias=bias)`` with ``weight`` (nx, nf).

    Example::

        layer = Conv1DFP8(3 * 768, 768, recipe="ROWWISE")   # GPT-2's c_attn
        out = layer(torch.randn(8, 128, 768))               # (8, 128, 2304)

    Args:
      nf: output features; nx: input features (``Conv1D``'s argument order).
      recipe: a :class:`fp8core.recipe.LinearRecipe` or a preset name (default
        ``"TENSORWISE"``); the bitsandbytes modes are ``fp8core.recipe.bnb_recipe(...)``.
      device, dtype: of the parameters.

    Raises:
      TypeError / ValueError: bad feature counts; a recipe that is not one.
    """

    def __init__(self, nf: int, nx: int, *, recipe: Any = "TENSORWISE", device: Any = None,
                 dtype: Any = None):
        _validation.check_features(nf, "nf")
        _validation.check_features(nx, "nx")
        super().__init__()
        self.nf, self.nx = int(nf), int(nx)
        self.weight = nn.Parameter(torch.empty(self.nx, self.nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.nf, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)  # Conv1D's init
        self.recipe = fp8core.recipe.get_recipe(recipe)
        if self.recipe.stochastic_slots:   # no seed/stream plumbing here yet: say so (§14.3)
            raise ValueError(f"Conv1DFP8: recipe {self.recipe.name} rounds stochastically "
                             f"({', '.join(self.recipe.stochastic_slots)}); Conv1DFP8 takes no "
                             f"seed yet — keep Conv1D layers out (module_filter_fn) or use a "
                             f"recipe with nearest rounding")
        _check_reduction(self.recipe)
        self._specs = _recipe_specs(self.recipe)
        self._may_span_rows = any(
            r is not None and r.granularity.kind == "flat"
            for r in (self.recipe.rule("input"), self.recipe.rule("grad_output")))
        self._rows_warned = False

    @property
    def in_features(self) -> int:
        """``nx`` (the name the linear layers use)."""
        return self.nx

    @property
    def out_features(self) -> int:
        """``nf`` (the name the linear layers use)."""
        return self.nf

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input(input, self.nx, f"Conv1DFP8(nf={self.nf}, nx={self.nx})")
        _warn_rows_once(self, input, self.nx, self.nf)
        return _apply_module(input, self.weight, self.bias, self.recipe, self._specs)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, recipe={self.recipe.name}"

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, **kwargs: Any) -> "Conv1DFP8":
        """A new FP8 layer sharing ``conv1d``'s ``weight`` and ``bias`` (no copy);
        ``kwargs``: ``recipe=``."""
        weight = getattr(conv1d, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"conv1d must be a transformers Conv1D (weight (nx, nf)), got "
                            f"{type(conv1d).__name__}")
        with torch.device("meta"):
            new = cls(weight.shape[1], weight.shape[0], **kwargs)
        new.weight = conv1d.weight
        new.bias = conv1d.bias
        new.train(conv1d.training)
        return new
