"""The recipe study's character-level GPT in PyTorch: model, initial weights, training."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fp8core_experiments.char_gpt import GPTConfig
from fp8core_experiments.numerics import pinned_torch_numerics

__all__ = ["GPT", "LinearBF16", "initial_state_dict", "build_model", "train"]


class LinearBF16(nn.Linear):
    """``nn.Linear`` whose GEMM operands are rounded to bfloat16 (round to nearest even)
    and multiplied with float32 accumulation; the output and gradients stay float32
    except that the casts round the operand gradients to bfloat16 (autograd of a cast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16).float(), self.weight.to(torch.bfloat16).float(),
                        self.bias)


class Block(nn.Module):
    """Pre-norm causal self-attention + GELU(tanh) MLP; linears ``qkv, proj, fc, out``."""

    def __init__(self, cfg: GPTConfig, linear: type):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(d, eps=1e-5)
        self.qkv = linear(d, 3 * d)
        self.proj = linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=1e-5)
        self.fc = linear(d, 4 * d)
        self.out = linear(4 * d, d)
        self.register_buffer("mask", torch.tril(torch.ones(cfg.context, cfg.context, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h, hd = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, h, hd).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token + position embeddings, ``n_blocks`` blocks (``h0``, ``h1``, …), final norm,
    high-precision ``head``."""

    def __init__(self, cfg: GPTConfig, linear: type = nn.Linear):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        for i in range(cfg.n_blocks):
            setattr(self, f"h{i}", Block(cfg, linear))
        self.n_blocks = cfg.n_blocks
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for i in range(self.n_blocks):
            x = getattr(self, f"h{i}")(x)
        return self.head(self.ln_f(x))


def initial_state_dict(cfg: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """float32 numpy weights of a fresh :class:`GPT` (torch's default inits, embeddings
    scaled by 0.1) under ``torch.manual_seed(seed)``; the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(cfg)
        with torch.no_grad():
            model.tok.weight.mul_(0.1)
            model.pos.weight.mul_(0.1)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _not_head(module: nn.Module, fqn: str) -> bool:
    return fqn != "head"


def build_model(recipe: str, cfg: GPTConfig, init: dict[str, np.ndarray]) -> GPT:
    """A :class:`GPT` holding ``init``: ``"fp32"``, ``"bf16"`` (:class:`LinearBF16` blocks)
    or an FP8 recipe (``fp8core_torch.convert_to_fp8(model, recipe=…)``, head excluded)."""
    with torch.random.fork_rng(devices=[]):
        model = GPT(cfg, LinearBF16 if recipe == "bf16" else nn.Linear)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in init.items()})
    if recipe not in ("fp32", "bf16"):
        import fp8core_torch

        fp8core_torch.convert_to_fp8(model, recipe=recipe, module_filter_fn=_not_head)
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(recipe: str, cfg: GPTConfig, init, batches, val, *, eval_every: int,
          stats_every: int, progress: bool = True) -> dict:
    """AdamW (``torch.optim.AdamW``, ``foreach=False``) on ``batches`` ``(x, y)``; returns
    ``rows`` (step, train_loss, val_loss or None, seconds), ``records`` (stats on
    ``stats_every`` steps and the last) and ``stats_seconds``."""
    from fp8core_torch.stats import collect_stats

    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny GEMMs; reduction order independent of the core count
    try:
        with pinned_torch_numerics():
            model = build_model(recipe, cfg, init)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                    weight_decay=cfg.weight_decay, foreach=False)
            xs, ys = (torch.from_numpy(a) for a in batches)
            vx, vy = (torch.from_numpy(a) for a in val)
            steps = xs.shape[0]
            rows, records, stats_seconds = [], [], 0.0
            for step in tqdm(range(1, steps + 1), desc=f"torch {recipe}", disable=not progress,
                             leave=False):
                want = recipe not in ("fp32", "bf16") and _is_stats_step(step, steps, stats_every)
                t0 = time.perf_counter()
                with collect_stats(model, step=step, enabled=want) as recs:
                    loss = _loss(model, xs[step - 1].long(), ys[step - 1].long())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                t1 = time.perf_counter()
                opt.step()
                seconds = time.perf_counter() - t0
                if want:
                    stats_seconds += t1 - t0
                records.extend(recs)
                row = {"step": step, "train_loss": float(loss.detach()), "val_loss": None,
                       "seconds": seconds, "stats": want}
                if step % eval_every == 0 or step == steps:
                    with torch.no_grad():
                        row["val_loss"] = float(np.mean([float(_loss(model, vx[i].long(), vy[i].long()))
                                                         for i in range(vx.shape[0])]))
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "records": records}


def _is_stats_step(step: int, steps: int, every: int) -> bool:
    return step == steps or (every > 0 and step % every == 0)
