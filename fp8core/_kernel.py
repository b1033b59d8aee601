"""ctypes binding of fp8core's fused C quantizer (``fp8core/csrc/fp8q.c``).

The kernel implements docs/numerics.md §3–§4 for native (ml_dtypes) codebooks on
host memory: one pass per block (the block's absmax is taken while the block is
in cache, then it is scaled, saturated, rounded half to even and written as codes
and/or dequantized values), two passes for global quantization, on POSIX threads
or an OpenMP team. 2-D tiles of a row-major matrix (:func:`quantize_tiles`: rows,
1×B blocks, B×B tiles, columns, column blocks), every scale rule of §9.2
(``scale="fp32" | "pow2" | "pow2_torchao"``) and the MX rules of §11
(``"mx_floor" | "mx_ceil" | "mx_even" | "mx_rceil"``: the e8m0 byte from the absmax bits
in :func:`fp8core.mx.binade_table`, passed to the kernel) are supported by every entry point.
Stochastic rounding (docs/numerics.md §14: :func:`quantize_sr`, :func:`quantize_tiles_sr` and
``call("quantize_given_sr", ...)``) computes fp8core.random's generator in the element loop.
It is built at install time when a C compiler is present (``pip install``; the
extension is optional) and is used by the torch backend on CPU tensors. Table
codebooks, other devices, and installs without the extension use each backend's
own path, which gives the same bits (tests compare every path with the reference).

The functions here take raw addresses and sizes, so that any framework (or numpy)
can call them without a copy; they never import torch or jax. Set the environment
variable ``FP8CORE_KERNEL=0`` (or ``false``/``no``/``off``; any other spelling but
``1/true/yes/on`` raises ValueError, :func:`fp8core._env.flag`) before import to disable
the kernel (for debugging or to compare paths); :data:`ENABLED` can also be toggled at
run time. ``python -m fp8core`` says whether the kernel is built and which path runs.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import numpy as np

from fp8core import _env
from fp8core.codebooks import Codebook

__all__ = ["available", "supports", "quantize", "dequantize", "quantize_tiles",
           "dequantize_tiles", "quantize_sr", "quantize_tiles_sr", "sr_args", "call", "cast",
           "DTYPE_CODES", "SCALE_RULE_CODES"]

#: The ABI this binding was written for (``fp8q_abi_version()`` in the C file).
ABI_VERSION = 6
#: dtype name -> the kernel's dtype code.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
#: scale rule (fp8core.recipe.SCALE_RULES) -> ``fp8q_format.scale_rule``.
SCALE_RULE_CODES = {"fp32": 0, "pow2": 1, "pow2_torchao": 2,
                    "mx_floor": 3, "mx_ceil": 4, "mx_even": 5, "mx_rceil": 6}


class _Format(ctypes.Structure):
    """``fp8q_format`` in fp8q.c: per-codebook constants and the scale rule
    (``pow2_thresholds``: the address of ``fp8core.recipe.pow2_torchao_thresholds()``;
    ``mx_table``: that of :func:`_mx_table`)."""

    _fields_ = [
        ("m", ctypes.c_float),
        ("inv_m", ctypes.c_float),
        ("floor_", ctypes.c_float),
        ("ceiling", ctypes.c_float),
        ("mant", ctypes.c_int32),
        ("emin", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("negzero", ctypes.c_int32),
        ("fill_code", ctypes.c_int32),
        ("scale_rule", ctypes.c_int32),
        ("pow2_thresholds", ctypes.c_void_p),
        ("mx_table", ctypes.c_void_p),
    ]


class _SR(ctypes.Structure):
    """``fp8q_sr`` in fp8q.c: one stochastically rounded call (docs/numerics.md §14) —
    ``seed``, ``stream`` (uint32), ``sr_bits`` and the element-index mapping: the array the
    kernel is given is row-major ``(rows, cols)``, its element ``p`` has the index
    ``(p % cols) * rows + p // cols`` in the quantizer's input when ``transposed`` (the
    kernel holds the input's transpose), else ``p``."""

    _fields_ = [
        ("seed", ctypes.c_uint32),
        ("stream", ctypes.c_uint32),
        ("sr_bits", ctypes.c_int32),
        ("transposed", ctypes.c_int32),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
    ]


def sr_args(seed: int, stream: int, sr_bits: int, rows: int, cols: int,
            transposed: bool) -> _SR:
    """The ``fp8q_sr`` of a call (pass ``ctypes.byref`` of it): ``seed``, ``stream`` ints in
    ``[0, 2**32)`` (already validated), ``(rows, cols)`` the row-major array the kernel is
    given, ``transposed`` whether it is the transpose of the quantizer's input."""
    return _SR(seed, stream, sr_bits, int(bool(transposed)), rows, cols)


def _load() -> ctypes.CDLL | None:
    try:
        from fp8core import _fp8q  # the compiled extension (optional at install)
    except ImportError:
        return None
    lib = ctypes.CDLL(_fp8q.__file__)
    if lib.fp8q_abi_version() != ABI_VERSION:  # a stale build: do not guess the layout
        warnings.warn(f"fp8core: the compiled kernel {_fp8q.__file__} is from another version "
                      f"(ABI {lib.fp8q_abi_version()}, expected {ABI_VERSION}); rebuild it with "
                      f"`pip install -e .` — using the framework paths (same results, slower)",
                      RuntimeWarning, stacklevel=2)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fp8q_quantize.argtypes = [p, i32, i64, i64, ctypes.POINTER(_Format), p, p, i32, p, i32, i32]
    lib.fp8q_quantize.restype = i32
    lib.fp8q_quantize_given.argtypes = [p, i32, i64, ctypes.POINTER(_Format), p, p, i32, p, i32,
                                        i32]
    lib.fp8q_quantize_given.restype = i32
    lib.fp8q_dequantize.argtypes = [p, i64, i64, p, p, ctypes.POINTER(_Format), p, i32, i32, i32]
    lib.fp8q_dequantize.restype = i32
    lib.fp8q_quantize_tiles.argtypes = [p, i32, i64, i64, i64, i64, ctypes.POINTER(_Format), p, p,
                                        i32, p, i32, i32]
    lib.fp8q_quantize_tiles.restype = i32
    lib.fp8q_dequantize_tiles.argtypes = [p, i64, i64, i64, i64, p, p, ctypes.POINTER(_Format), p,
                                          i32, i32, i32]
    lib.fp8q_dequantize_tiles.restype = i32
    sr = ctypes.POINTER(_SR)
    lib.fp8q_quantize_sr.argtypes = [p, i32, i64, i64, ctypes.POINTER(_Format), sr, p, p, i32,
                                     i32]
    lib.fp8q_quantize_sr.restype = i32
    lib.fp8q_quantize_given_sr.argtypes = [p, i32, i64, ctypes.POINTER(_Format), sr, p, p, i32,
                                           i32]
    lib.fp8q_quantize_given_sr.restype = i32
    lib.fp8q_quantize_tiles_sr.argtypes = [p, i32, i64, i64, i64, i64, ctypes.POINTER(_Format),
                                           sr, p, p, i32, i32]
    lib.fp8q_quantize_tiles_sr.restype = i32
    lib.fp8q_cast.argtypes = [p, i32, p, i32, i64]
    lib.fp8q_cast.restype = i32
    return lib


_LIB = _load()
_ENTRIES = {} if _LIB is None else {
    e: getattr(_LIB, f"fp8q_{e}") for e in ("quantize", "quantize_given", "dequantize",
                                            "quantize_tiles", "dequantize_tiles", "quantize_sr",
                                            "quantize_given_sr", "quantize_tiles_sr")}
#: Whether callers should use the kernel (only meaningful when :func:`available`).
ENABLED: bool = _env.flag("FP8CORE_KERNEL", True)


def available() -> bool:
    """True when the compiled kernel is loaded and enabled."""
    return _LIB is not None and ENABLED


def not_built_warning(backend: str, path: str) -> str:
    """The one warning a backend gives (once) when it would use the kernel but it is not
    built: ``backend`` names it (``"fp8core_torch"``), ``path`` the path it takes instead."""
    return (f"{backend}: fp8core's C kernel (fp8core._fp8q) is not built, using {path} (same "
            f"results, slower); reinstall fp8core with a C compiler for the fused path "
            f"(`python -m fp8core` shows what runs)")


def supports(codebook: Codebook) -> bool:
    """The kernel rounds native codebooks of at most 8 bits (tables are searched elsewhere)."""
    fmt = codebook.format
    return fmt is not None and fmt.total_bits <= 8 and fmt.signed


@functools.lru_cache(maxsize=None)
def _format(codebook: Codebook) -> _Format:
    fmt = codebook.format
    scales = dict(m=float(codebook.max), inv_m=float(codebook.inv_max),
                  floor_=float(codebook.scale_floor), ceiling=float(codebook.scale_ceiling),
                  fill_code=int(codebook.fill_code))
    if fmt is None:  # a table: only the scales are used (dequantize)
        return _Format(**scales)
    return _Format(mant=int(fmt.mantissa_bits), emin=int(np.log2(fmt.smallest_normal)),
                   bits=int(fmt.total_bits), negzero=int(fmt.has_negative_zero), **scales)


@functools.lru_cache(maxsize=None)
def _table(codebook: Codebook) -> np.ndarray:
    return np.ascontiguousarray(codebook.values256, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _pow2_thresholds() -> np.ndarray:
    from fp8core.recipe import pow2_torchao_thresholds  # numpy only; cached, never freed

    return np.ascontiguousarray(pow2_torchao_thresholds(), dtype=np.float32)


#: Every non-zero value of every MX element format is at least this (e5m2's smallest
#: subnormal): fp8q.c's mx_scales relies on it to choose the float32 loops.
_MX_SMALLEST_VALUE = 2.0 ** -16


@functools.lru_cache(maxsize=None)
def _mx_table(format_name: str, scale: str) -> np.ndarray:
    """int32[1024]: :func:`fp8core.mx.binade_table` of an MX element format and rule
    (``base``, ``step``, ``qexp``, ``dexp`` one after the other), as ``fp8q_format.mx_table``
    (and the FFI wrapper's ``mx_table`` attribute) take it. Cached, never freed."""
    from fp8core import mx
    from fp8core.codebooks import resolve_codebook

    cb = resolve_codebook(format_name)
    t = np.ascontiguousarray(np.concatenate(mx.binade_table(cb.name, mx.mode_of(scale))),
                             dtype=np.int32)
    tiny = np.abs(cb.values[np.isfinite(cb.values) & (cb.values != 0)]).min()
    if tiny < _MX_SMALLEST_VALUE:   # pragma: no cover - a new MX format would need fp8q.c's bounds
        raise AssertionError(f"{format_name}: a value below 2**-16 breaks fp8q.c's mx_scales")
    t.setflags(write=False)
    return t


def scale_rule_code(scale: str) -> int:
    """The kernel's code of a scale rule (raises ValueError for an unknown one)."""
    try:
        return SCALE_RULE_CODES[scale]
    except (KeyError, TypeError):
        raise ValueError(f"scale must be one of {', '.join(SCALE_RULE_CODES)}, got {scale!r}") from None


def _format_for(codebook: Codebook, scale: str) -> _Format:
    """:func:`_format` with the scale rule set. ``_format`` is looked up at every call (so
    that tests can replace it), the struct is built once per (``_format``, codebook, rule)."""
    return _format_scaled(_format, codebook, scale)


@functools.lru_cache(maxsize=None)
def _format_scaled(format_fn, codebook: Codebook, scale: str) -> _Format:
    f = format_fn(codebook)
    rule = scale_rule_code(scale)
    if rule == 0:
        return f
    g = _Format.from_buffer_copy(f)
    g.scale_rule = rule
    g.pow2_thresholds = _pow2_thresholds().ctypes.data
    if scale.startswith("mx_"):              # (ValueError for a format MX does not define)
        g.mx_table = _mx_table(codebook.name, scale).ctypes.data
    return g


def quantize(x_ptr: int, in_dtype: str, n: int, group: int, codebook: Codebook, *,
             codes_ptr: int | None, vals_ptr: int | None, out_dtype: str,
             absmax_ptr: int, nthreads: int, openmp: bool = False, scale: str = "fp32") -> None:
    """Quantize ``n`` contiguous elements at ``x_ptr`` in groups of ``group``.

    ``group >= n`` is global quantization (one absmax). Writes
    ``ceil(n / group)`` float32 absmax values, and ``n`` uint8 codes and/or ``n``
    values of ``out_dtype`` where the pointers are given (``None``: not written).
    ``openmp``: split the work over an OpenMP team (for callers whose own thread
    pool is OpenMP, i.e. torch) instead of POSIX threads. ``scale``: the scale rule
    (``"fp32"``, ``"pow2"``, ``"pow2_torchao"``; docs/numerics.md §9.2).
    The caller guarantees sizes, contiguity and a codebook with :func:`supports`.
    """
    rc = _LIB.fp8q_quantize(x_ptr, DTYPE_CODES[in_dtype], n, group,
                            ctypes.byref(_format_for(codebook, scale)), codes_ptr, vals_ptr,
                            DTYPE_CODES[out_dtype], absmax_ptr, nthreads, int(openmp))
    if rc:
        raise ValueError(f"fp8q_quantize rejected its arguments (n={n}, group={group}, "
                         f"in_dtype={in_dtype}, out_dtype={out_dtype}, codebook={codebook.name})")


def dequantize(codes_ptr: int, n: int, group: int, absmax_ptr: int, codebook: Codebook, *,
               vals_ptr: int, out_dtype: str, nthreads: int, openmp: bool = False,
               scale: str = "fp32") -> None:
    """``vals = fl(value[code] * dscale)`` for ``n`` codes in groups of ``group``, cast to ``out_dtype``.

    Any codebook (the value table is passed), including tables; ``scale`` as :func:`quantize`.
    """
    table = _table(codebook)
    rc = _LIB.fp8q_dequantize(codes_ptr, n, group, absmax_ptr, table.ctypes.data,
                              ctypes.byref(_format_for(codebook, scale)), vals_ptr,
                              DTYPE_CODES[out_dtype], nthreads, int(openmp))
    if rc:
        raise ValueError(f"fp8q_dequantize rejected its arguments (n={n}, group={group})")


def quantize_tiles(x_ptr: int, in_dtype: str, rows: int, cols: int, tile_rows: int, tile_cols: int,
                   codebook: Codebook, *, scale: str = "fp32", codes_ptr: int | None,
                   vals_ptr: int | None, out_dtype: str, absmax_ptr: int, nthreads: int,
                   openmp: bool = False) -> None:
    """Quantize a row-major contiguous ``(rows, cols)`` matrix in ``tile_rows × tile_cols`` tiles.

    The bits of :func:`fp8core.reference.quantize_tiles` (and its dequantized values).
    Writes the float32 absmax grid ``(ceil(rows / tile_rows), ceil(cols / tile_cols))``
    (row-major) at ``absmax_ptr``, and ``rows * cols`` uint8 codes and/or values of
    ``out_dtype`` in ``x``'s layout where the pointers are given. Edge tiles may be
    partial. ``(1, cols)`` is one group per row, ``(rows, 1)`` one per column (done as
    row sweeps with per-column maxima and scales, never column by column),
    ``(rows, cols)`` is global. ``scale``, ``openmp``, ``nthreads`` as :func:`quantize`;
    the caller guarantees sizes, contiguity and a codebook with :func:`supports`.
    """
    rc = _LIB.fp8q_quantize_tiles(x_ptr, DTYPE_CODES[in_dtype], rows, cols, tile_rows, tile_cols,
                                  ctypes.byref(_format_for(codebook, scale)), codes_ptr, vals_ptr,
                                  DTYPE_CODES[out_dtype], absmax_ptr, nthreads, int(openmp))
    if rc:
        raise ValueError(f"fp8q_quantize_tiles rejected its arguments (shape=({rows}, {cols}), "
                         f"tile=({tile_rows}, {tile_cols}), in_dtype={in_dtype}, "
                         f"out_dtype={out_dtype}, codebook={codebook.name})")


def dequantize_tiles(codes_ptr: int, rows: int, cols: int, tile_rows: int, tile_cols: int,
                     absmax_ptr: int, codebook: Codebook, *, scale: str = "fp32", vals_ptr: int,
                     out_dtype: str, nthreads: int, openmp: bool = False) -> None:
    """Inverse of :func:`quantize_tiles`: ``fl(value[code] * dscale)`` of a row-major
    ``(rows, cols)`` uint8 matrix with its absmax grid, cast once to ``out_dtype``; the
    bits of :func:`fp8core.reference.dequantize_tiles`. Any codebook, including tables.
    """
    table = _table(codebook)
    rc = _LIB.fp8q_dequantize_tiles(codes_ptr, rows, cols, tile_rows, tile_cols, absmax_ptr,
                                    table.ctypes.data, ctypes.byref(_format_for(codebook, scale)),
                                    vals_ptr, DTYPE_CODES[out_dtype], nthreads, int(openmp))
    if rc:
        raise ValueError(f"fp8q_dequantize_tiles rejected its arguments (shape=({rows}, {cols}), "
                         f"tile=({tile_rows}, {tile_cols}), out_dtype={out_dtype})")


def quantize_sr(x_ptr: int, in_dtype: str, n: int, group: int, codebook: Codebook, *,
                seed: int, stream: int, sr_bits: int, rows: int, cols: int, transposed: bool,
                codes_ptr: int, absmax_ptr: int, nthreads: int, openmp: bool = False,
                scale: str = "fp32") -> None:
    """:func:`quantize` with stochastic rounding (docs/numerics.md §14): the same groups,
    absmax and scales, each element rounded with the random bits of its index in the
    quantizer's input (:func:`sr_args`: ``(rows, cols)`` with ``rows * cols == n``,
    ``transposed``), computed in the kernel's loop. Writes codes and absmax only."""
    rc = _LIB.fp8q_quantize_sr(x_ptr, DTYPE_CODES[in_dtype], n, group,
                               ctypes.byref(_format_for(codebook, scale)),
                               ctypes.byref(sr_args(seed, stream, sr_bits, rows, cols, transposed)),
                               codes_ptr, absmax_ptr, nthreads, int(openmp))
    if rc:
        raise ValueError(f"fp8q_quantize_sr rejected its arguments (n={n}, group={group}, "
                         f"shape=({rows}, {cols}), sr_bits={sr_bits}, codebook={codebook.name})")


def quantize_tiles_sr(x_ptr: int, in_dtype: str, rows: int, cols: int, tile_rows: int,
                      tile_cols: int, codebook: Codebook, *, seed: int, stream: int,
                      sr_bits: int, transposed: bool, codes_ptr: int, absmax_ptr: int,
                      nthreads: int, openmp: bool = False, scale: str = "fp32") -> None:
    """:func:`quantize_tiles` with stochastic rounding (§14), as :func:`quantize_sr`."""
    rc = _LIB.fp8q_quantize_tiles_sr(
        x_ptr, DTYPE_CODES[in_dtype], rows, cols, tile_rows, tile_cols,
        ctypes.byref(_format_for(codebook, scale)),
        ctypes.byref(sr_args(seed, stream, sr_bits, rows, cols, transposed)), codes_ptr,
        absmax_ptr, nthreads, int(openmp))
    if rc:
        raise ValueError(f"fp8q_quantize_tiles_sr rejected its arguments (shape=({rows}, {cols}), "
                         f"tile=({tile_rows}, {tile_cols}), sr_bits={sr_bits}, "
                         f"codebook={codebook.name})")


def call(entry: str, *args) -> int:
    """``fp8q_<entry>(*args)`` with the C signature as it is (``entry``: ``"quantize"``,
    ``"dequantize"``, ``"quantize_tiles"``, ``"dequantize_tiles"``, and the stochastic
    ``"quantize_sr"``, ``"quantize_given_sr"``, ``"quantize_tiles_sr"``); returns the C return
    code. For callers whose per-call Python cost matters more than keyword checking
    (fp8core_torch's eager operands on small layers); everyone else uses the functions
    above. Like them, it is one of the entry points the conformance suite counts."""
    return _ENTRIES[entry](*args)


def cast(in_ptr: int, in_dtype: str, out_ptr: int, out_dtype: str, n: int) -> None:
    """Convert ``n`` floats with the kernel's own conversions (exact widening; round
    half to even when narrowing). Exposed for the tests of those conversions."""
    if _LIB.fp8q_cast(in_ptr, DTYPE_CODES[in_dtype], out_ptr, DTYPE_CODES[out_dtype], n):
        raise ValueError(f"fp8q_cast rejected its arguments (n={n})")
