"""JAX / Flax NNX collector for :mod:`fp8core.stats`.

Side effects inside jitted code are awkward, so statistics are gathered by an
eager re-run: :func:`collect_stats` temporarily wraps every ``LinearFP8Mixed`` /
``LinearFP8Global`` of the model in a recorder, runs the model once on ``x`` to
capture each layer's input (the activation A), reads each layer's kernel (B,
``(in, out)``), and — given a loss — differentiates the loss with respect to a
zero perturbation added to each layer's output, which yields g = dL/d output.
The operands go to :func:`fp8core.stats.layer_stats` as numpy arrays; no
statistic is computed here. The model is restored before returning, also on error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp8core import stats as _stats

__all__ = ["fp8_layers", "collect_stats"]


def _fp8_classes() -> tuple[type, ...]:
    from fp8core_jax import nn as fp8nn

    return (fp8nn.LinearFP8Mixed, fp8nn.LinearFP8Global)


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def fp8_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module, str]]:
    """``(path, module, mode)`` of every FP8 linear layer, in NNX graph order."""
    classes = _fp8_classes()
    return [(tuple(path), module, module.mode) for path, module in nnx.iter_modules(model)
            if isinstance(module, classes)]


class _Recorder:
    """Stands in for a layer during collection: records its input, adds a perturbation."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer
        self.inputs: list[Any] = []
        self.output_shape: tuple | None = None
        self.output_dtype: Any = None
        self.perturbation: Any = None

    def __call__(self, x, *args, **kwargs):
        out = self.layer(x, *args, **kwargs)
        if self.perturbation is None:  # the recording pass
            self.inputs.append(x)
            self.output_shape, self.output_dtype = out.shape, out.dtype
            return out
        return out + self.perturbation


def _get(parent: Any, key: Any) -> Any:
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent: Any, key: Any, value: Any) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _numpy(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a.copy()  # exact


def collect_stats(model: nnx.Module, x: Any, loss_fn: Callable[[Any], Any] | None = None, *,
                  step: int = 0) -> list[_stats.StatsRecord]:
    """Statistics records of every FP8 layer of ``model`` for the input ``x``.

    Args:
      model: an NNX module (not modified: layers are swapped back before return).
      x: the model input (what ``model(x)`` takes).
      loss_fn: maps the model output to a scalar loss; gives the gradient records.
        ``None`` records activations and weights only.
      step: stored in the records.

    Returns:
      Records sorted by layer (graph order), then activation / weight / gradient —
      the same structure as :func:`fp8core_experiments.torch_stats.collect_stats`.
      Layers called more than once per forward contribute one activation record per
      call; their gradient record is the sum over calls.

    Runs eagerly (call it outside ``jit``); the model's parameters are constants here.
    """
    layers = fp8_layers(model)
    recorders = []
    try:
        for path, module, _ in layers:
            rec = _Recorder(module)
            _set(_get_path(model, path[:-1]), path[-1], rec)
            recorders.append(rec)
        out = model(x)
        grads: list[Any] = [None] * len(recorders)
        if loss_fn is not None and recorders:
            called = [i for i, r in enumerate(recorders) if r.output_shape is not None]

            def loss_of(perturbations):
                for i, p in zip(called, perturbations):
                    recorders[i].perturbation = p
                return loss_fn(model(x))

            zeros = [jnp.zeros(recorders[i].output_shape, recorders[i].output_dtype)
                     for i in called]
            for i, g in zip(called, jax.grad(loss_of)(zeros)):
                grads[i] = g
        del out
    finally:
        for (path, module, _), rec in zip(layers, recorders):
            rec.perturbation = None
            _set(_get_path(model, path[:-1]), path[-1], module)
    records: list[_stats.StatsRecord] = []
    for (path, module, mode), rec, grad in zip(layers, recorders, grads):
        specs = _stats.specs_of_layer(module)
        name = _name(path)
        for inp in rec.inputs:
            records.extend(_stats.layer_stats(name, specs, {"activation": _numpy(inp)}, step=step))
        records.extend(_stats.layer_stats(name, specs, {"weight": _numpy(module.kernel[...])},
                                          step=step))
        if grad is not None:
            records.extend(_stats.layer_stats(name, specs, {"gradient": _numpy(grad)}, step=step))
    rank = {op: i for i, op in enumerate(_stats.OPERANDS)}
    order = {_name(p): i for i, (p, _, _) in enumerate(layers)}
    records.sort(key=lambda r: (order[r.layer], rank[r.operand]))
    return records


def _get_path(root: Any, path: tuple) -> Any:
    node = root
    for key in path:
        node = _get(node, key)
    return node
