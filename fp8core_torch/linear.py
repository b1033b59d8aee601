"""``nn.Linear`` drop-ins whose three GEMMs follow an FP8 recipe (docs/numerics.md §9).

:class:`LinearFP8` takes any :class:`fp8core.recipe.LinearRecipe` (or a preset name:
``"TENSORWISE"``, ``"ROWWISE"``, ``"BLOCKWISE_1x128"``, …). ``LinearFP8Mixed`` /
``LinearFP8Global`` are bitsandbytes' removed layers with their call shape
(``fw_format``, ``bw_format``, ``bsz``, ``bsz2``): the presets ``BNB_MIXED`` /
``BNB_GLOBAL`` with those formats and block sizes. Parameters and state_dict keys are
exactly nn.Linear's, so checkpoints load both ways. The layers hold no buffers: the
codebook constants live once per device (``fp8core_torch.config.codebook_tensors``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fp8core
import fp8core.random
import fp8core.recipe
from fp8core import _validation
from fp8core_torch.config import QuantSpec, check_float_tensor
from fp8core_torch.matmul import _apply_module, _check_reduction, _recipe_specs, _resolve_code

__all__ = ["LinearFP8", "LinearFP8Mixed", "LinearFP8Global"]


def _check_input(input: Any, in_features: int, layer: str) -> None:
    """An FP8 layer's input: a float tensor with ``in_features`` in its last dimension
    (the error names the layer as ``layer`` describes it)."""
    check_float_tensor(input, "input")
    if input.dim() < 1 or input.shape[-1] != in_features:
        got = "a 0-d tensor" if input.dim() < 1 else f"{input.shape[-1]} features"
        raise ValueError(f"input has {got} (shape {tuple(input.shape)}), but {layer} expects "
                         f"{in_features} in its last dimension")


def _warn_rows_once(layer: nn.Module, input: torch.Tensor, k: int, n: int) -> None:
    """The layer's one warning when its recipe's flat blocks span rows of a 2-D+ input
    (``recipe.rows_warning``); needs ``layer.recipe``, ``_may_span_rows``, ``_rows_warned``."""
    if layer._may_span_rows and not layer._rows_warned and not torch.compiler.is_compiling():
        msg = layer.recipe.rows_warning(input.numel() // k, k, n, type(layer).__name__)
        if msg is not None and input.dim() >= 2:
            warnings.warn(msg, UserWarning, stacklevel=3)
            layer._rows_warned = True


def _layer_key(layer: nn.Module) -> torch.Tensor | None:
    """``[seed, stream]`` of a layer whose recipe rounds stochastically (its stream then
    advances by one: every call, as fp8core_jax's layer), else None."""
    if not layer.recipe.stochastic_slots:
        return None
    stream = layer.sr_stream
    key = torch.stack([torch.full_like(stream, layer.seed), stream.clone()])
    with torch.no_grad():
        stream.add_(1)
    return key


class LinearFP8(nn.Linear):
    """``nn.Linear`` whose fprop, dgrad and wgrad GEMMs are quantized by ``recipe``.

    Example::

        layer = LinearFP8(768, 3072, recipe="ROWWISE")
        out = layer(torch.randn(8, 128, 768))       # (8, 128, 3072)

    Args:
      in_features, out_features, bias, device, dtype: as ``nn.Linear``.
      recipe: a :class:`fp8core.recipe.LinearRecipe` or a preset name (default
        ``"TENSORWISE"``, torchao's default recipe).
      seed: for a recipe with stochastic slots (§14.3): an int in ``[0, 2**32)``
        (default 0). The layer's stream is the buffer ``sr_stream`` (int64, not in the
        state_dict: the keys stay nn.Linear's), advanced by one per call, so a run is
        reproducible and equals fp8core_jax's layer.

    Raises:
      TypeError / ValueError: bad features, or a recipe that is not one (the message lists
        the presets).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, recipe: Any = "TENSORWISE", seed: int = 0):
        in_features = _validation.check_features(in_features, "in_features")
        out_features = _validation.check_features(out_features, "out_features")
        recipe = fp8core.recipe.get_recipe(recipe)
        fp8core.random.check_seed(seed)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_recipe(recipe, seed)

    def _set_recipe(self, recipe: fp8core.recipe.LinearRecipe, seed: int = 0) -> None:
        _check_reduction(recipe)
        self.recipe = recipe
        self.seed = int(seed)
        if recipe.stochastic_slots:
            self.register_buffer("sr_stream", torch.zeros((), dtype=torch.int64,
                                                          device=self.weight.device),
                                 persistent=False)
        self._specs = _recipe_specs(recipe)
        self._may_span_rows = any(
            r is not None and r.granularity.kind == "flat"
            for r in (recipe.rule("input"), recipe.rule("grad_output")))
        self._rows_warned = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input(input, self.in_features,
                    f"{type(self).__name__}(in_features={self.in_features}, "
                    f"out_features={self.out_features})")
        if self.in_features == 0 or self.out_features == 0:
            # an empty layer has no product to quantize: nn.Linear's bias-only / empty result
            # and zero gradients (bit-identical to nn.Linear, autocast included)
            return F.linear(input, self.weight, self.bias)
        _warn_rows_once(self, input, self.in_features, self.out_features)
        return _apply_module(input, self.weight.t(), self.bias, self.recipe, self._specs,
                             _layer_key(self))

    def extra_repr(self) -> str:
        seed = f", seed={self.seed}" if self.recipe.stochastic_slots else ""
        return f"{super().extra_repr()}, recipe={self.recipe.name}{seed}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "LinearFP8":
        """A new FP8 layer sharing ``linear``'s parameters (no copy); ``kwargs`` are the
        class's keyword options (``recipe=`` for LinearFP8; ``fw_format``, ``bw_format``,
        ``bsz``, ``bsz2`` for the bitsandbytes layers)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        if hasattr(new, "sr_stream"):
            new.sr_stream = torch.zeros((), dtype=torch.int64, device=linear.weight.device)
        new.train(linear.training)
        return new


class _LinearFP8Bnb(LinearFP8):
    """bitsandbytes' call shape over :func:`fp8core.recipe.bnb_recipe`."""

    #: "mixed" or "global" (same attribute on the NNX layers)
    mode: str

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, *, fw_format: Any = "e4m3",
                 bw_format: Any = "e5m2", bsz: int | None = None, bsz2: int | None = None):
        input_features = _validation.check_features(input_features, "input_features")
        output_features = _validation.check_features(output_features, "output_features")
        if bsz is not None:
            _validation.check_blocksize(bsz, argname="bsz")
        if bsz2 is not None:
            _validation.check_blocksize(bsz2, argname="bsz2")
        fw = _resolve_code(fw_format, "e4m3", "fw_format")
        bw = _resolve_code(bw_format, "e5m2", "bw_format")
        recipe = fp8core.recipe.bnb_recipe(self.mode, fw.codebook, bw.codebook, bsz, bsz2)
        nn.Linear.__init__(self, input_features, output_features, bias=bias, device=device,
                           dtype=dtype)
        self._set_recipe(recipe)
        self.fw_spec: QuantSpec = fw
        self.bw_spec: QuantSpec = bw
        # an empty layer (0 features) gets the rule's smallest block; it quantizes nothing
        self.bsz = bsz if bsz is not None else fp8core.select_block_size(max(input_features, 1))
        self.bsz2 = bsz2 if bsz2 is not None else fp8core.select_block_size(
            max(output_features, 1))

    @property
    def fw_codebook(self) -> fp8core.Codebook:
        """The forward codebook (attribute shared with the NNX layers)."""
        return self.fw_spec.codebook

    @property
    def bw_codebook(self) -> fp8core.Codebook:
        """The backward codebook (attribute shared with the NNX layers)."""
        return self.bw_spec.codebook

    def extra_repr(self) -> str:
        return (f"{nn.Linear.extra_repr(self)}, mode={self.mode}, fw_format={self.fw_spec.name}, "
                f"bw_format={self.bw_spec.name}, bsz={self.bsz}, bsz2={self.bsz2}")


class LinearFP8Mixed(_LinearFP8Bnb):
    """nn.Linear with ``matmul_fp8_mixed`` (recipe ``BNB_MIXED``): x in flat blocks of
    ``bsz``, weight one scale, grad_output in flat blocks of ``bsz2``, weight gradient
    xᵀ·g in full precision. ``bsz``/``bsz2`` default to
    ``select_block_size(in_features / out_features)``. Blocks run over the row-major
    flattening, so when ``in_features`` is not a multiple of ``bsz`` a block spans rows
    (tokens): the layer warns once when that happens (bitsandbytes' behaviour).
    """

    mode = "mixed"


class LinearFP8Global(_LinearFP8Bnb):
    """nn.Linear with ``matmul_fp8_global`` (recipe ``BNB_GLOBAL``): every operand one scale."""

    mode = "global"
