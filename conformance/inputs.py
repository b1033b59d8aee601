"""Input generation: numpy only, float32 from a seed, then cast to the case dtype."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np

import fp8core

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}


def rng_for(seed: int, *labels: str) -> np.random.Generator:
    """A generator that depends on the seed and on what it is for (stable across runs)."""
    salt = zlib.crc32("/".join(labels).encode())
    return np.random.default_rng([seed, salt])


def draw(distribution: str, shape: tuple[int, ...], dtype: str, seed: int,
         codebook: str = "float8_e4m3fn", blocksize: int | None = None, label: str = "x") -> np.ndarray:
    """Draw an input of ``shape`` from ``distribution`` and cast it to ``dtype``."""
    rng = rng_for(seed, label, distribution, str(shape), dtype, codebook)
    n = int(np.prod(shape, dtype=np.int64))
    group = blocksize or max(n, 1)
    if distribution == "normal":
        x = rng.standard_normal(n)
    elif distribution == "uniform":
        x = rng.uniform(-3, 3, n)
    elif distribution == "heavy_tailed":
        x = rng.standard_t(1.5, n) * 10.0 ** rng.integers(-2, 3, n)
    elif distribution == "midpoints":
        x = _midpoints(rng, n, group, fp8core.resolve_codebook(codebook))
    elif distribution == "zero_blocks":
        x = rng.standard_normal(n)
        x[: min(group, n)] = 0.0
        x[-min(group, n) // 2:] = 0.0
    elif distribution == "nan_block":
        x = rng.standard_normal(n)
        x[rng.integers(0, max(n, 1), 2) % max(n, 1)] = np.nan
    elif distribution == "inf_block":
        x = rng.standard_normal(n)
        if n:
            x[rng.integers(0, n)] = np.inf
            x[rng.integers(0, n)] = -np.inf
    elif distribution == "tiny":
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-45, -30, n)  # float32 subnormals included
    elif distribution == "huge":
        x = rng.uniform(-1, 1, n) * 3.4e38
    elif distribution == "negative_zero":
        x = rng.standard_normal(n)
        x[rng.random(n) < 0.3] = -0.0
    elif distribution == "fp16_max":
        x = rng.choice([65504.0, -65504.0, 65472.0, 32768.0, 1.0, -0.5], n)
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    with np.errstate(over="ignore"):  # "huge" overflows float16 to ±inf on purpose
        return x.astype(np.float32).reshape(shape).astype(NP_DTYPES[dtype])


def _midpoints(rng, n, group, cb) -> np.ndarray:
    """Exact midpoints between neighbouring codebook values (and their float32
    neighbours), each group holding ±M·2**k so its scale is exactly 2**k."""
    v = np.unique(cb.values[cb.finite]).astype(np.float64)
    mids = (v[:-1] + v[1:]) / 2
    probes = np.concatenate([mids, np.nextafter(mids.astype(np.float32), np.float32(np.inf)),
                             np.nextafter(mids.astype(np.float32), np.float32(-np.inf))])
    x = rng.choice(probes, n).astype(np.float64)
    scale = 2.0 ** rng.integers(-4, 5)
    x[::group] = float(cb.max) * np.where(rng.random(x[::group].size) < 0.5, 1, -1)
    return np.clip(x, -float(cb.max), float(cb.max)) * scale
