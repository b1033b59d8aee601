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
requests bypass the pool. At most :data:`MAX_IDLE_BYTES` of idle buffers are kept:
the cap is enforced when a buffer is handed out *and* when its last tensor dies (a
finalizer on the per-handout memoryview), so buffers freed together — many
activations released at the end of a backward — never stay idle above it.
:func:`release` (``fp8core_torch.empty_cache()``) frees every idle buffer.

Limits and opt-out: a pooled output (≥ :data:`MIN_POOLED_BYTES`) lives in numpy
memory, so ``out.resize_(...)`` to a different number of bytes raises torch's
``RuntimeError: Trying to resize storage that is not resizable`` (resize a
``.clone()``; torch has already changed the tensor's sizes when it raises, so the
tensor is unusable afterwards). To switch the pool off, set ``fp8core_torch._pool.MIN_POOLED_BYTES``
above any output size (e.g. ``1 << 62``: every output is a plain, resizable
``torch.empty``) — or ``MAX_IDLE_BYTES = 0`` to keep no idle buffer; both are read
at every call. ``FP8CORE_KERNEL=0`` also bypasses it (only the C kernel's outputs
are pooled).
"""

from __future__ import annotations

import sys
import threading
import weakref

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
_PENDING = False               # a buffer went idle while the lock was held: trim on release


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
    t = _handout(bufs[0], torch.float16, notify=False)[1:]
    busy = _ref_counts(bufs)[0]
    del t
    again = _ref_counts(bufs)[0]
    return idle if busy > idle and again == idle else None


def _handout(buf: np.ndarray, dtype: torch.dtype, notify: bool = True) -> torch.Tensor:
    """A tensor over ``buf``. It holds ``buf`` through a memoryview of its own (so the
    reference count of ``buf`` rises while any tensor or view over it lives — numpy
    would collapse an ndarray view's base to the owner of the memory); a finalizer on
    that memoryview, which runs after the memoryview released ``buf``, re-applies the
    idle cap when the last tensor dies."""
    arr = np.frombuffer(memoryview(buf), np.uint8)
    if notify:  # arr.base: the memoryview numpy keeps (it holds buf until it dies)
        weakref.finalize(arr.base, _went_idle).atexit = False
    return torch.from_numpy(arr).view(dtype)


def _went_idle() -> None:
    global _PENDING
    if _LOCK.acquire(blocking=False):
        try:
            _trim()
        finally:
            _LOCK.release()
    else:  # freed inside a pool call (this thread or another): that call trims
        _PENDING = True


_FREE_REFS = _calibrate()


def _idle_flags() -> list[bool]:
    return [c <= _FREE_REFS for c in _ref_counts(_BUFS)]


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat uninitialised CPU tensor of ``n`` elements of ``dtype``, reusing an idle
    pooled buffer of exactly that size when there is one."""
    nbytes = n * dtype.itemsize
    if nbytes < MIN_POOLED_BYTES or _FREE_REFS is None:
        return torch.empty(n, dtype=dtype)
    global _PENDING
    with _LOCK:
        index = next((i for i, idle in enumerate(_idle_flags()) if idle and _BUFS[i].nbytes == nbytes),
                     None)
        if index is None:
            found = _aligned(nbytes)
            _BUFS.append(found)
        else:  # most recently used last
            found = _BUFS.pop(index)
            _BUFS.append(found)
        out = _handout(found, dtype)
        del found
        _PENDING = False
        _trim()
        return out


def _aligned(nbytes: int) -> np.ndarray:
    """``nbytes`` of host memory starting on a page boundary. numpy's own arrays are
    only 16-byte aligned, and oneDNN's bfloat16 GEMMs read a 16-mod-64 operand
    ~1.6x slower than torch's 64-byte aligned allocations (measured)."""
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes]


def _trim() -> None:
    """Free the oldest idle buffers beyond MAX_IDLE_BYTES (the newest, just handed
    out, is not idle: the caller holds it). Called with the lock held."""
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
