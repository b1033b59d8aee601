"""``nn.Linear`` drop-ins whose matmul is FP8-simulated (docs/numerics.md §6).

``LinearFP8Mixed`` (activations blockwise, weight global, grad_output blockwise,
weight gradient in full precision) and ``LinearFP8Global`` (every operand global).
Parameters and state_dict keys are exactly nn.Linear's, so checkpoints load both
ways. The codebook tables are non-persistent buffers (stored as int32 bit
patterns, so ``.to(device)`` moves them and ``.half()`` cannot round them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import fp8core
from fp8core import _validation
from fp8core_torch.config import QuantSpec, codebook_buffers, tensors_from_buffers
from fp8core_torch.matmul import (
    _MatMulFP8Global,
    _MatMulFP8Mixed,
    _apply_module,
    _resolve_code,
)

__all__ = ["LinearFP8Mixed", "LinearFP8Global"]


class _LinearFP8Base(nn.Linear):
    _function: type[torch.autograd.Function]
    #: "mixed" or "global" (same attribute on the NNX layers)
    mode: str

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, *, fw_format: Any = "e4m3",
                 bw_format: Any = "e5m2", bsz: int | None = None, bsz2: int | None = None):
        _validation.check_features(input_features, "input_features")
        _validation.check_features(output_features, "output_features")
        if bsz is not None:
            _validation.check_blocksize(bsz, argname="bsz")
        if bsz2 is not None:
            _validation.check_blocksize(bsz2, argname="bsz2")
        fw = _resolve_code(fw_format, "e4m3", "fw_format")
        bw = _resolve_code(bw_format, "e5m2", "bw_format")
        super().__init__(input_features, output_features, bias=bias, device=device, dtype=dtype)
        self.fw_spec: QuantSpec = fw
        self.bw_spec: QuantSpec = bw
        self.bsz = bsz if bsz is not None else fp8core.select_block_size(input_features)
        self.bsz2 = bsz2 if bsz2 is not None else fp8core.select_block_size(output_features)
        for prefix, spec in (("fw", fw), ("bw", bw)):
            for name, t in codebook_buffers(spec.codebook, prefix).items():
                self.register_buffer(name, t.to(self.weight.device), persistent=False)

    def _tabs(self, prefix: str, spec: QuantSpec):
        if not spec.needs_tables:
            return None
        return tensors_from_buffers(dict(self.named_buffers(recurse=False)), prefix)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _apply_module(self._function, input, self.weight.t(), self.bias,
                             self.fw_spec, self.bw_spec, self._tabs("fw", self.fw_spec),
                             self._tabs("bw", self.bw_spec), self.bsz, self.bsz2)

    @property
    def fw_codebook(self) -> fp8core.Codebook:
        """The forward codebook (attribute shared with the NNX layers)."""
        return self.fw_spec.codebook

    @property
    def bw_codebook(self) -> fp8core.Codebook:
        """The backward codebook (attribute shared with the NNX layers)."""
        return self.bw_spec.codebook

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mode={self.mode}, fw_format={self.fw_spec.name}, "
                f"bw_format={self.bw_spec.name}, bsz={self.bsz}, bsz2={self.bsz2}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> "_LinearFP8Base":
        """A new FP8 layer sharing ``linear``'s parameters (no copy).

        ``kwargs``: fw_format, bw_format, bsz, bsz2.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        dev = linear.weight.device
        for prefix, spec in (("fw", new.fw_spec), ("bw", new.bw_spec)):
            for name, t in codebook_buffers(spec.codebook, prefix).items():
                setattr(new, name, t.to(dev))
        new.train(linear.training)
        return new


class LinearFP8Mixed(_LinearFP8Base):
    """nn.Linear with ``matmul_fp8_mixed``: x blockwise (bsz), weight global, grad_output
    blockwise (bsz2), weight gradient xᵀ·g in full precision.

    ``bsz``/``bsz2`` default to ``select_block_size(in_features / out_features)``.
    """

    _function = _MatMulFP8Mixed
    mode = "mixed"


class LinearFP8Global(_LinearFP8Base):
    """nn.Linear with ``matmul_fp8_global``: every operand quantized with one scale."""

    _function = _MatMulFP8Global
    mode = "global"
