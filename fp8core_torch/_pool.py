"""A small caching allocator for the C kernel's CPU outputs.

torch's CPU allocator returns large blocks to the OS on free, so every fresh
multi-megabyte output is paid for again in page faults — measured here at ~12 ms
per 64 MiB, twice the time the fused kernel needs to quantize 16M float32
elements into memory that is already mapped. The FP8 layers create such
transient outputs on every step (Q(A) in forward, Q(grad_output) in backward), so
this module keeps the host buffers of freed outputs and hands them out again for
the next request of the same size, as the CUDA caching allocator does for GPU
memory.

Ownership is ordinary: a tensor from :func:`empty` owns its buffer for as long as
it (or any view of it) lives; the pool only reuses a buffer nobody references any
more (tracked by the reference count of the numpy array that backs it). Small
requests bypass the pool. At most :data:`MAX_IDLE_BYTES` of idle buffers are kept;
:func:`release` frees them all.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import torch

__all__ = ["empty", "release", "idle_bytes", "MAX_IDLE_BYTES", "MIN_POOLED_BYTES"]

#: Requests below this many bytes use torch.empty (the page-fault cost is small).
MIN_POOLED_BYTES = 1 << 20
#: Idle (unreferenced) buffers beyond this total are freed, oldest first.
MAX_IDLE_BYTES = 512 << 20

_ALIGN = 4096
_LOCK = threading.Lock()
_BUFS: list[np.ndarray] = []   # oldest first; each backs zero or more live tensors


def _ref_counts(bufs: list[np.ndarray]) -> list[int]:
    """Reference count of each buffer — the only place counts are taken, so that an
    idle buffer always shows the same count (list entry, loop variable, argument)."""
    return [sys.getrefcount(b) for b in bufs]


def _calibrate() -> int | None:
    """The count of an idle buffer. Verified, not assumed: a torch tensor (and a
    view of it) over the buffer must raise the count, and dropping them restore
    it; otherwise (an interpreter that counts differently) the pool is disabled
    rather than risk handing out memory in use."""
    bufs = [np.empty(8, np.uint8)]
    idle = _ref_counts(bufs)[0]
    t = torch.from_numpy(bufs[0]).view(torch.float16)[1:]
    busy = _ref_counts(bufs)[0]
    del t
    again = _ref_counts(bufs)[0]
    return idle if busy > idle and again == idle else None


_FREE_REFS = _calibrate()


def _idle_flags() -> list[bool]:
    return [c <= _FREE_REFS for c in _ref_counts(_BUFS)]


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat uninitialised CPU tensor of ``n`` elements of ``dtype``, reusing an idle
    pooled buffer of exactly that size when there is one."""
    nbytes = n * dtype.itemsize
    if nbytes < MIN_POOLED_BYTES or _FREE_REFS is None:
        return torch.empty(n, dtype=dtype)
    with _LOCK:
        index = next((i for i, idle in enumerate(_idle_flags()) if idle and _BUFS[i].nbytes == nbytes),
                     None)
        if index is None:
            found = _aligned(nbytes)
            _BUFS.append(found)
            _trim()
        else:  # most recently used last
            found = _BUFS.pop(index)
            _BUFS.append(found)
        return torch.from_numpy(found).view(dtype)


def _aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` of host memory starting on a page boundary. numpy's own arrays are
    only 16-byte aligned, and oneDNN's bfloat16 GEMMs read a 16-mod-64 operand
    ~1.6x slower than torch's 64-byte aligned allocations (measured)."""
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes]


def _trim() -> None:
    """Free the oldest idle buffers beyond MAX_IDLE_BYTES (the newest, just handed
    out, is not idle: the caller holds it)."""
    idle = [i for i, flag in enumerate(_idle_flags()) if flag]
    total = sum(_BUFS[i].nbytes for i in idle)
    drop = set()
    for i in idle:  # oldest first
        if total <= MAX_IDLE_BYTES:
            break
        drop.add(i)
        total -= _BUFS[i].nbytes
    _BUFS[:] = [b for i, b in enumerate(_BUFS) if i not in drop]


def idle_bytes() -> int:
    """Bytes held by idle pooled buffers."""
    with _LOCK:
        return sum(b.nbytes for b, idle in zip(_BUFS, _idle_flags()) if idle)


def release() -> None:
    """Free every idle pooled buffer (live tensors keep theirs)."""
    with _LOCK:
        _BUFS[:] = [b for b, idle in zip(_BUFS, _idle_flags()) if not idle]
