"""The digits data set, its split and the batch schedule — numpy only, from a seed.

Everything a run consumes that is random (split, batches) comes from numpy
generators seeded here, never from torch or JAX RNGs, so both frameworks see the
same bytes in the same order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DigitsData", "load_digits_split", "batch_schedule"]


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """Standardized digits features (float32) and labels (int64)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def load_digits_split(seed: int, test_fraction: float = 0.2) -> DigitsData:
    """scikit-learn's bundled 8×8 digits (1797 samples, 64 features, 10 classes).

    The split is a permutation from ``np.random.default_rng([seed, 0])``; features
    are standardized with the training set's mean and standard deviation (computed
    in float64; constant pixels get std 1), then cast to float32.
    """
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    digits = load_digits()
    x = digits.data.astype(np.float64)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng([seed, 0]).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    xs = ((x - mean) / std).astype(np.float32)
    return DigitsData(xs[train], y[train], xs[test], y[test])


def batch_schedule(n_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` training indices: shuffled epochs, last partial batch dropped.

    Drawn from ``np.random.default_rng([seed, 1])`` (independent of the split's stream).

    Raises:
      ValueError: ``batch_size`` is not in [1, n_train] or ``steps`` < 0.
    """
    if not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size must be in [1, {n_train}], got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rng = np.random.default_rng([seed, 1])
    per_epoch = n_train // batch_size
    batches = []
    while len(batches) < steps:
        perm = rng.permutation(n_train)
        batches.extend(perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
    return np.asarray(batches[:steps], dtype=np.int64).reshape(steps, batch_size)
