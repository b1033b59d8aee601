"""fp8core_jax benchmark (not a test): every recipe preset under ``jax.jit`` against its
high-precision twin, and fake_quantize against a jitted copy, as ratios measured in one run.

    python benchmarks/bench_jax.py [--repeats 7] [--m 4096 --k 1024 --n 4096]
                                   [--only layers|small|model|quant] [--recipes A,B] [--no-kernel]

Sections (each prints its targets and whether they are met):

* ``layers``: a training step ``jax.jit(jax.value_and_grad(loss))`` of
  ``loss = sum(matmul_fp8(x, W, recipe=...) * g)`` (the loss value needs the forward
  product: with ``jax.grad`` alone XLA drops it and only the backward is timed) for every
  preset in ``fp8core.recipe.PRESETS``, ``x`` m × k, ``W`` k × n, against the same step of a
  jitted ``x @ W``; float32 and bfloat16. Targets: ≤ 1.10× (float32), ≤ 1.25× (bfloat16).
  For bfloat16 the float32-accumulate ``x @ W`` (``preferred_element_type=float32``, then
  cast) is shown as a second baseline: XLA:CPU runs a plain bfloat16 step slower than it.
* ``small``: ``fp8core_jax.nn.LinearFP8(recipe=...)`` vs ``nnx.Linear`` (bias, same
  initial parameters), the same jitted step on the split state, at 32 × 64 → 128
  (target ≤ 1.5×) and 512 × 256 → 256 (≤ 1.15×), float32; each timing a loop of calls.
* ``model``: one jitted training step (forward, cross-entropy, backward, optax AdamW) of a
  small pre-norm causal NNX transformer (nnx.Linear / nnx.Embed / nnx.LayerNorm; 2 blocks,
  d_model 256, 4 heads, sequence 128, batch 8, vocabulary 512), converted with
  ``fp8core_jax.nn.convert_to_fp8(model, recipe=..., module_filter_fn=...)`` (every linear
  but the head), vs its float32 twin. Target ≤ 1.15×.
* ``quant``: fake_quantize of 16M float32 elements vs a jitted copy.

Each figure is the median over ``repeats`` of paired measurements (baseline and
candidate back to back, after compilation and warm-up), as bench_torch.py does. On a
tree without ``fp8core_jax.matmul_fp8`` (before the recipe engine) only the two
bitsandbytes presets run, through ``matmul_fp8_mixed`` / ``matmul_fp8_global``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import (BF16_REASON, MODEL, SMALL_SHAPES, TARGETS, cpu_flags, failed,  # noqa: E402
                     flags_line, header, native_bf16, paired, print_rows, print_work, stamp)
from flax import nnx  # noqa: E402

import fp8core_jax  # noqa: E402
import fp8core_jax.nn as fnn  # noqa: E402
from fp8core import _kernel  # noqa: E402
from fp8core.recipe import PRESETS  # noqa: E402
from fp8core_jax import _ffi, fake_quantize  # noqa: E402

#: the recipe engine (fp8core_jax.matmul_fp8 and nn.LinearFP8(recipe=)) is in this tree
ENGINE = hasattr(fp8core_jax, "matmul_fp8")
#: before it: the bitsandbytes presets through their own functions / layers / modes
LEGACY = {"BNB_MIXED": (fp8core_jax.matmul_fp8_mixed, "LinearFP8Mixed", "mixed"),
          "BNB_GLOBAL": (fp8core_jax.matmul_fp8_global, "LinearFP8Global", "global")}
NO_ENGINE = "skipped: this tree has no fp8core_jax.matmul_fp8 (recipe engine not landed)"


def runnable(name: str) -> bool:
    return ENGINE or name in LEGACY


def matmul_for(name: str):
    if ENGINE:
        return lambda x, w: fp8core_jax.matmul_fp8(x, w, recipe=name, seed=0)
    return LEGACY[name][0]


def linear_for(name: str, k: int, n: int, rngs) -> nnx.Module:
    if ENGINE:
        return fnn.LinearFP8(k, n, recipe=name, rngs=rngs)
    return getattr(fnn, LEGACY[name][1])(k, n, rngs=rngs)


def convert_for(name: str, model: nnx.Module) -> nnx.Module:
    if ENGINE:
        return fnn.convert_to_fp8(model, recipe=name, module_filter_fn=not_head)
    return fnn.convert_to_fp8(model, LEGACY[name][2], module_filter_fn=not_head)


def blocking(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


# ----------------------------------------------------------------------------- layers

def fwd_bwd(matmul):
    """A training step: the loss value and its gradients."""
    def loss(x, w, g):
        return jnp.sum((matmul(x, w) * g).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def section_layers(args, bf16_ok: bool):
    rng = np.random.default_rng(0)
    print(f"\nfwd+bwd (jit(value_and_grad)), {args.m} x {args.k} @ {args.k} x {args.n} "
          f"(ratio = FP8 / jitted x @ W, same run)")
    print_work(args.recipes, args.m, args.k, args.n, "jax")
    plain = fwd_bwd(lambda x, w: x @ w)
    f32acc = fwd_bwd(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        if dtype == jnp.bfloat16 and not bf16_ok:
            print(f"\n[{name}] skipped: {BF16_REASON}")
            continue
        print(f"\n[{name}] {stamp()}")
        x = jnp.asarray(rng.standard_normal((args.m, args.k)), dtype)
        w = jnp.asarray(rng.standard_normal((args.k, args.n)) / 32, dtype)
        g = jnp.asarray(rng.standard_normal((args.m, args.n)), dtype)
        base = blocking(plain, x, w, g)
        rows, acc_ratio = [], None
        if dtype == jnp.bfloat16:
            tb, tc, *acc_ratio = paired(base, blocking(f32acc, x, w, g), args.repeats)
            rows.append(("x @ W, float32 accumulate", tb, tc, acc_ratio, None))
        for preset in args.recipes:
            if not runnable(preset):
                rows.append((preset, None, None, None, NO_ENGINE))
                continue
            try:
                tb, tc, *ratio = paired(base, blocking(fwd_bwd(matmul_for(preset)), x, w, g), args.repeats)
            except Exception as e:  # noqa: BLE001 - a failing candidate is reported, not fatal
                rows.append(failed(preset, e))
                continue
            rows.append((preset, tb, tc, ratio, TARGETS[f"layer {name}"]))
        print_rows(rows)
        if acc_ratio is not None:
            print(f"  vs the float32-accumulate baseline (ratio / {acc_ratio[0]:.2f}): " + ", ".join(
                f"{r[0]} {r[3][0] / acc_ratio[0]:.2f}" for r in rows[1:] if r[3] is not None))
    print(f"  (end {stamp()})")


def layer_step(layer, x, g):
    """Jitted value_and_grad over the layer's split state and x."""
    graphdef, state = nnx.split(layer)

    def loss(state, x, g):
        return jnp.sum((nnx.merge(graphdef, state)(x) * g).astype(jnp.float32))
    return blocking(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), state, x, g)


def section_small(args):
    rng = np.random.default_rng(1)
    for tokens, k, n in SMALL_SHAPES:
        key = f"small {tokens}x{k}->{n}"
        print(f"\nnnx layer fwd+bwd (jit(value_and_grad) of the split state), {tokens} tokens x "
              f"{k} -> {n}, bias, float32 (µs per step; each sample a loop of >= 20 ms) {stamp()}")
        x = jnp.asarray(rng.standard_normal((tokens, k)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((tokens, n)), jnp.float32)
        base = layer_step(nnx.Linear(k, n, rngs=nnx.Rngs(0)), x, g)
        rows = []
        for preset in args.recipes:
            if not runnable(preset):
                rows.append((preset, None, None, None, NO_ENGINE))
                continue
            try:
                cand = layer_step(linear_for(preset, k, n, nnx.Rngs(0)), x, g)
                tb, tc, *ratio = paired(base, cand, args.repeats, min_sample=0.02)
            except Exception as e:  # noqa: BLE001
                rows.append(failed(preset, e))
                continue
            rows.append((preset, tb, tc, ratio, TARGETS[key]))
        print_rows(rows, unit="µs", scale=1e6)


# ----------------------------------------------------------------------------- model

def _modules(items):
    return nnx.List(items) if hasattr(nnx, "List") else list(items)


class Block(nnx.Module):
    """Pre-norm causal self-attention + GELU MLP (the torch benchmark's Block)."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.qkv, self.proj = nnx.Linear(d, 3 * d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        b, s, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, s, 3, self.heads, d // self.heads)
        a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        x = x + self.proj(a.reshape(b, s, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))


class TinyLM(nnx.Module):
    """Token + position embeddings, pre-norm blocks, final LayerNorm, linear head."""

    def __init__(self, vocab, d_model, heads, layers, seq, rngs: nnx.Rngs, **_):
        self.tok, self.pos = nnx.Embed(vocab, d_model, rngs=rngs), nnx.Embed(seq, d_model, rngs=rngs)
        self.blocks = _modules(Block(d_model, heads, rngs) for _ in range(layers))
        self.ln_f, self.head = nnx.LayerNorm(d_model, rngs=rngs), nnx.Linear(d_model, vocab, rngs=rngs)

    def __call__(self, idx):
        x = self.tok(idx) + self.pos(jnp.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def not_head(module, fqn: str) -> bool:
    return fqn != "head"


def adamw_step(graphdef, rest, tx):
    """``step(params, opt_state, idx, tgt) -> (params, opt_state, loss)``: one optimizer
    step of the LM's mean token cross-entropy (unjitted; bench_sharded shards it)."""
    def step(params, opt_state, idx, tgt):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(idx)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


class TrainStep:
    """A jitted AdamW step carrying (params, optimizer state) from call to call, donated."""

    def __init__(self, model: nnx.Module, idx, tgt):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(1e-4)
        self.fn = jax.jit(adamw_step(graphdef, rest, tx), donate_argnums=(0, 1))
        self.state = (params, tx.init(params))
        self.data = (idx, tgt)

    def __call__(self):
        params, opt_state, loss = self.fn(*self.state, *self.data)
        self.state = (params, opt_state)
        jax.block_until_ready(loss)


def section_model(args):
    rng = np.random.default_rng(2)
    print(f"\njitted training step (fwd, cross-entropy, bwd, optax AdamW) of a pre-norm causal NNX "
          f"transformer {MODEL}, float32; every nnx.Linear but the head converted, vs the "
          f"unconverted twin {stamp()}")
    shape = (MODEL["batch"], MODEL["seq"])
    idx = jnp.asarray(rng.integers(0, MODEL["vocab"], shape), jnp.int32)
    tgt = jnp.asarray(rng.integers(0, MODEL["vocab"], shape), jnp.int32)
    base = TrainStep(TinyLM(**MODEL, rngs=nnx.Rngs(0)), idx, tgt)
    rows = []
    for preset in args.recipes:
        if not runnable(preset):
            rows.append((preset, None, None, None, NO_ENGINE))
            continue
        try:
            cand = TrainStep(convert_for(preset, TinyLM(**MODEL, rngs=nnx.Rngs(0))), idx, tgt)
            tb, tc, *ratio = paired(base, cand, args.repeats, warmup=3)
        except Exception as e:  # noqa: BLE001
            rows.append(failed(preset, e))
            continue
        rows.append((preset, tb, tc, ratio, TARGETS["model"]))
    print_rows(rows)


# ----------------------------------------------------------------------------- quantizers

def section_quant(args):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(args.numel), jnp.float32)
    copy = blocking(jax.jit(lambda v: v + 0), x)
    print(f"\nfake_quantize e4m3, {args.numel} float32 elements (ratio = op / jitted copy) {stamp()}")
    rows = []
    for bs in (64, 4096, None):
        fq = blocking(jax.jit(lambda v, bs=bs: fake_quantize(v, "e4m3", bs)), x)
        tb, tc, *ratio = paired(copy, fq, args.repeats)
        rows.append((f"blocksize={bs}", tb, tc, ratio, None))
    print_rows(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", choices=["layers", "small", "model", "quant"], action="append",
                   help="run only these sections (repeatable; default all)")
    p.add_argument("--recipes", default=",".join(PRESETS),
                   help=f"comma-separated presets (default all: {','.join(PRESETS)})")
    p.add_argument("--no-kernel", action="store_true",
                   help="the XLA path (as on GPU/TPU or without the C kernel)")
    a = p.parse_args()
    a.recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    unknown = [r for r in a.recipes if r not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; presets: {', '.join(PRESETS)}")
    if a.no_kernel:
        _kernel.ENABLED = False
    warnings.filterwarnings("ignore", message=".*span rows.*")  # BNB_MIXED's flat blocks (expected)
    flags = cpu_flags()
    sections = a.only or ["layers", "small", "model", "quant"]
    print(header())
    print(f"jax {jax.__version__}, devices {jax.devices()}, repeats {a.repeats}, "
          f"C kernel {'on' if _ffi.available() else 'off (XLA path)'}, "
          f"recipe engine {'yes' if ENGINE else 'no (BNB presets only)'}")
    print(flags_line(flags))
    if "layers" in sections:
        section_layers(a, native_bf16(flags))
    if "small" in sections:
        section_small(a)
    if "model" in sections:
        section_model(a)
    if "quant" in sections:
        section_quant(a)
    print(f"\ndone {stamp()}")


if __name__ == "__main__":
    main()
