"""Pin matmul numerics for the duration of a run (restoring the caller's settings after),
and whether this CPU has native bfloat16 GEMMs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["pinned_torch_numerics", "pinned_jax_numerics", "cpu_flags", "native_bf16_gemms"]

#: CPU flags that give native bfloat16 GEMMs (AVX512-BF16 dot products, AMX-BF16 tiles).
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The ``flags`` of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.lower().startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def native_bf16_gemms(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has native bfloat16 GEMMs (any of :data:`BF16_FLAGS`)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


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
