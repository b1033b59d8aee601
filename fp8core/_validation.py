"""Argument checks and their messages, shared by the reference and both backends.

Backends pass plain Python values (dtype names as strings, shapes as tuples) so
that every implementation raises the same error with the same words.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Input dtypes every quantizer accepts (float64 is rounded to float32 first).
FLOAT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


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


def check_features(value: Any, argname: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{argname} must be an int >= 1, got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"{argname} must be an int >= 1, got {value}")


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
