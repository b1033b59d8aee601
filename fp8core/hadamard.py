"""The 16-point random Hadamard transform (RHT) of the weight-gradient GEMM's operands
(docs/numerics.md §12).

TransformerEngine's NVFP4 recipe rotates both operands of the wgrad GEMM ``dW = dYᵀ·X``
along their contraction axis (the tokens) before quantizing them: each run of 16
consecutive tokens ``v`` becomes ``v·R`` with ``R = D·H₁₆/4`` — ``H₁₆`` the Sylvester
Hadamard matrix (``scipy.linalg.hadamard(16)``), ``D`` the diagonal of TE's fixed wgrad
sign vector :data:`SIGNS`. ``R`` is orthonormal, so ``(R·dY)ᵀ(R·X) = dYᵀ·X``: the product
is unchanged and only the quantization sees the rotated, outlier-spread values.

The float32 operation sequence (the same in every backend; TE's GPU kernels accumulate
the 16-term products in another order, so TE's bits are not reproduced — its matrix is):

1. ``u = s ⊙ v`` (exact sign flips) after flushing float32 subnormal inputs to ±0;
2. four butterfly stages ``h = 1, 2, 4, 8``: within each block of ``2h`` elements,
   ``(a, b) → (fl(a + b), fl(a − b))`` for the pairs ``(j, j + h)`` (the in-place fast
   Walsh–Hadamard transform, which yields ``H₁₆·u`` in Sylvester order); a result below
   2**−126 in magnitude is flushed to ±0 with its sign (sums of float32 values are exact
   there, so before- and after-rounding tininess agree);
3. ``y = fl(w · 0.25)`` — ±0 (the sign of ``w``) when ``|w| < 2**−124``, i.e. whenever
   the exact product is below 2**−126 (tininess before rounding).

The flushes are XLA:CPU's (and TPUs') denormals-are-zero / flush-to-zero arithmetic,
made explicit so numpy, torch (CPU and CUDA) and XLA on any device give the same bits;
they change only values below 1.2e-38. NaN and ±inf propagate as IEEE arithmetic says
(an inf in a run makes its outputs ±inf or NaN).

A run shorter than 16 (the token count not a multiple of 16) is padded with zero tokens:
:func:`padded_length`. The padded tokens are non-zero after the rotation and stay in
the GEMM (the rotation is orthonormal over the whole run), so ``dW`` is still exact.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIZE", "SIGNS", "TRANSFORMS", "check_transform", "check_shape", "padded_length",
           "sign_vector", "rht_matrix", "random_hadamard_transform"]

#: Points of the transform (TE's ``HADAMARD_DIMENSION``).
SIZE = 16
#: TransformerEngine's fixed sign vector of the wgrad RHT (``get_wgrad_sign_vector``).
SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
#: Values of ``LinearRecipe.wgrad_transform`` (``None``: no transform).
TRANSFORMS: tuple[str, ...] = ("rht16",)

_TINY = np.float32(2.0**-126)     # smallest normal float32
_TINY_BEFORE_QUARTER = np.float32(2.0**-124)


def check_transform(value, *, argname: str = "LinearRecipe.wgrad_transform") -> None:
    """ValueError unless ``value`` is None or one of :data:`TRANSFORMS`."""
    if value is not None and (not isinstance(value, str) or value not in TRANSFORMS):
        raise ValueError(f"{argname} must be None or one of {', '.join(TRANSFORMS)}, "
                         f"got {value!r}")


def padded_length(n: int) -> int:
    """Tokens after padding ``n`` to a whole number of runs of :data:`SIZE`."""
    return -(-int(n) // SIZE) * SIZE


def sign_vector() -> np.ndarray:
    """float32[16] of :data:`SIGNS`."""
    return np.asarray(SIGNS, np.float32)


def rht_matrix() -> np.ndarray:
    """float64 (16, 16) ``R = D·H₁₆/4`` (rows scaled by the signs), for oracles: ``v·R``."""
    h = np.array([[1.0]])
    while h.shape[0] < SIZE:
        h = np.block([[h, h], [h, -h]])
    return np.diag(np.asarray(SIGNS, np.float64)) @ h / 4.0


def _flush(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < _TINY, x * np.float32(0), x)


def random_hadamard_transform(x, *, axis: int = -1) -> np.ndarray:
    """float32 ``x`` rotated by ``R`` in runs of 16 along ``axis`` (its length must be a
    multiple of 16; see the module doc for the operation sequence)."""
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype.kind == "V"):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    ax = check_shape(x.shape, axis)
    n = x.shape[ax]
    u = np.moveaxis(x.astype(np.float32), ax, -1)
    with np.errstate(invalid="ignore", over="ignore"):   # inf - inf, inf * 0: IEEE's NaN
        return np.moveaxis(_rotate_last(u, n), -1, ax)


def _rotate_last(u: np.ndarray, n: int) -> np.ndarray:
    shape = u.shape
    u = _flush(u.reshape(-1, n // SIZE, SIZE)) * sign_vector()
    h = 1
    while h < SIZE:
        v = u.reshape(u.shape[0], u.shape[1], SIZE // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        u = _flush(np.stack([a + b, a - b], axis=-2)).reshape(u.shape)
        h *= 2
    u = np.where(np.abs(u) < _TINY_BEFORE_QUARTER, u * np.float32(0), u * np.float32(0.25))
    return u.reshape(shape)


def check_shape(shape: tuple[int, ...], axis) -> int:
    """The normalized ``axis`` of an input of ``shape`` to the transform (every backend's
    checks and messages): at least 1-D, its length along ``axis`` a multiple of 16."""
    if len(shape) == 0:
        raise ValueError("x must have at least one axis, got a 0-d array")
    ax = check_axis(len(shape), axis)
    if shape[ax] % SIZE:
        raise ValueError(f"x: the transform runs over {SIZE} elements along axis={axis}, "
                         f"so its length must be a multiple of {SIZE}, got {shape[ax]}")
    return ax


def check_axis(ndim: int, axis) -> int:
    """``axis`` normalized for an ``ndim``-d array (TypeError / ValueError naming it)."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}: {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a {ndim}-d array")
    return int(axis) % ndim
