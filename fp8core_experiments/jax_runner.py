"""The digits MLP in JAX / Flax NNX, loaded from the PyTorch initial weights, and training."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from fp8core_experiments.data import DigitsData
from fp8core_experiments.numerics import pinned_jax_numerics
from fp8core_experiments.runs import RunResult, RunSpec, TrainConfig

__all__ = ["MLP", "build_model", "train", "cross_entropy"]


def _linear(spec: RunSpec, n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Module:
    if spec.mode == "fp32":
        return nnx.Linear(n_in, n_out, rngs=rngs)
    from fp8core_jax import nn as fp8nn

    cls = fp8nn.LinearFP8Mixed if spec.mode == "mixed" else fp8nn.LinearFP8Global
    return cls(n_in, n_out, rngs=rngs, fw_format=spec.fw_format, bw_format=spec.bw_format)


class MLP(nnx.Module):
    """``fc1 → ReLU → fc2``, the twin of :class:`fp8core_experiments.torch_runner.MLP`."""

    def __init__(self, spec: RunSpec, n_in: int, hidden: int, n_out: int, *, rngs: nnx.Rngs):
        self.fc1 = _linear(spec, n_in, hidden, rngs)
        self.fc2 = _linear(spec, hidden, n_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


def load_torch_weights(model: nnx.Module, state_dict: dict[str, np.ndarray]) -> None:
    """Copy a torch-layout state_dict (``<layer>.weight`` (out, in), ``<layer>.bias``) into
    the model's linear layers with ``fp8core_jax.transfer`` (kernel = weightᵀ), and
    check that the round trip back to a state_dict gives the same bits.

    Raises:
      RuntimeError: the transferred weights differ from ``state_dict``.
    """
    from fp8core_jax import transfer

    transfer.load_state_dict(model, state_dict)
    back = transfer.to_state_dict(model)
    for key, value in state_dict.items():
        if key not in back or not np.array_equal(np.asarray(back[key]).view(np.uint32),
                                                 np.asarray(value, np.float32).view(np.uint32)):
            raise RuntimeError(f"weight transfer changed {key!r}")


def build_model(spec: RunSpec, init: dict[str, np.ndarray], n_in: int, hidden: int,
                n_out: int) -> MLP:
    """An :class:`MLP` for ``spec`` holding exactly the torch weights ``init``.

    The NNX initialisation (``nnx.Rngs(0)``) is overwritten entirely by the transfer.
    """
    model = MLP(spec, n_in, hidden, n_out, rngs=nnx.Rngs(0))
    load_torch_weights(model, init)
    return model


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy (as ``torch.nn.functional.cross_entropy``)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _make_fns(graphdef: nnx.GraphDef, lr: float):
    """Jitted pure functions over (params, rest) — ``jax.jit`` on split state dispatches
    much faster than ``nnx.jit`` on the module, which matters for 300 tiny steps."""

    @jax.jit
    def train_step(params, rest, x, y):
        def loss_of(p):
            return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

        loss, grads = jax.value_and_grad(loss_of)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    @jax.jit
    def accuracy(params, rest, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))

    return train_step, accuracy


def train(spec: RunSpec, cfg: TrainConfig, data: DigitsData, init: dict[str, np.ndarray],
          batches: np.ndarray) -> RunResult:
    """As :func:`fp8core_experiments.torch_runner.train`, jitted, same op sequence
    (``p − lr·grad``). Statistics are recomputed eagerly from the module and the batch
    by :func:`fp8core_jax.stats.collect_stats` on statistics steps, before
    the update (the same parameters the torch hooks see)."""
    from fp8core_jax.stats import collect_stats

    start = time.perf_counter()
    with pinned_jax_numerics():
        model = build_model(spec, init, data.n_features, cfg.hidden, data.n_classes)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        train_step, accuracy = _make_fns(graphdef, cfg.lr)
        x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
        rows, records = [], []
        bar = tqdm(range(1, cfg.steps + 1), desc=f"jax   {spec.label}", disable=not cfg.progress,
                   leave=False)
        for step in bar:
            idx = batches[step - 1]
            xb, yb = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
            if spec.mode != "fp32" and cfg.is_stats_step(step):
                nnx.update(model, params)
                records.extend(collect_stats(model, xb, lambda out: cross_entropy(out, yb),
                                             step=step))
            params, loss = train_step(params, rest, xb, yb)
            row = {"framework": "jax", "mode": spec.mode, "format": spec.format_label,
                   "step": step, "loss": float(loss), "train_acc": None, "test_acc": None}
            if cfg.is_eval_step(step):
                row["train_acc"] = float(accuracy(params, rest, x_train, y_train))
                row["test_acc"] = float(accuracy(params, rest, x_test, y_test))
                bar.set_postfix(loss=f"{row['loss']:.4f}", test_acc=f"{row['test_acc']:.3f}")
            rows.append(row)
    return RunResult("jax", spec, rows, records, time.perf_counter() - start)
