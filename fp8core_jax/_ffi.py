"""fp8core's fused C quantizer as XLA custom calls (``jax.ffi``), CPU only.

Four calls: flat blocks / global (:func:`quantize`, :func:`dequantize`) and 2-D
tiles of a row-major matrix (:func:`quantize_tiles`, :func:`dequantize_tiles`),
each with a scale rule (``scale="fp32" | "pow2" | "pow2_torchao"`` or an MX rule). The handlers
(``fp8core/csrc/fp8q_xla.cc``) only unpack XLA buffers and call the C kernel the
torch backend uses (``fp8core._fp8q``), so every platform still runs the
contract's operation sequence and the results are the bits of
:mod:`fp8core.reference` (tested).

Where the handler library comes from (:func:`available`, decided once per process):

1. the installed copy, ``fp8core_jax/_fp8q_xla.so``, compiled by ``pip install``
   when jaxlib's FFI headers were present at build time (jaxlib is a build
   requirement), used when its stamp (``_fp8q_xla.so.json``) names the running
   jaxlib, the loaded C kernel's ABI and this module's FFI ABI, and the file's size
   and sha256 are the stamp's — the usual case: no compiler runs at all;
2. else a build in the cache (``$FP8CORE_CACHE``, else ``$XDG_CACHE_HOME/fp8core``,
   else ``~/.cache/fp8core``) keyed by the source, jaxlib, the compiler and both
   ABIs, checked the same way;
3. else it is compiled into the cache with ``$CXX`` (shell-split: ``ccache g++``
   works; else ``c++``/``g++``, a few seconds) — but never inside a jax trace: a
   call first made while tracing takes the XLA path for that trace and the build
   happens at the next call outside one. ``python -m fp8core_jax.build`` builds it
   explicitly (``--check`` reports what would be loaded; fp8core_jax/_build.py).

A library is never opened before its check passes (a truncated or garbage file
would kill the process); one that fails it is rebuilt when a compiler is there.
After loading, ``fp8q_xla_abi()`` must equal :data:`FFI_ABI_VERSION` and
``fp8q_xla_bind`` must accept the kernel's ABI. When anything is missing — the C
kernel, a usable library and a compiler, a writable cache, ``jax.ffi`` — or
``FP8CORE_KERNEL=0`` is set, :func:`available` is False and fp8core_jax uses its
XLA path (same bits, slower), warning once with the reason (not for
``FP8CORE_KERNEL=0``). ``python -m fp8core`` shows which path runs and why. On
other platforms (GPU, TPU) the XLA path is lowered instead
(``lax.platform_dependent``).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fp8core
from fp8core import _kernel
from fp8core.codebooks import Codebook
from fp8core_jax import _build

__all__ = ["available", "quantize", "dequantize", "quantize_tiles", "dequantize_tiles"]

#: The ABI of the handler library's exports this module binds (``fp8q_xla_abi()``).
FFI_ABI_VERSION = _build.FFI_ABI_VERSION
_LOCK = threading.Lock()
# "ok": bool, "why": str (when not ok), "lib": CDLL, "path": Path, "origin": "installed" | "cache"
_STATE: dict[str, object] = {}
_TARGETS = ("fp8q_xla_quantize", "fp8q_xla_dequantize", "fp8q_xla_quantize_tiles",
            "fp8q_xla_dequantize_tiles", "fp8q_xla_quantize_sr", "fp8q_xla_quantize_tiles_sr")
_ENTRIES = ("fp8q_quantize", "fp8q_dequantize", "fp8q_quantize_tiles", "fp8q_dequantize_tiles",
            "fp8q_quantize_sr", "fp8q_quantize_tiles_sr")


class _Deferred(Exception):
    """A build is needed but we are inside a jax trace."""


def _tracing() -> bool:
    """Whether a jax trace (jit, grad, vmap, ...) is active. Unknown (a jax without
    ``trace_state_clean``) counts as tracing, so no compiler ever runs in a trace."""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # pragma: no cover - other jax versions
        return True
    return not trace_state_clean()


def _open(path: Path) -> ctypes.CDLL:
    """dlopen a checked library, check its ABI, bind the kernel, register the targets."""
    lib = ctypes.CDLL(str(path))
    try:
        abi = lib.fp8q_xla_abi
    except AttributeError:
        raise RuntimeError(f"{path} has no fp8q_xla_abi (built from an older fp8q_xla.cc)") from None
    abi.restype = ctypes.c_int
    if abi() != FFI_ABI_VERSION:
        raise RuntimeError(f"{path} has FFI ABI {abi()}, fp8core_jax expects {FFI_ABI_VERSION}")
    lib.fp8q_xla_bind.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * len(_ENTRIES)
    lib.fp8q_xla_bind.restype = ctypes.c_int
    kernel_abi = int(_kernel._LIB.fp8q_abi_version())
    if lib.fp8q_xla_bind(kernel_abi, *(ctypes.cast(getattr(_kernel._LIB, e), ctypes.c_void_p)
                                       for e in _ENTRIES)) != 0:
        raise RuntimeError(f"{path} refused the C kernel's ABI {kernel_abi} (fp8q_xla_bind)")
    capsules = {name: jax.ffi.pycapsule(getattr(lib, name)) for name in _TARGETS}  # all, or none
    for name, capsule in capsules.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return lib


def _load(allow_build: bool) -> list[str]:
    """Find, check, open and register the handler library (module docstring); return
    the notes worth a warning even on success (a damaged file that was replaced).

    Raises:
        _Deferred: only a build would do and ``allow_build`` is False.
        RuntimeError: no library could be loaded (the message gives every reason).
    """
    if not hasattr(jax, "ffi"):
        raise RuntimeError(f"jax {jax.__version__} has no jax.ffi")
    if _kernel._LIB is None:
        raise RuntimeError("fp8core's C kernel (fp8core._fp8q) is not built (no C compiler at "
                           "install time, or a stale build): reinstall fp8core with a C compiler")
    want = _build.expected(_kernel.ABI_VERSION)
    reasons: list[str] = []
    damaged: list[str] = []
    candidates = [("installed", _build.installed_path())]
    candidates += [("cache", p) for p in _build.cached_candidates(_kernel.ABI_VERSION)]
    for origin, path in candidates:
        if origin == "installed" and not path.exists():
            reasons.append(f"no installed library {path} (not built at install time: no jaxlib "
                           f"headers or no C++ compiler then)")
            continue
        try:
            _build.check(path, want)
        except _build.CheckFailed as e:
            if path.exists():
                reasons.append(str(e))
                if e.integrity:
                    damaged.append(str(e))
            continue
        try:
            _STATE["lib"] = _open(path)
        except (OSError, RuntimeError, AttributeError) as e:
            reasons.append(f"{path} could not be loaded: {e}")
            damaged.append(reasons[-1])
            continue
        _STATE["path"], _STATE["origin"] = path, origin
        return damaged
    # nothing usable: build into the cache (never in a trace)
    try:
        cmd = _build.split_compiler()
    except _build.BuildError as e:
        raise RuntimeError("; ".join(reasons + [str(e)])) from None
    if not allow_build:
        raise _Deferred("; ".join(reasons))
    out = _build.cache_path(cmd, _kernel.ABI_VERSION)
    try:
        _build.compile_library(out, cmd)
        _build.check(out, want)
        _STATE["lib"] = _open(out)
    except (_build.BuildError, _build.CheckFailed, OSError, RuntimeError) as e:
        raise RuntimeError("; ".join(reasons + [f"building {out} failed: {e}"])) from None
    _STATE["path"], _STATE["origin"] = out, "cache (built now)"
    return [f"{d} — rebuilt as {out}" for d in damaged]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _resolve(allow_build: bool, quiet: bool = False) -> bool:
    """Decide once (under the lock) whether the custom calls are registered; a
    deferred build (a trace, or ``allow_build`` False) decides nothing."""
    with _LOCK:
        if "ok" in _STATE:
            return bool(_STATE["ok"])
        try:
            notes = _load(allow_build)
            _STATE["ok"] = True
            if notes and not quiet:
                _warn("fp8core_jax: " + "; ".join(notes))
        except _Deferred as e:
            _STATE["deferred"] = str(e)
            if not quiet and "deferred_warned" not in _STATE:
                _STATE["deferred_warned"] = True
                _warn(f"fp8core_jax: the FFI wrapper needs a build ({e}); fp8core never runs a "
                      f"compiler inside a jax trace, so this trace uses the XLA path (same "
                      f"results, slower) and the build happens at the next call outside a trace "
                      f"(or run `python -m fp8core_jax.build`)")
            return False
        except Exception as e:  # noqa: BLE001 - any failure: the XLA path, said once
            _STATE["ok"], _STATE["why"] = False, f"{type(e).__name__}: {e}"
            if not quiet:
                _warn(f"fp8core_jax: fused CPU kernel unavailable, using the XLA path "
                      f"(same results, slower): {_STATE['why']}")
        return bool(_STATE["ok"])


def available() -> bool:
    """Whether the custom calls can be used: the C kernel is built and enabled
    (``FP8CORE_KERNEL``) and the handler library is loaded — found, checked and
    registered on the first call, built into the cache if needed and not tracing
    (module docstring). Every failure is one RuntimeWarning and False."""
    if not _kernel.available():
        if _kernel._LIB is None and "kernel_warned" not in _STATE:
            _STATE["kernel_warned"] = True
            _warn(_kernel.not_built_warning("fp8core_jax", "the XLA path"))
        return False
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    tracing = _tracing()
    if tracing and "deferred" in _STATE:  # already looked: only a build (outside a trace) helps
        return False
    return _resolve(allow_build=not tracing)


def status() -> dict[str, object]:
    """Which path runs on CPU and why, for ``fp8core.info()``: ``active`` (bool),
    ``path`` and ``origin`` (installed / cache) of the handler library, ``reason``
    when inactive. Loads a usable library if none is yet, but never builds one (a
    needed build is reported as such) and never warns."""
    if not _kernel.available():
        why = ("fp8core's C kernel (fp8core._fp8q) is not built" if _kernel._LIB is None
               else "disabled by FP8CORE_KERNEL / fp8core._kernel.ENABLED")
        return {"active": False, "path": None, "origin": None, "reason": why}
    ok = _resolve(allow_build=False, quiet=True)
    if not ok and "ok" not in _STATE:
        return {"active": False, "path": None, "origin": None,
                "reason": f"not built yet — it will be compiled at the first call outside a jax "
                          f"trace, or run `python -m fp8core_jax.build` ({_STATE.get('deferred')})"}
    return {"active": ok, "path": str(_STATE["path"]) if _STATE.get("path") else None,
            "origin": _STATE.get("origin"), "reason": _STATE.get("why")}


def _nthreads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_NO_THRESHOLDS = np.zeros(0, np.float32)
_NO_MX_TABLE = np.zeros(0, np.int32)


def _scale_attrs(codebook: Codebook, scale: str = "fp32") -> dict:
    """The scale constants, the scale rule and its threshold table as attributes
    (read at trace time from ``_kernel._format``, as the ctypes binding does); an MX
    rule's byte table (``_kernel._mx_table``)."""
    f = _kernel._format(codebook)
    rule = _kernel.scale_rule_code(scale)
    thresholds = _kernel._pow2_thresholds() if rule == _kernel.SCALE_RULE_CODES["pow2_torchao"] \
        else _NO_THRESHOLDS
    return dict(m=np.float32(f.m), inv_m=np.float32(f.inv_m), floor=np.float32(f.floor_),
                ceiling=np.float32(f.ceiling), nthreads=np.int32(_nthreads()),
                scale_rule=np.int32(rule), pow2_thresholds=thresholds,
                mx_table=(_kernel._mx_table(codebook.name, scale) if scale.startswith("mx_")
                          else _NO_MX_TABLE))


def _round_attrs(codebook: Codebook) -> dict:
    f = _kernel._format(codebook)
    return dict(mant=np.int32(f.mant), emin=np.int32(f.emin), bits=np.int32(f.bits),
                negzero=np.int32(f.negzero), fill_code=np.int32(f.fill_code))


def _varying(*inputs) -> tuple[str, ...]:
    """The shard_map mesh axes the inputs vary over (none outside shard_map)."""
    mats = [getattr(jax.typeof(x), "manual_axis_type", None) for x in inputs]
    return tuple(sorted(frozenset().union(*(m.varying for m in mats if m is not None))))


def _like(outs, axes: tuple[str, ...]):
    """A custom call's outputs typed as varying over ``axes``: per device it is an
    elementwise-style op of its inputs, as XLA ops are (whose outputs shard_map types as
    varying), but ``ffi_call`` types its results as identical on every device, which
    shard_map's check rejects beside the XLA path's."""
    if not axes:
        return outs
    return tuple(None if o is None else jax.lax.pcast(o, axes, to="varying") for o in outs)


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
    vals, codes, absmax = _like(call(x.reshape(-1), group=np.int64(blocksize or 0),
                                     **_round_attrs(codebook), **_scale_attrs(codebook, scale)),
                                _varying(x))
    return (vals if out_dtype is not None else None, codes if want_codes else None,
            absmax if blocksize else absmax.reshape(()))


def dequantize(codes: jax.Array, absmax: jax.Array, codebook: Codebook, blocksize: int | None,
               dtype, *, scale: str = "fp32", table: jax.Array | None = None) -> jax.Array:
    """Flat ``fl(value[code] * dscale)`` in ``dtype`` (f32/f16/bf16), any codebook. CPU only.
    ``table``: the codebook's value table as an operand (default: a constant)."""
    call = jax.ffi.ffi_call("fp8q_xla_dequantize",
                            jax.ShapeDtypeStruct((codes.size,), dtype), vmap_method="sequential")
    table = jnp.asarray(_kernel._table(codebook)) if table is None else table
    y = call(codes.reshape(-1), absmax.reshape(-1).astype(jnp.float32), table,
             group=np.int64(blocksize or 0), **_scale_attrs(codebook, scale))
    return _like((y,), _varying(codes, absmax))[0]


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
    vals, codes, absmax = _like(call(x, tile_rows=np.int64(tile_rows), tile_cols=np.int64(tile_cols),
                                     **_round_attrs(codebook), **_scale_attrs(codebook, scale)),
                                _varying(x))
    return vals if out_dtype is not None else None, codes if want_codes else None, absmax


def dequantize_tiles(codes: jax.Array, absmax: jax.Array, codebook: Codebook, tile_rows: int,
                     tile_cols: int, dtype, *, scale: str = "fp32",
                     table: jax.Array | None = None) -> jax.Array:
    """``fl(value[code] * dscale)`` of 2-D ``codes`` with their absmax grid, in ``dtype``
    (f32/f16/bf16), shape ``codes.shape``; any codebook; ``table`` as :func:`dequantize`.
    CPU only."""
    if codes.ndim != 2:
        raise ValueError(f"dequantize_tiles: codes must be 2-D, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    grid = fp8core.plan_tiles(rows, cols, tile_rows, tile_cols).grid
    if tuple(absmax.shape) != grid:
        raise ValueError(f"dequantize_tiles: absmax must have the grid shape {grid}, got "
                         f"{tuple(absmax.shape)}")
    call = jax.ffi.ffi_call("fp8q_xla_dequantize_tiles",
                            jax.ShapeDtypeStruct((rows, cols), dtype), vmap_method="sequential")
    table = jnp.asarray(_kernel._table(codebook)) if table is None else table
    y = call(codes, absmax.astype(jnp.float32), table, tile_rows=np.int64(tile_rows),
             tile_cols=np.int64(tile_cols), **_scale_attrs(codebook, scale))
    return _like((y,), _varying(codes, absmax))[0]


def _keys(seed: jax.Array, stream: jax.Array) -> jax.Array:
    """``[seed, stream]`` as the uint32[2] operand of the stochastic custom calls (traced:
    a new stream reuses the compiled call)."""
    return jnp.stack([jnp.asarray(seed).astype(jnp.uint32).reshape(()),
                      jnp.asarray(stream).astype(jnp.uint32).reshape(())])


def quantize_sr(x: jax.Array, codebook: Codebook, blocksize: int | None, *, seed: jax.Array,
                stream: jax.Array, sr_bits: int, transposed: bool, scale: str = "fp32"
                ) -> tuple[jax.Array, jax.Array]:
    """Flat ``(uint8 codes, float32 absmax)`` of ``x`` (f32/f16/bf16, 2-D) with stochastic
    rounding (docs/numerics.md §14) through the kernel; ``blocksize=None`` is global (0-d
    absmax). ``transposed``: ``x`` is the transpose of the quantizer's input (element
    indices follow the input). CPU lowering only."""
    rows, cols = x.shape
    n = x.size
    nb = fp8core.plan_blocks(n, blocksize).n_blocks if blocksize else 1
    shapes = (jax.ShapeDtypeStruct((n,), jnp.uint8), jax.ShapeDtypeStruct((nb,), jnp.float32))
    call = jax.ffi.ffi_call("fp8q_xla_quantize_sr", shapes, vmap_method="sequential")
    codes, absmax = _like(call(x.reshape(-1), _keys(seed, stream), group=np.int64(blocksize or 0),
                               rows=np.int64(rows), cols=np.int64(cols),
                               transposed=np.int32(bool(transposed)), sr_bits=np.int32(sr_bits),
                               **_round_attrs(codebook), **_scale_attrs(codebook, scale)),
                          _varying(x, seed, stream))
    return codes, (absmax if blocksize else absmax.reshape(()))


def quantize_tiles_sr(x: jax.Array, codebook: Codebook, tile_rows: int, tile_cols: int, *,
                      seed: jax.Array, stream: jax.Array, sr_bits: int, transposed: bool = False,
                      scale: str = "fp32") -> tuple[jax.Array, jax.Array]:
    """``(uint8 codes (R, C), float32 absmax grid)`` of a 2-D row-major ``x`` in tiles with
    stochastic rounding (§14), as :func:`quantize_tiles` and :func:`quantize_sr`."""
    if x.ndim != 2:
        raise ValueError(f"quantize_tiles_sr: x must be 2-D, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    grid = fp8core.plan_tiles(rows, cols, tile_rows, tile_cols).grid
    shapes = (jax.ShapeDtypeStruct((rows, cols), jnp.uint8), jax.ShapeDtypeStruct(grid, jnp.float32))
    call = jax.ffi.ffi_call("fp8q_xla_quantize_tiles_sr", shapes, vmap_method="sequential")
    return _like(call(x, _keys(seed, stream), tile_rows=np.int64(tile_rows),
                      tile_cols=np.int64(tile_cols), transposed=np.int32(bool(transposed)),
                      sr_bits=np.int32(sr_bits), **_round_attrs(codebook),
                      **_scale_attrs(codebook, scale)),
                 _varying(x, seed, stream))
