"""Quantization statistics of a PyTorch model's FP8 layers (:mod:`fp8core.stats`).

Hooks capture what each FP8 layer quantizes while the caller's own forward and backward
run (no second forward): a forward hook takes the layer's input ``X`` and its weight as
``B = weightᵀ`` (``(in, out)``, the layout JAX stores), and a tensor hook on the layer's
output takes ``dY = dL/d output`` during backward. The operands go to :mod:`fp8core.stats`
as numpy arrays — no statistic is computed here, so records have the same names and
numbers as :mod:`fp8core_jax.stats` whenever the captured operands have the same bits.

Records: a :class:`~fp8core_torch.LinearFP8` layer with a recipe gives one record per
slot that quantizes an operand of its own (``operand`` = the slot name,
:func:`fp8core.stats.recipe_layer_stats`); bitsandbytes' ``LinearFP8Mixed`` /
``LinearFP8Global`` keep their three operands ``activation`` / ``weight`` / ``gradient``
(:func:`fp8core.stats.layer_stats`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fp8core import recipe as _recipe
from fp8core import stats as _stats

__all__ = ["fp8_layers", "collect_stats", "sort_records"]


def fp8_layers(model: nn.Module) -> list[tuple[str, nn.Module, str | None]]:
    """``(name, module, mode)`` of every FP8 linear layer (``LinearFP8`` and its
    bitsandbytes subclasses) in ``named_modules`` order; ``mode`` is ``"mixed"`` /
    ``"global"`` for bitsandbytes' layers, None for recipe layers."""
    from fp8core_torch.linear import LinearFP8

    return [(name, module, getattr(module, "mode", None)) for name, module in model.named_modules()
            if isinstance(module, LinearFP8)]


def _numpy(t: torch.Tensor):
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)                                   # exact
    return t.numpy().copy()


def sort_records(records: list[_stats.StatsRecord], layer_order: dict[str, int]) -> None:
    """Sort in place: step, layer order, then operand order (legacy operands, then slots)
    — the order both backends' collectors return."""
    records.sort(key=lambda r: (r.step, layer_order.get(r.layer, -1)))  # stable: operand order kept


@contextlib.contextmanager
def collect_stats(model: nn.Module, *, step: int = 0,
                  enabled: bool = True) -> Iterator[list[_stats.StatsRecord]]:
    """Record the quantized operands of every FP8 layer while the block runs.

    Run the forward **and** the backward inside the block to get the gradient slots'
    records (forward-only: the ``input`` / ``weight`` / ``weight_for_grad_input``
    slots). The yielded list is filled on exit, sorted (layer order, then operand order);
    hooks are removed on exit.

    Example::

        with collect_stats(model, step=step) as records:
            loss_fn(model(x), y).backward()
        print(fp8core.stats.summary_table(records))

    Args:
      model: any module; FP8 layers are found with ``named_modules``.
      step: stored in the records.
      enabled: ``False`` yields an empty list and installs nothing (for loops that
        collect only on some steps).

    A layer called more than once inside the block gives one set of records per call.
    """
    records: list[_stats.StatsRecord] = []
    if not enabled:
        yield records
        return
    layers = fp8_layers(model)
    order = {name: i for i, (name, _, _) in enumerate(layers)}
    handles = []
    calls: list[dict] = []       # per call: name, module, mode, X, B, and dY once seen

    def make_hook(name: str, mode: str | None):
        def on_forward(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            call = {"name": name, "module": module, "mode": mode, "X": _numpy(inputs[0]),
                    "B": _numpy(module.weight.t()), "dY": None}
            calls.append(call)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def on_grad(grad: torch.Tensor) -> None:
                    call["dY"] = _numpy(grad)
                handles.append(output.register_hook(on_grad))
        return on_forward

    try:
        for name, module, mode in layers:
            handles.append(module.register_forward_hook(make_hook(name, mode)))
        yield records
    finally:
        for h in handles:
            h.remove()
    for c in calls:
        if c["mode"] is None:
            records.extend(_stats.recipe_layer_stats(c["name"], c["module"].recipe, c["X"],
                                                     c["B"], c["dY"], step=step))
        else:
            ops = {"activation": c["X"], "weight": c["B"]}
            if c["dY"] is not None:
                ops["gradient"] = c["dY"]
            records.extend(_stats.layer_stats(c["name"], _stats.specs_of_layer(c["module"]),
                                              ops, step=step))
    sort_records(records, order)
