"""The recipe study's data and configuration: a corpus every machine has, batches, sizes.

Framework-neutral (numpy only); the models live in :mod:`fp8core_experiments.gpt_torch`
and :mod:`fp8core_experiments.gpt_jax`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util

import numpy as np

__all__ = ["CORPUS_MODULES", "Corpus", "load_corpus", "GPTConfig", "train_batches",
           "val_batches"]

#: Standard-library modules whose source text is the corpus (fixed list, read from the
#: running interpreter: the sha256 printed with each run says which text it was).
CORPUS_MODULES: tuple[str, ...] = (
    "textwrap", "string", "heapq", "bisect", "fractions", "json.decoder", "json.encoder",
    "csv", "shlex", "difflib", "argparse", "dataclasses",
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Characters as int32 ids (``vocab`` = the sorted distinct characters), the
    90 % / 10 % train / validation split, and what the text was."""

    train: np.ndarray
    val: np.ndarray
    vocab: str
    sha256: str
    n_chars: int
    modules: tuple[str, ...]


def load_corpus(modules: tuple[str, ...] = CORPUS_MODULES) -> Corpus:
    """The concatenated sources of ``modules`` (UTF-8), character-encoded.

    Raises:
      ValueError: a module has no source file in this interpreter.
    """
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise ValueError(f"corpus module {name!r} has no Python source in this interpreter")
        with open(spec.origin, encoding="utf-8") as f:
            parts.append(f.read())
    text = "\n".join(parts)
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
    n_train = int(0.9 * ids.size)
    return Corpus(ids[:n_train], ids[n_train:], vocab,
                  hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text), tuple(modules))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model and training sizes shared by both frameworks."""

    vocab_size: int = 128
    context: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_blocks: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _windows(ids: np.ndarray, starts: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    idx = starts[..., None] + np.arange(context + 1)
    w = ids[idx]
    return w[..., :-1].astype(np.int32), w[..., 1:].astype(np.int32)


def train_batches(corpus: Corpus, cfg: GPTConfig, steps: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` int32 ``(steps, batch, context)``: random windows of the training text
    from ``np.random.default_rng([seed, 2])``; ``y`` is ``x`` shifted by one character."""
    rng = np.random.default_rng([seed, 2])
    starts = rng.integers(0, corpus.train.size - cfg.context - 1, size=(steps, cfg.batch_size))
    return _windows(corpus.train, starts, cfg.context)


def val_batches(corpus: Corpus, cfg: GPTConfig, n_batches: int = 4, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation windows ``(n_batches, batch, context)`` (``default_rng([seed, 3])``)."""
    rng = np.random.default_rng([seed, 3])
    starts = rng.integers(0, corpus.val.size - cfg.context - 1, size=(n_batches, cfg.batch_size))
    return _windows(corpus.val, starts, cfg.context)
