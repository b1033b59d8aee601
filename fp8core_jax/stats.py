"""Quantization statistics of a Flax NNX model's FP8 layers (:mod:`fp8core.stats`).

Two ways to capture what each FP8 layer quantizes; both hand the operands to
:mod:`fp8core.stats` as numpy arrays (no statistic is computed here), so the records have
the names and numbers of :mod:`fp8core_torch.stats` whenever the operands have the same bits.

* **Inside a jitted training step** (:func:`tapped`, :func:`zero_taps`, :func:`records`):
  the step's own forward and backward return the operands as auxiliary outputs — each
  FP8 layer's input ``X`` and kernel ``B`` through ``has_aux``, and its output gradient
  ``dY`` as the gradient of a zero "tap" added to the layer's output (differentiated in
  the same ``value_and_grad`` as the parameters; ``out + 0`` leaves the forward's bits
  unchanged). No second forward, no eager re-run::

      taps = stats.zero_taps(model, x)                 # zeros shaped like each FP8 output

      @jax.jit
      def step(params, taps, x, y):
          def loss_of(params, taps):
              m = nnx.merge(graphdef, params, rest)
              with stats.tapped(m, taps) as tap:
                  loss = loss_fn(m(x), y)
              return loss, tap.operands
          (loss, ops), (grads, dys) = jax.value_and_grad(
              loss_of, argnums=(0, 1), has_aux=True)(params, taps)
          return loss, grads, ops, dys

      loss, grads, ops, dys = step(params, taps, x, y)
      recs = stats.records(model, ops, dys, step=n)    # numpy, outside jit

* **Eagerly** (:func:`collect_stats`): the model is re-run once on ``x`` with recorders in
  place of its FP8 layers (for inspection outside a training loop).

Records: recipe layers (:class:`fp8core_jax.nn.LinearFP8`) give one record per slot that
quantizes an operand of its own (:func:`fp8core.stats.recipe_layer_stats`); bitsandbytes'
``LinearFP8Mixed`` / ``LinearFP8Global`` keep ``activation`` / ``weight`` / ``gradient``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp8core import stats as _stats

__all__ = ["fp8_layers", "collect_stats", "tapped", "zero_taps", "records", "Tap"]


def _fp8_classes() -> tuple[type, ...]:
    from fp8core_jax import nn as fp8nn

    return (fp8nn.LinearFP8,)


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def fp8_layers(model: nnx.Module) -> list[tuple[tuple, nnx.Module, str | None]]:
    """``(path, module, mode)`` of every FP8 linear layer (``LinearFP8`` and bitsandbytes'
    subclasses), in NNX graph order; ``mode`` is None for recipe layers."""
    classes = _fp8_classes()
    return [(tuple(path), module, getattr(module, "mode", None))
            for path, module in nnx.iter_modules(model) if isinstance(module, classes)]


def _layer_records(name: str, module: Any, mode: str | None, X: Any, B: Any, dY: Any,
                   step: int) -> list[_stats.StatsRecord]:
    X, B = _numpy(X), _numpy(B)
    dY = None if dY is None else _numpy(dY)
    if mode is None:
        return _stats.recipe_layer_stats(name, module.recipe, X, B, dY, step=step)
    ops = {"activation": X, "weight": B}
    if dY is not None:
        ops["gradient"] = dY
    return _stats.layer_stats(name, _stats.specs_of_layer(module), ops, step=step)


def _sort(records: list[_stats.StatsRecord], layers: list) -> list[_stats.StatsRecord]:
    order = {_name(p): i for i, (p, _, _) in enumerate(layers)}
    records.sort(key=lambda r: (r.step, order[r.layer]))  # stable: operand order kept
    return records


class Tap:
    """What :func:`tapped` yields: ``operands`` maps each FP8 layer's name to
    ``{"X": input, "B": kernel}`` as the layer saw them (pytrees of arrays, to return
    from the traced function); ``shapes`` maps it to the output's ``ShapeDtypeStruct``."""

    def __init__(self) -> None:
        self.operands: dict[str, dict[str, Any]] = {}
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}


class _TapLayer:
    """Stands in for an FP8 layer inside :func:`tapped`: records, adds its zero tap."""

    def __init__(self, layer: nnx.Module, name: str, tap: Tap, zero: Any):
        self.layer, self.name, self.tap, self.zero = layer, name, tap, zero

    def __call__(self, x, *args, **kwargs):
        if self.name in self.tap.operands:
            raise ValueError(f"stats.tapped: layer {self.name!r} was called twice; taps "
                             f"record one call per layer (use collect_stats for shared layers)")
        out = self.layer(x, *args, **kwargs)
        self.tap.operands[self.name] = {"X": x, "B": self.layer.kernel[...]}
        self.tap.shapes[self.name] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out if self.zero is None else out + self.zero

    def __getattr__(self, item):
        return getattr(self.layer, item)


@contextlib.contextmanager
def tapped(model: nnx.Module, taps: dict[str, Any] | None = None) -> Iterator[Tap]:
    """Within the block, every FP8 layer of ``model`` records its input and kernel in
    the yielded :class:`Tap` and adds ``taps[name]`` (a zero array shaped like its output)
    to its output, so that the gradient with respect to ``taps`` is ``dY`` per layer.
    Meant for a model merged inside a traced (jitted) function; the layers are put back
    on exit, also on error.

    Raises:
      ValueError: ``taps`` lacks an FP8 layer's name; a layer is called twice.
    """
    layers = fp8_layers(model)
    tap = Tap()
    if taps is not None:
        missing = [_name(p) for p, _, _ in layers if _name(p) not in taps]
        if missing:
            raise ValueError(f"stats.tapped: taps has no entry for the FP8 layers "
                             f"{', '.join(missing)} (build it with stats.zero_taps)")
    try:
        for path, module, _ in layers:
            name = _name(path)
            _set(_get_path(model, path[:-1]), path[-1],
                 _TapLayer(module, name, tap, None if taps is None else taps[name]))
        yield tap
    finally:
        for path, module, _ in layers:
            _set(_get_path(model, path[:-1]), path[-1], module)


def zero_taps(model: nnx.Module, *args: Any, **kwargs: Any) -> dict[str, jax.Array]:
    """Zeros shaped like each FP8 layer's output for ``model(*args, **kwargs)`` (by
    ``jax.eval_shape``: nothing is computed), keyed by layer name — the ``taps`` of
    :func:`tapped`."""
    def run(m, *a, **k):
        with tapped(m) as tap:
            m(*a, **k)
            return {name: jnp.zeros(s.shape, s.dtype) for name, s in tap.shapes.items()}

    # one abstract trace of a copy (nnx.eval_shape): only shapes leave it, and the
    # model's own state — a stochastic layer's stream, §14.3 — is not advanced
    got = nnx.eval_shape(run, model, *args, **kwargs)
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in got.items()}


def records(model: nnx.Module, operands: dict[str, dict[str, Any]],
            grads: dict[str, Any] | None = None, *, step: int = 0) -> list[_stats.StatsRecord]:
    """:mod:`fp8core.stats` records from what a tapped step returned: ``operands`` (the
    :class:`Tap`'s, per layer ``{"X", "B"}``) and ``grads`` (the gradient with respect to
    the taps: ``dY`` per layer; None: forward slots only). Computed in numpy, outside jit.

    Returns records sorted by layer (graph order), then operand order — the structure of
    :func:`fp8core_torch.stats.collect_stats`.
    """
    layers = fp8_layers(model)
    out: list[_stats.StatsRecord] = []
    for path, module, mode in layers:
        name = _name(path)
        if name not in operands:
            continue
        dY = None if grads is None else grads.get(name)
        out.extend(_layer_records(name, module, mode, operands[name]["X"], operands[name]["B"],
                                  dY, step))
    return _sort(out, layers)


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
      the same structure as :func:`fp8core_torch.stats.collect_stats`.
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
        name = _name(path)
        for inp in rec.inputs:
            records.extend(_layer_records(name, module, mode, inp, module.kernel[...],
                                          grad if len(rec.inputs) == 1 else None, step))
        if len(rec.inputs) > 1 and grad is not None and mode is not None:
            records.extend(_stats.layer_stats(name, _stats.specs_of_layer(module),
                                              {"gradient": _numpy(grad)}, step=step))
    return _sort(records, layers)


def _get_path(root: Any, path: tuple) -> Any:
    node = root
    for key in path:
        node = _get(node, key)
    return node
