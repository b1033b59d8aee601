"""Argument checks and their messages, shared by the reference and both backends.

Backends pass plain Python values (dtype names as strings, shapes as tuples) so
that every implementation raises the same error with the same words.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

#: Input dtypes every quantizer accepts (float64 is rounded to float32 first).
FLOAT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


#: The error of a second derivative through an FP8 matmul or layer (torch: backward with
#: ``create_graph=True``; JAX: ``grad`` of ``grad``, ``hessian``), raised as RuntimeError.
DOUBLE_BACKWARD = (
    "fp8core: double backward (a second derivative through an FP8 matmul or layer: torch's "
    "create_graph=True, JAX's grad of grad / hessian) is not supported: the FP8 gradients are "
    "straight-through estimates whose own derivatives are not defined, and computing them "
    "would silently drop second-order terms. Take first derivatives only, or keep the layers "
    "whose second derivative you need in high precision (module_filter_fn of convert_to_fp8)."
)


def check_blocksize(blocksize: Any, *, argname: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool):
        raise TypeError(
            f"{argname} must be a positive int, got {type(blocksize).__name__}: {blocksize!r}"
        )
    if blocksize <= 0:
        raise ValueError(f"{argname} must be a positive int, got {blocksize}")


def check_float_dtype(dtype_name: str, *, argname: str = "x",
                      allowed: tuple[str, ...] = FLOAT_DTYPES) -> None:
    if dtype_name not in allowed:
        raise TypeError(
            f"{argname} must be a floating-point array of dtype {', '.join(allowed)}; "
            f"got dtype {dtype_name}"
        )


def check_codes_dtype(dtype_name: str, *, argname: str = "codes") -> None:
    if dtype_name != "uint8":
        raise TypeError(f"{argname} must have dtype uint8, got {dtype_name}")


def check_absmax(dtype_name: str, shape: tuple[int, ...], expected: tuple[int, ...], *,
                 argname: str = "absmax") -> None:
    if dtype_name != "float32":
        raise TypeError(f"{argname} must have dtype float32, got {dtype_name}")
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{argname} must have shape {tuple(expected)} for these codes and block size, "
            f"got {tuple(shape)}"
        )


def check_given_absmax(rule: Any, dtype_name: str, shape: tuple[int, ...]) -> None:
    """``quantize_operand(..., absmax=)`` (every backend): one float32 amax, 0-d or shaped
    like the ``(1, 1)`` absmax ``quantize_operand`` returns, for a ``tensor()`` rule only
    (docs/numerics.md §10.2)."""
    if rule.granularity.kind != "tensor":
        raise ValueError(f"absmax= gives the one amax of a tensor() rule, but the rule is "
                         f"{rule} ({rule.granularity} has one scale per group)")
    check_absmax(dtype_name, shape, tuple(shape) if tuple(shape) == (1, 1) else ())


def check_matmul_shapes(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    """A is (..., K) with at least one dim, B is (K, N)."""
    if len(a_shape) < 1:
        raise ValueError(f"A must have at least 1 dimension (..., K), got shape {tuple(a_shape)}")
    if len(b_shape) != 2:
        raise ValueError(f"B must be 2-D (K, N), got shape {tuple(b_shape)}")
    if a_shape[-1] != b_shape[0]:
        raise ValueError(
            f"A's last dim must equal B's first dim (K): A {tuple(a_shape)} @ B {tuple(b_shape)}"
        )


def check_features(value: Any, argname: str) -> int:
    """A layer's feature count as a Python int: any integer ``nn.Linear`` / ``nnx.Linear``
    accept (``int``, ``np.int64``, ``np.int32``, … — anything with ``__index__``), ≥ 0
    (0 gives an empty layer, as ``nn.Linear(0, n)``). Stricter than ``nn.Linear`` on
    one point: a bool is rejected (``nn.Linear(True, 3)`` silently means 1 feature).

    Raises:
      TypeError: ``value`` is a bool or not an integer (a float, a str, …).
      ValueError: ``value`` < 0.
    """
    allowed = "an int >= 0 (Python or NumPy integer, not bool)"
    is_bool = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool",
                                                                             "torch.bool")
    try:
        n = None if is_bool else operator.index(value)
    except TypeError:
        n = None
    if n is None:
        raise TypeError(f"{argname} must be {allowed}, got {type(value).__name__}: {value!r}")
    if n < 0:
        raise ValueError(f"{argname} must be {allowed}, got {n}")
    return n


def check_matmul_blocksize(bsz: Any, argname: str) -> None:
    """``bsz``/``bsz2`` of the matmul functions: -1 (automatic) or a positive int."""
    if isinstance(bsz, int) and not isinstance(bsz, bool) and bsz == -1:
        return
    check_blocksize(bsz, argname=argname)


def cached_hash(self) -> int:
    """``__hash__`` for frozen dataclasses used as cache keys and static arguments: the
    hash of the fields, computed once per object (recipes and codebooks are hashed on
    every quantizer call; their field trees are deep). Never pickled (see
    :func:`state_without_hash`): string hashes differ between processes."""
    h = self.__dict__.get("_hash")
    if h is None:
        h = hash((type(self).__qualname__,
                  *(getattr(self, f.name) for f in dataclasses.fields(self))))
        object.__setattr__(self, "_hash", h)
    return h


def state_without_hash(self) -> dict:
    """``__getstate__`` partner of :func:`cached_hash`."""
    return {k: v for k, v in self.__dict__.items() if k != "_hash"}
