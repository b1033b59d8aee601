"""The C kernel executes the MX scale rules (docs/numerics.md §11): the torch kernel path,
the JAX custom calls and the ctypes entry points equal the numpy reference bit for bit —
element codes, absmax (and so the e8m0 bytes, which quantize_mx derives from it) and
dequantized float32 / bfloat16 bits — for every MX element format × scale mode, 1×32
blocks along either axis (partial last blocks; the kernel's flat, global and tile
sweeps) and 32×32 tiles.

The inputs are tests/test_jax_mx.py's special blocks (zero, −0, ±inf, float32-subnormal
elements and absmax, huge, tiny, rounding midpoints, an inf block whose other elements
survive rceil's 2**-127) plus a NaN block. Their tiny blocks are the kernel's "edge"
blocks (qscale up to 2**126, dscale down to 2**-127), which it scales and decodes by
integer exponent arithmetic: the torch and ctypes calls also run with flush-to-zero /
denormals-are-zero set on the calling thread (``torch.set_flush_denormal``), and the JAX
custom calls run on XLA:CPU's threads, which flush. The quick set takes each format and
each mode once (a diagonal); the full cross is marked slow.
"""

from __future__ import annotations

import ctypes
import contextlib

import ml_dtypes
import numpy as np
import pytest
import torch

import fp8core
import fp8core.mx as mx
from fp8core import _kernel
from fp8core import reference as ref
from fp8core.recipe import OperandRule, block, tile

from _jax_testutil import assert_bits_equal
from test_jax_mx import _diagonal
from test_jax_mx import _special_blocks as _jax_special_blocks

slow = pytest.mark.slow

pytestmark = [pytest.mark.skipif(_kernel._LIB is None, reason="fp8core's C kernel is not built"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

BF16 = np.dtype(ml_dtypes.bfloat16)
F32_TINY = np.float32(2.0 ** -126)


def _blocks() -> np.ndarray:
    x = _jax_special_blocks()
    x[12, 7] = np.nan                      # a NaN block (byte 255, fill codes, NaN values)
    x[13, 64:96] = 2.0 ** -110             # a normal absmax whose byte is an edge byte
    x[13, 70] = -1.1e-38                   # ... with a subnormal element (a non-zero code)
    return x


#: name -> (granularity, axis, operand from the (48, 256) blocks). Kernel sweeps reached:
#: rows256 flat blocks (fp8q_quantize), rows250 1×32 tiles with a partial last block,
#: cols 32×1 column groups of a transposed operand (partial), tile 32×32 (partial), short
#: one group smaller than its block (the global two-pass path).
LAYOUTS = {
    "rows256": (block(32), -1, lambda x: x),
    "rows250": (block(32), -1, lambda x: x[:, :250]),
    "cols": (block(32), 0, lambda x: np.ascontiguousarray(x[:, :250].T)),
    "tile": (tile(32), -1, lambda x: x[:40, :250]),
    "short": (block(32), -1, lambda x: x[11:12, :20]),
}


def _cases():
    """``(fmt, mode, layout, dtype)``: every format × mode × layout × input dtype; quick is
    format i with mode i % 4, layout i % 5 and float32 / bfloat16 alternately (each of
    them at least once), the rest slow."""
    out = []
    layouts = list(LAYOUTS)
    for i, fmt in enumerate(mx.MX_ELEMENT_FORMATS):
        for j, mode in enumerate(mx.SCALE_MODES):
            for k, layout in enumerate(layouts):
                for d, dtype in enumerate(("float32", "bfloat16")):
                    quick = j == i % 4 and k == i % len(layouts) and d == i % 2
                    out.append(pytest.param(fmt, mode, layout, dtype, marks=() if quick else (slow,),
                                            id=f"{fmt}-{mode}-{layout}-{dtype}"))
    return out


def _operand(layout: str, dtype: str) -> tuple[object, int, np.ndarray]:
    """``(granularity, axis, operand)`` of a layout, in ``dtype``."""
    gran, axis, take = LAYOUTS[layout]
    x = np.ascontiguousarray(take(_blocks()))
    return gran, axis, (x.astype(BF16) if dtype == "bfloat16" else x)


def _want(x: np.ndarray, rule: OperandRule, axis: int) -> dict[str, np.ndarray]:
    codes, absmax = ref.quantize_operand(x, rule, axis=axis)
    out = {"codes": codes, "absmax": absmax}
    for d in ("float32", "bfloat16"):
        out[f"deq_{d}"] = ref.dequantize_operand(codes, absmax, rule, axis=axis,
                                                 dtype=np.float32 if d == "float32" else BF16)
    out["fake"] = ref.fake_quantize_operand(x, rule, axis=axis)
    return out


def test_inputs_reach_the_edge_blocks():
    """On the reference: float32-subnormal inputs with non-zero codes, dequantized float32
    subnormals, and for rceil the 2**-127 qscale of an inf block (its huge elements keep
    non-zero codes) — what a flushing float32 path would change."""
    x = _blocks()
    floor = OperandRule("e4m3", block(32), "mx_floor")
    codes, absmax = ref.quantize_operand(x, floor)
    y = ref.dequantize_operand(codes, absmax, floor)
    sub = (x != 0) & (np.abs(x) < F32_TINY)
    assert sub.sum() > 60 and (codes[sub] & 0x7F).min() > 0
    assert ((y != 0) & (np.abs(y) < F32_TINY)).sum() > 32
    rceil = OperandRule("e4m3", block(32), "mx_rceil")
    codes, absmax = ref.quantize_operand(x, rceil)
    assert mx.scale_bytes(absmax[11, 0], rceil.format, "rceil") == 254
    assert (codes[11, 1:4] & 0x7F).min() > 0
    assert mx.scale_bytes(absmax[12, 0], rceil.format, "rceil") == mx.E8M0_NAN


@contextlib.contextmanager
def _flush_denormal(on: bool):
    """FTZ/DAZ on the calling thread (the kernel runs there: inputs below its
    per-thread minimum take one thread)."""
    if on and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal)")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the torch backend's kernel calls (every one goes through _kernel.call)."""
    monkeypatch.setattr(_kernel, "ENABLED", True)
    calls = []
    real = _kernel.call

    def counting(entry, *args):
        calls.append(entry)
        return real(entry, *args)

    monkeypatch.setattr(_kernel, "call", counting)
    return calls


def _torch(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x.astype(np.float32)))
    return t.to(torch.bfloat16) if x.dtype == BF16 else t


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(BF16)
    return t.numpy()


def _check_torch(rule, axis, x, want, calls, ftz: bool):
    import fp8core_torch as T

    with _flush_denormal(ftz):
        n = len(calls)
        codes, absmax = T.quantize_operand(_torch(x), rule, axis=axis)
        assert len(calls) > n, "quantize_operand did not reach the kernel"
        got = {"codes": codes.numpy(), "absmax": absmax.numpy()}
        for d in ("float32", "bfloat16"):
            n = len(calls)
            got[f"deq_{d}"] = _np(T.dequantize_operand(codes, absmax, rule, axis=axis,
                                                       dtype=getattr(torch, d)))
            assert len(calls) > n, "dequantize_operand did not reach the kernel"
        n = len(calls)
        got["fake"] = _np(T.fake_quantize_operand(_torch(x), rule, axis=axis))
        assert len(calls) > n, "fake_quantize_operand did not reach the kernel"
    for k, w in want.items():
        assert_bits_equal(got[k], w, f"torch[kernel] {k} (ftz={ftz})")


@pytest.mark.parametrize("fmt, mode, layout, dtype", _cases())
def test_torch_kernel_equals_reference(fmt, mode, layout, dtype, kernel_calls):
    gran, axis, x = _operand(layout, dtype)
    rule = OperandRule(fmt, gran, f"mx_{mode}")
    want = _want(x, rule, axis)
    for ftz in (False, True):
        _check_torch(rule, axis, x, want, kernel_calls, ftz)


@pytest.mark.parametrize("fmt, mode", _diagonal([()]))
def test_torch_quantize_mx_scale_bytes_from_the_kernel(fmt, mode, kernel_calls):
    """quantize_mx's e8m0 bytes (derived from the kernel's absmax) and codes."""
    import fp8core_torch as T

    x = _blocks()
    codes, scales = fp8core.quantize_mx(x, fmt, scale_mode=mode, axis=0)
    t_codes, t_scales = T.quantize_mx(torch.from_numpy(x), fmt, scale_mode=mode, axis=0)
    assert kernel_calls
    assert_bits_equal(t_codes.numpy(), codes, "codes")
    assert_bits_equal(t_scales.numpy(), scales, "scales")


# ---------------------------------------------------------------- JAX custom calls
def _jax():
    jax = pytest.importorskip("jax")
    from fp8core_jax import _ffi
    if not _ffi.available():
        pytest.skip("fp8core's C kernel is not available to JAX (no FFI wrapper)")
    return jax


@pytest.mark.parametrize("fmt, mode, layout, dtype", _cases())
def test_jax_custom_calls_equal_reference(fmt, mode, layout, dtype, monkeypatch):
    """Every operation jitted, with the compiled HLO checked for the kernel's custom call
    (XLA:CPU's threads flush subnormals, so this is also the flushing case)."""
    monkeypatch.setattr(_kernel, "ENABLED", True)
    jax = _jax()
    import jax.numpy as jnp
    from fp8core_jax import dequantize_operand, fake_quantize_operand, quantize_operand

    gran, axis, x = _operand(layout, dtype)
    rule = OperandRule(fmt, gran, f"mx_{mode}")
    want = _want(x, rule, axis)
    xj = jnp.asarray(x)
    fns = {"quantize": lambda v: quantize_operand(v, rule, axis=axis),
           "fake": lambda v: fake_quantize_operand(v, rule, axis=axis)}
    for d in ("float32", "bfloat16"):
        fns[f"deq_{d}"] = (lambda c, a, d=d: dequantize_operand(c, a, rule, axis=axis,
                                                                 dtype=getattr(jnp, d)))
    got = {}
    for name, fn in fns.items():
        args = (xj,) if name in ("quantize", "fake") else (want["codes"], want["absmax"])
        compiled = jax.jit(fn).lower(*args).compile()
        assert "fp8q_xla_" in compiled.as_text(), f"{name}: no custom call in the compiled HLO"
        out = compiled(*args)
        if name == "quantize":
            got["codes"], got["absmax"] = (np.asarray(o) for o in out)
        else:
            got[name] = np.asarray(out)
    for k, w in want.items():
        assert_bits_equal(got[k], w, f"jax[ffi] {k}")


# ---------------------------------------------------------------- ctypes entry points
def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


@pytest.mark.parametrize("fmt, mode", _diagonal([()]))
@pytest.mark.parametrize("ftz", [False, True])
def test_ctypes_entry_points_equal_reference(fmt, mode, ftz):
    """fp8core._kernel.quantize / dequantize (flat 1×32 blocks of 256-wide rows) and
    quantize_tiles / dequantize_tiles (32×32 tiles) on numpy buffers."""
    cb = fp8core.resolve_codebook(fmt)
    scale = f"mx_{mode}"
    for layout in ("rows256", "tile"):
        gran, axis, x = _operand(layout, "float32")
        rule = OperandRule(fmt, gran, scale)
        want = _want(x, rule, axis)
        rows, cols = x.shape
        codes = np.empty(x.shape, np.uint8)
        vals = np.empty(x.shape, np.float32)
        deq = np.empty(x.shape, BF16)
        absmax = np.empty(want["absmax"].shape, np.float32)
        with _flush_denormal(ftz):
            if layout == "rows256":
                _kernel.quantize(_ptr(x), "float32", x.size, 32, cb, codes_ptr=_ptr(codes),
                                 vals_ptr=_ptr(vals), out_dtype="float32", absmax_ptr=_ptr(absmax),
                                 nthreads=1, scale=scale)
                _kernel.dequantize(_ptr(codes), x.size, 32, _ptr(absmax), cb, vals_ptr=_ptr(deq),
                                   out_dtype="bfloat16", nthreads=1, scale=scale)
            else:
                _kernel.quantize_tiles(_ptr(x), "float32", rows, cols, 32, 32, cb, scale=scale,
                                       codes_ptr=_ptr(codes), vals_ptr=_ptr(vals),
                                       out_dtype="float32", absmax_ptr=_ptr(absmax), nthreads=1)
                _kernel.dequantize_tiles(_ptr(codes), rows, cols, 32, 32, _ptr(absmax), cb,
                                         scale=scale, vals_ptr=_ptr(deq), out_dtype="bfloat16",
                                         nthreads=1)
        assert_bits_equal(codes, want["codes"], f"{layout} codes")
        assert_bits_equal(absmax, want["absmax"], f"{layout} absmax")
        assert_bits_equal(vals, want["fake"], f"{layout} fused values")
        assert_bits_equal(deq, want["deq_bfloat16"], f"{layout} dequantize -> bfloat16")


def test_mx_rule_without_a_table_is_rejected():
    """The kernel refuses an MX rule whose byte table is missing (rc -1 → ValueError)."""
    cb = fp8core.resolve_codebook("e4m3")
    f = _kernel._Format.from_buffer_copy(_kernel._format_for(cb, "mx_floor"))
    f.mx_table = None
    x = np.ones(64, np.float32)
    codes, absmax = np.empty(64, np.uint8), np.empty(2, np.float32)
    rc = _kernel._LIB.fp8q_quantize(_ptr(x), 0, 64, 32, ctypes.byref(f), _ptr(codes), None, 0,
                                    _ptr(absmax), 1, 0)
    assert rc == -1
    with pytest.raises(ValueError, match=r"float8_e4m3fnuz is not an MX element format"):
        _kernel._format_for(fp8core.resolve_codebook("e4m3fnuz"), "mx_floor")
