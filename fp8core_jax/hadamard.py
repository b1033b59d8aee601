"""The 16-point random Hadamard transform in XLA ops (docs/numerics.md §12; the
operation sequence is fp8core.hadamard's, its flushes explicit — XLA:CPU flushes
float32 subnormals itself, XLA:GPU does not, and both then give the reference's bits)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fp8core import hadamard as _h

__all__ = ["random_hadamard_transform"]

_TINY = np.float32(2.0**-126)
_TINY_BEFORE_QUARTER = np.float32(2.0**-124)


def _flush(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.abs(x) < _TINY, x * np.float32(0), x)


def _rotate_last(u: jax.Array) -> jax.Array:
    """float32 ``u (..., n)``, ``n % 16 == 0``: each run of 16 along the last axis rotated."""
    shape = u.shape
    u = _flush(u.reshape(-1, shape[-1] // _h.SIZE, _h.SIZE)) * _h.sign_vector()
    h = 1
    while h < _h.SIZE:
        v = u.reshape(u.shape[0], u.shape[1], _h.SIZE // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        u = _flush(jnp.stack([a + b, a - b], axis=-2)).reshape(u.shape)
        h *= 2
    u = jnp.where(jnp.abs(u) < _TINY_BEFORE_QUARTER, u * np.float32(0), u * np.float32(0.25))
    return u.reshape(shape)


def random_hadamard_transform(x: Any, *, axis: int = -1) -> jax.Array:
    """float32 ``x`` rotated in runs of 16 along ``axis`` (as :func:`fp8core.random_hadamard_transform`)."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {np.dtype(x.dtype).name}")
    ax = _h.check_shape(tuple(x.shape), axis)
    u = jnp.moveaxis(jnp.asarray(x).astype(jnp.float32), ax, -1)
    return jnp.moveaxis(_rotate_last(u), -1, ax)


def wgrad_rotated(m: jax.Array, dtype: Any) -> jax.Array:
    """fp8core.reference.wgrad_rotated: ``m (M, C)`` in ``dtype``, upcast, zero tokens up to a
    multiple of 16, rotated along the tokens (float32 ``(M', C)``)."""
    t = m.astype(dtype).astype(jnp.float32)
    pad = _h.padded_length(t.shape[0]) - t.shape[0]
    if pad:
        t = jnp.pad(t, ((0, pad), (0, 0)))
    return _rotate_last(t.T).T
