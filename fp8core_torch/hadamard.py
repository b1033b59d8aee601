"""The 16-point random Hadamard transform in torch ops (docs/numerics.md §12;
the operation sequence is fp8core.hadamard's, the flushes explicit, so CPU and CUDA
give the reference's bits)."""

from __future__ import annotations

from typing import Any

import torch

from fp8core import hadamard as _h
from fp8core_torch.config import dtype_name

__all__ = ["random_hadamard_transform"]

_SIGNS = torch.tensor(_h.SIGNS, dtype=torch.float32)
_TINY = 2.0**-126
_TINY_BEFORE_QUARTER = 2.0**-124


def _flush(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < _TINY, x * 0.0, x)


def _rotate_last(u: torch.Tensor) -> torch.Tensor:
    """float32 ``u (..., n)``, ``n % 16 == 0``: each run of 16 along the last axis rotated."""
    shape = u.shape
    u = _flush(u.reshape(-1, shape[-1] // _h.SIZE, _h.SIZE)) * _SIGNS.to(u.device)
    h = 1
    while h < _h.SIZE:
        v = u.reshape(u.shape[0], u.shape[1], _h.SIZE // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        u = _flush(torch.stack([a + b, a - b], dim=-2)).reshape(u.shape)
        h *= 2
    u = torch.where(u.abs() < _TINY_BEFORE_QUARTER, u * 0.0, u * 0.25)
    return u.reshape(shape)


def random_hadamard_transform(x: torch.Tensor, *, axis: int = -1) -> torch.Tensor:
    """float32 ``x`` rotated in runs of 16 along ``axis`` (as :func:`fp8core.random_hadamard_transform`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {dtype_name(x.dtype)}")
    ax = _h.check_shape(tuple(x.shape), axis)
    u = x.detach().to(torch.float32).movedim(ax, -1)
    return _rotate_last(u.contiguous()).movedim(-1, ax)


def wgrad_rotated(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8core.reference.wgrad_rotated: ``m (M, C)`` in ``dtype``, upcast, zero tokens up to a
    multiple of 16, rotated along the tokens; returned as the float32 ``(C, M')`` matrix
    (the contraction axis last, as the wgrad GEMM's quantizer takes it)."""
    t = m.to(dtype).to(torch.float32).t()
    pad = _h.padded_length(t.shape[1]) - t.shape[1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return _rotate_last(t.contiguous())
