"""fp8core's fused C quantizer as XLA custom calls (``jax.ffi``), CPU only.

Four calls: flat blocks / global (:func:`quantize`, :func:`dequantize`) and 2-D
tiles of a row-major matrix (:func:`quantize_tiles`, :func:`dequantize_tiles`),
each with a scale rule (``scale="fp32" | "pow2" | "pow2_torchao"``). The handlers
(``fp8core/csrc/fp8q_xla.cc``) only unpack XLA buffers and call the
C kernel the torch backend uses (``fp8core._fp8q``, built at install time), so
every platform still runs the contract's operation sequence and the results are
the bits of :mod:`fp8core.reference` (tested). The handler file needs the XLA FFI
headers of the *installed* jaxlib, so it is compiled on first use with the
system C++ compiler (``$CXX``, else ``c++``; about two seconds) into a cache
directory (``$FP8CORE_CACHE``, else ``$XDG_CACHE_HOME/fp8core``, else
``~/.cache/fp8core``), keyed by the source and the jaxlib version.

When anything is missing — the C kernel, a compiler, ``jax.ffi`` — or
``FP8CORE_KERNEL=0`` is set, :func:`available` is False and fp8core_jax uses its
XLA path (same bits, slower), warning once with the reason. On other platforms
(GPU, TPU) the XLA path is lowered instead (``lax.platform_dependent``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fp8core
from fp8core import _kernel
from fp8core.codebooks import Codebook

__all__ = ["available", "quantize", "dequantize", "quantize_tiles", "dequantize_tiles"]

_SOURCE = Path(_kernel.__file__).resolve().parent / "csrc" / "fp8q_xla.cc"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}   # "ok": bool, "why": str, "lib": CDLL


def _cache_dir() -> Path:
    if os.environ.get("FP8CORE_CACHE"):
        return Path(os.environ["FP8CORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fp8core"


def _build() -> Path:
    """Compile the handlers once per (source, jaxlib) into the cache; return the .so path."""
    import jaxlib

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found ($CXX, c++ or g++)")
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + jaxlib.__version__.encode() + sys.platform.encode()).hexdigest()[:16]
    out = _cache_dir() / f"fp8q_xla-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-w", f"-I{jax.ffi.include_dir()}",
           str(_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent builder sees the old or the new file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    if not hasattr(jax, "ffi"):
        raise RuntimeError(f"jax {jax.__version__} has no jax.ffi")
    if _kernel._LIB is None:
        raise RuntimeError("fp8core's C kernel (fp8core._fp8q) is not built")
    lib = ctypes.CDLL(str(_build()))
    entries = ("fp8q_quantize", "fp8q_dequantize", "fp8q_quantize_tiles", "fp8q_dequantize_tiles")
    lib.fp8q_xla_bind.argtypes = [ctypes.c_void_p] * len(entries)
    lib.fp8q_xla_bind(*(ctypes.cast(getattr(_kernel._LIB, e), ctypes.c_void_p) for e in entries))
    for name in ("fp8q_xla_quantize", "fp8q_xla_dequantize", "fp8q_xla_quantize_tiles",
                 "fp8q_xla_dequantize_tiles"):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    _STATE["lib"] = lib


def available() -> bool:
    """Whether the custom calls can be used (builds and registers them on first call)."""
    if not _kernel.available():
        return False
    with _LOCK:
        if "ok" not in _STATE:
            try:
                _load()
                _STATE["ok"] = True
            except Exception as e:  # any failure: the XLA path, said once
                _STATE["ok"], _STATE["why"] = False, f"{type(e).__name__}: {e}"
                warnings.warn(f"fp8core_jax: fused CPU kernel unavailable, using the XLA path "
                              f"(same results, slower): {_STATE['why']}", RuntimeWarning, stacklevel=3)
    return bool(_STATE["ok"])


def _nthreads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_NO_THRESHOLDS = np.zeros(0, np.float32)


def _scale_attrs(codebook: Codebook, scale: str = "fp32") -> dict:
    """The scale constants, the scale rule and its threshold table as attributes
    (read at trace time from ``_kernel._format``, as the ctypes binding does)."""
    f = _kernel._format(codebook)
    rule = _kernel.scale_rule_code(scale)
    thresholds = _kernel._pow2_thresholds() if rule == _kernel.SCALE_RULE_CODES["pow2_torchao"] \
        else _NO_THRESHOLDS
    return dict(m=np.float32(f.m), inv_m=np.float32(f.inv_m), floor=np.float32(f.floor_),
                ceiling=np.float32(f.ceiling), nthreads=np.int32(_nthreads()),
                scale_rule=np.int32(rule), pow2_thresholds=thresholds)


def _round_attrs(codebook: Codebook) -> dict:
    f = _kernel._format(codebook)
    return dict(mant=np.int32(f.mant), emin=np.int32(f.emin), bits=np.int32(f.bits),
                negzero=np.int32(f.negzero), fill_code=np.int32(f.fill_code))


def quantize(x: jax.Array, codebook: Codebook, blocksize: int | None, *, out_dtype,
             want_codes: bool, scale: str = "fp32") -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """Flat ``(values or None, uint8 codes or None, float32 absmax)`` of ``x`` (f32/f16/bf16)
    through the kernel; ``blocksize=None`` is global (0-d absmax); ``scale`` is the scale
    rule (``"fp32"``, ``"pow2"``, ``"pow2_torchao"``). CPU lowering only."""
    n = x.size
    nb = fp8core.plan_blocks(n, blocksize).n_blocks if blocksize else 1
    shapes = (jax.ShapeDtypeStruct((n if out_dtype is not None else 0,), out_dtype or jnp.float32),
              jax.ShapeDtypeStruct((n if want_codes else 0,), jnp.uint8),
              jax.ShapeDtypeStruct((nb,), jnp.float32))
    call = jax.ffi.ffi_call("fp8q_xla_quantize", shapes, vmap_method="sequential")
    vals, codes, absmax = call(x.reshape(-1), group=np.int64(blocksize or 0), **_round_attrs(codebook),
                               **_scale_attrs(codebook, scale))
    return (vals if out_dtype is not None else None, codes if want_codes else None,
            absmax if blocksize else absmax.reshape(()))


def dequantize(codes: jax.Array, absmax: jax.Array, codebook: Codebook, blocksize: int | None,
               dtype, *, scale: str = "fp32") -> jax.Array:
    """Flat ``fl(value[code] * dscale)`` in ``dtype`` (f32/f16/bf16), any codebook. CPU only."""
    call = jax.ffi.ffi_call("fp8q_xla_dequantize",
                            jax.ShapeDtypeStruct((codes.size,), dtype), vmap_method="sequential")
    table = jnp.asarray(_kernel._table(codebook))
    return call(codes.reshape(-1), absmax.reshape(-1).astype(jnp.float32), table,
                group=np.int64(blocksize or 0), **_scale_attrs(codebook, scale))


def quantize_tiles(x: jax.Array, codebook: Codebook, tile_rows: int, tile_cols: int, *,
                   scale: str = "fp32", out_dtype, want_codes: bool
                   ) -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """``(values (R, C) or None, uint8 codes (R, C) or None, float32 absmax grid)`` of a 2-D
    row-major ``x`` (f32/f16/bf16) in ``tile_rows × tile_cols`` tiles through the kernel —
    the bits of :func:`fp8core.reference.quantize_tiles`. The grid is
    ``(ceil(R / tile_rows), ceil(C / tile_cols))``. CPU lowering only."""
    if x.ndim != 2:
        raise ValueError(f"quantize_tiles: x must be 2-D, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    grid = fp8core.plan_tiles(rows, cols, tile_rows, tile_cols).grid
    shapes = (jax.ShapeDtypeStruct((rows, cols) if out_dtype is not None else (0,), out_dtype or jnp.float32),
              jax.ShapeDtypeStruct((rows, cols) if want_codes else (0,), jnp.uint8),
              jax.ShapeDtypeStruct(grid, jnp.float32))
    call = jax.ffi.ffi_call("fp8q_xla_quantize_tiles", shapes, vmap_method="sequential")
    vals, codes, absmax = call(x, tile_rows=np.int64(tile_rows), tile_cols=np.int64(tile_cols),
                               **_round_attrs(codebook), **_scale_attrs(codebook, scale))
    return vals if out_dtype is not None else None, codes if want_codes else None, absmax


def dequantize_tiles(codes: jax.Array, absmax: jax.Array, codebook: Codebook, tile_rows: int,
                     tile_cols: int, dtype, *, scale: str = "fp32") -> jax.Array:
    """``fl(value[code] * dscale)`` of 2-D ``codes`` with their absmax grid, in ``dtype``
    (f32/f16/bf16), shape ``codes.shape``; any codebook. CPU only."""
    if codes.ndim != 2:
        raise ValueError(f"dequantize_tiles: codes must be 2-D, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    grid = fp8core.plan_tiles(rows, cols, tile_rows, tile_cols).grid
    if tuple(absmax.shape) != grid:
        raise ValueError(f"dequantize_tiles: absmax must have the grid shape {grid}, got "
                         f"{tuple(absmax.shape)}")
    call = jax.ffi.ffi_call("fp8q_xla_dequantize_tiles",
                            jax.ShapeDtypeStruct((rows, cols), dtype), vmap_method="sequential")
    table = jnp.asarray(_kernel._table(codebook))
    return call(codes, absmax.astype(jnp.float32), table, tile_rows=np.int64(tile_rows),
                tile_cols=np.int64(tile_cols), **_scale_attrs(codebook, scale))
