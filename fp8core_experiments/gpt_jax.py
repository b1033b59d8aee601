"""The recipe study's character-level GPT in JAX / Flax NNX (the twin of
:mod:`fp8core_experiments.gpt_torch`), loaded from the torch weights; jitted training
with the statistics taps of :mod:`fp8core_jax.stats` inside the step."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from fp8core_experiments.char_gpt import GPTConfig
from fp8core_experiments.numerics import pinned_jax_numerics

__all__ = ["GPT", "LinearBF16", "build_model", "train", "cross_entropy"]


class LinearBF16(nnx.Linear):
    """As :class:`fp8core_experiments.gpt_torch.LinearBF16`: bfloat16-rounded operands,
    float32 product and output."""

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
        return x.astype(jnp.bfloat16).astype(jnp.float32) @ k + self.bias[...]


def _norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch's LayerNorm: eps 1e-5, variance as the mean of squared deviations
    return nnx.LayerNorm(d, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, linear: type, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads, self.head_dim, self.context = cfg.n_heads, cfg.head_dim, cfg.context
        self.ln1 = _norm(d, rngs)
        self.qkv = linear(d, 3 * d, rngs=rngs)
        self.proj = linear(d, d, rngs=rngs)
        self.ln2 = _norm(d, rngs)
        self.fc = linear(d, 4 * d, rngs=rngs)
        self.out = linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (z.reshape(b, t, h, hd).transpose(0, 2, 1, 3) for z in (q, k, v))
        att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(mask, att, -jnp.inf), axis=-1)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x)), approximate=True))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, linear: type = nnx.Linear, *, rngs: nnx.Rngs):
        self.tok = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos = nnx.Embed(cfg.context, cfg.d_model, rngs=rngs)
        for i in range(cfg.n_blocks):
            setattr(self, f"h{i}", Block(cfg, linear, rngs))
        self.n_blocks = cfg.n_blocks
        self.ln_f = _norm(cfg.d_model, rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

    def __call__(self, idx: jax.Array) -> jax.Array:
        x = self.tok(idx) + self.pos.embedding[...][: idx.shape[1]]
        for i in range(self.n_blocks):
            x = getattr(self, f"h{i}")(x)
        return self.head(self.ln_f(x))


def build_model(recipe: str, cfg: GPTConfig, init: dict[str, np.ndarray]) -> GPT:
    """The twin of :func:`fp8core_experiments.gpt_torch.build_model`, holding exactly the
    torch weights ``init`` (``fp8core_jax.transfer``, round trip checked)."""
    from fp8core_jax import transfer

    model = GPT(cfg, LinearBF16 if recipe == "bf16" else nnx.Linear, rngs=nnx.Rngs(0))
    transfer.load_state_dict(model, init)
    back = transfer.to_state_dict(model)
    for key, value in init.items():
        if not np.array_equal(np.asarray(back[key]).view(np.uint32), value.view(np.uint32)):
            raise RuntimeError(f"weight transfer changed {key!r}")
    if recipe not in ("fp32", "bf16"):
        from fp8core_jax import nn as fp8nn

        fp8nn.convert_to_fp8(model, recipe=recipe, module_filter_fn=lambda m, fqn: fqn != "head")
    return model


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over every position (``F.cross_entropy``)."""
    logp = jax.nn.log_softmax(logits.reshape(-1, logits.shape[-1]), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels.reshape(-1, 1), axis=-1))


def train(recipe: str, cfg: GPTConfig, init, batches, val, *, eval_every: int,
          stats_every: int, progress: bool = True) -> dict:
    """As :func:`fp8core_experiments.gpt_torch.train` with ``optax.adamw``; one jitted step
    that also returns every FP8 layer's operands (``fp8core_jax.stats.tapped``: X and B as
    auxiliary outputs, dY as the gradient of the zero taps) — fetched to the host and
    measured only on statistics steps."""
    from fp8core_jax import stats as jstats

    with pinned_jax_numerics():
        model = build_model(recipe, cfg, init)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt = optax.adamw(cfg.lr, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps,
                          weight_decay=cfg.weight_decay)
        opt_state = opt.init(params)
        xs, ys = batches
        taps = jstats.zero_taps(model, jnp.asarray(xs[0]))

        # ``rest`` (non-parameter state: the stochastic-rounding layers' streams, §14.3) is
        # carried through every call, as the torch layers' buffers are: each forward (training
        # step or evaluation batch) advances a layer's stream by one in both frameworks
        @jax.jit
        def step_fn(params, rest, opt_state, taps, x, y):
            def loss_of(p, t):
                m = nnx.merge(graphdef, p, rest)
                with jstats.tapped(m, t) as tap:
                    loss = cross_entropy(m(x), y)
                return loss, (tap.operands, nnx.split(m, nnx.Param, ...)[2])
            (loss, (ops, rest)), (grads, dys) = jax.value_and_grad(
                loss_of, argnums=(0, 1), has_aux=True)(params, taps)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, loss, ops, dys

        @jax.jit
        def eval_fn(params, rest, x, y):
            m = nnx.merge(graphdef, params, rest)
            loss = cross_entropy(m(x), y)
            return loss, nnx.split(m, nnx.Param, ...)[2]

        steps = xs.shape[0]
        rows, records = [], []
        for step in tqdm(range(1, steps + 1), desc=f"jax   {recipe}", disable=not progress,
                         leave=False):
            want = recipe not in ("fp32", "bf16") and (step == steps or (
                stats_every > 0 and step % stats_every == 0))
            t0 = time.perf_counter()
            params, rest, opt_state, loss, ops, dys = step_fn(params, rest, opt_state, taps,
                                                              jnp.asarray(xs[step - 1]),
                                                              jnp.asarray(ys[step - 1]))
            loss = float(loss)
            if want:
                records.extend(jstats.records(model, jax.device_get(ops), jax.device_get(dys),
                                              step=step))
            seconds = time.perf_counter() - t0
            row = {"step": step, "train_loss": loss, "val_loss": None, "seconds": seconds,
                   "stats": want}
            if step % eval_every == 0 or step == steps:
                losses = []
                for i in range(val[0].shape[0]):
                    vloss, rest = eval_fn(params, rest, jnp.asarray(val[0][i]),
                                          jnp.asarray(val[1][i]))
                    losses.append(float(vloss))
                row["val_loss"] = float(np.mean(losses))
            rows.append(row)
    return {"rows": rows, "records": records}
