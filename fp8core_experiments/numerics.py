"""Pin matmul numerics for the duration of a run, restoring the caller's settings after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["pinned_torch_numerics", "pinned_jax_numerics"]


@contextlib.contextmanager
def pinned_torch_numerics() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN, float32 matmul precision "highest".

    (No effect on CPU results today; pinned so a GPU run computes the same math.)
    Previous values are restored on exit, even on error.
    """
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.set_float32_matmul_precision(saved[2])


@contextlib.contextmanager
def pinned_jax_numerics() -> Iterator[None]:
    """``jax.default_matmul_precision("highest")`` (full float32 dots) as a scoped config.

    JAX's context manager is thread-local and restored on exit; functions traced
    (jitted) inside the block keep the setting.
    """
    import jax

    with jax.default_matmul_precision("highest"):
        yield
