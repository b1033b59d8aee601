"""PyTorch collector for :mod:`fp8core.stats`: hooks capture what FP8 layers quantize.

For every ``LinearFP8Mixed`` / ``LinearFP8Global`` in a model, a forward hook
captures the layer's input (the activation A) and its weight (as B = weightᵀ,
``(in, out)``, the layout JAX stores), and a tensor hook on the layer's output
captures g = dL/d output during backward. The operands are converted to numpy and
handed to :func:`fp8core.stats.layer_stats`; no statistic is computed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fp8core import stats as _stats

__all__ = ["fp8_layers", "collect_stats"]


def _fp8_classes() -> tuple[type, ...]:
    import fp8core_torch

    return (fp8core_torch.LinearFP8Mixed, fp8core_torch.LinearFP8Global)


def fp8_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, mode)`` of every FP8 linear layer, in ``named_modules`` order."""
    classes = _fp8_classes()
    return [(name, module, module.mode) for name, module in model.named_modules()
            if isinstance(module, classes)]


def _numpy(t: torch.Tensor):
    return t.detach().to("cpu").numpy().copy() if t.dtype != torch.bfloat16 else \
        t.detach().to("cpu", torch.float32).numpy().copy()  # bf16 -> f32 is exact


@contextlib.contextmanager
def collect_stats(model: nn.Module, *, step: int = 0,
                  enabled: bool = True) -> Iterator[list[_stats.StatsRecord]]:
    """Record the quantized operands of every FP8 layer while the block runs.

    Run the forward **and** the backward inside the block to get gradient records.
    The yielded list is filled during the block and sorted (layer order, then
    activation / weight / gradient) on exit; hooks are removed on exit.

    Example::

        with collect_stats(model, step=step) as records:
            loss_fn(model(x), y).backward()
        print(fp8core.stats.summary_table(records))

    Args:
      model: any module; FP8 layers are found with ``named_modules``.
      step: stored in the records.
      enabled: ``False`` yields an empty list and installs nothing (for loops that
        collect only on some steps).
    """
    records: list[_stats.StatsRecord] = []
    if not enabled:
        yield records
        return
    layers = fp8_layers(model)
    order = {name: i for i, (name, _, _) in enumerate(layers)}
    handles = []

    def make_hook(name: str, specs: dict[str, _stats.OperandSpec]):
        def on_grad(grad: torch.Tensor) -> None:
            records.extend(_stats.layer_stats(name, specs, {"gradient": _numpy(grad)}, step=step))

        def on_forward(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            operands = {"activation": _numpy(inputs[0]), "weight": _numpy(module.weight.t())}
            records.extend(_stats.layer_stats(name, specs, operands, step=step))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                handles.append(output.register_hook(on_grad))
        return on_forward

    try:
        for name, module, mode in layers:
            handles.append(module.register_forward_hook(make_hook(name, _stats.specs_of_layer(module))))
        yield records
    finally:
        for h in handles:
            h.remove()
        rank = {op: i for i, op in enumerate(_stats.OPERANDS)}
        records.sort(key=lambda r: (r.step, order.get(r.layer, -1), rank[r.operand]))
