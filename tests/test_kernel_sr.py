"""The C kernel executes stochastic rounding (docs/numerics.md §14): the torch kernel path,
the JAX stochastic custom calls and the ctypes entry points (fp8q_quantize_sr,
fp8q_quantize_given_sr, fp8q_quantize_tiles_sr) equal the numpy reference bit for bit on
codes and absmax — formats e4m3, e5m2, e2m1, e5m2fnuz (and e4m3fnuz in the slow cross),
granularities tensor / axiswise / block / tile / flat along either axis, scale rules fp32,
pow2, pow2_torchao and MX, several seeds, streams and sr_bits, float32 / bfloat16 /
float16 inputs, with ±0, NaN, ±inf, float32-subnormal and saturating elements (and the MX
edge blocks of tests/test_kernel_mx.py). Every check also proves the kernel ran (torch:
the entry points called through ``_kernel.call``; JAX: the stochastic custom call in the
compiled HLO). The oracle is fp8core.reference (and §14.2's hand-worked example).
"""

from __future__ import annotations

import ctypes
import itertools

import ml_dtypes
import numpy as np
import pytest
import torch

import fp8core
import fp8core.random as rnd
import fp8core.recipe as R
from fp8core import _kernel
from fp8core import reference as ref
from fp8core.recipe import OperandRule, axiswise, block, flat, tensor, tile

import test_stochastic_layers as _layers_test
from test_kernel_mx import _blocks as _mx_blocks
from test_kernel_mx import _flush_denormal, kernel_calls  # noqa: F401 (fixture)

slow = pytest.mark.slow

pytestmark = [pytest.mark.skipif(_kernel._LIB is None, reason="fp8core's C kernel is not built"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

BF16 = np.dtype(ml_dtypes.bfloat16)
SR_ENTRIES = {"quantize_sr", "quantize_given_sr", "quantize_tiles_sr"}


def _special(shape=(40, 72), seed=0) -> np.ndarray:
    """Values over many binades with special elements: ±0, float32 subnormals, a saturating
    one, exact format values; an inf row group and a NaN one (fill codes)."""
    rng = np.random.default_rng(seed)
    full, shape = shape, (int(np.prod(shape[:-1])), shape[-1])
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-14, 14, shape))).astype(np.float32)
    x[0, :8] = [0.0, -0.0, 1e-40, -1e-40, 3.0, -2e-45, 1.5, -448.0]
    x[1, :4] = [1e30, -1e30, 2.0 ** -126, -(2.0 ** -127)]
    x[5, 3] = np.inf
    x[9, 60] = np.nan
    x[20:24, -32:] = rng.standard_normal((4, 32)).astype(np.float32) * 1e-39    # subnormal block
    return x.reshape(full)


#: name -> granularity (layouts chosen so every kernel sweep runs: global two passes,
#: flat blocks, 1 x B tiles, B x B tiles, column groups of a transposed operand)
GRANS = {"tensor": tensor(), "axiswise": axiswise(), "block32": block(32), "tile16": tile(16),
         "flat100": flat(100)}
FORMATS = ("e4m3", "e5m2", "e2m1", "e5m2fnuz", "e4m3fnuz")
SCALES = ("fp32", "pow2", "pow2_torchao", "mx_floor", "mx_rceil")


def _rule(fmt, gran, scale, sr_bits):
    try:
        return OperandRule(fmt, GRANS[gran], scale, rounding="stochastic", sr_bits=sr_bits)
    except ValueError:              # MX rules: blocks / tiles of MX element formats only
        return None


#: the quick set: every format, granularity, scale rule (MX: floor and rceil), both axes,
#: the three input dtypes, sr_bits 1 / 3 / 8 / 23 and three (seed, stream) pairs
QUICK = [
    ("e4m3", "tensor", "fp32", -1, "float32", 8, 0, 0),
    ("e4m3", "block32", "fp32", 0, "bfloat16", 3, 7, 3),
    ("e5m2", "tile16", "pow2", 0, "float32", 23, 2**32 - 1, 12345),
    ("e2m1", "axiswise", "pow2_torchao", 0, "float16", 1, 7, 3),
    ("e5m2fnuz", "flat100", "fp32", 0, "float32", 8, 7, 3),
    ("e4m3fnuz", "block32", "pow2", -1, "bfloat16", 3, 0, 0),
    ("e4m3", "block32", "mx_floor", 0, "bfloat16", 8, 7, 3),
    ("e2m1", "block32", "mx_rceil", -1, "float32", 3, 2**32 - 1, 12345),
    ("e5m2", "block32", "mx_floor", -1, "float16", 23, 0, 0),
    ("e4m3", "tensor", "pow2", 0, "float16", 1, 7, 3),
    ("e2m1", "flat100", "fp32", -1, "bfloat16", 8, 0, 0),
    ("e4m3", "tile16", "fp32", -1, "float32", 8, 2**32 - 1, 12345),
]


def _id(case) -> str:
    fmt, gran, scale, axis, dtype, sr_bits, seed, stream = case
    return f"{fmt}-{gran}-{scale}-ax{axis}-{dtype}-r{sr_bits}-s{seed}.{stream}"


def _cases():
    """``(fmt, gran, scale, axis, dtype, sr_bits, seed, stream)``: :data:`QUICK`, then the
    valid cross of formats x granularities x scale rules x axes (dtype, sr_bits and keys
    cycling) marked slow."""
    out = [pytest.param(*c, id=_id(c)) for c in QUICK]
    dtypes, bits = ("float32", "bfloat16", "float16"), (8, 3, 23, 1)
    keys = ((7, 3), (0, 0), (2**32 - 1, 12345))
    cross = itertools.product(FORMATS, GRANS, SCALES, (-1, 0))
    for i, (fmt, gran, scale, axis) in enumerate(cross):
        if _rule(fmt, gran, scale, 8) is None:
            continue
        c = (fmt, gran, scale, axis, dtypes[i % 3], bits[i % 4], *keys[i % 3])
        out.append(pytest.param(*c, marks=slow, id="slow-" + _id(c)))
    return out


def _input(scale: str, dtype: str) -> np.ndarray:
    x = np.ascontiguousarray(_mx_blocks()[:40, :96]) if scale.startswith("mx_") else _special()
    return x.astype(BF16) if dtype == "bfloat16" else x.astype(dtype)


def _want(x, rule, axis, seed, stream):
    return ref.quantize_operand(x, rule, axis=axis, seed=seed, stream=stream)


def _assert_same(got, want, what):
    codes, absmax = (np.asarray(g) for g in got)
    assert codes.dtype == np.uint8 and codes.shape == want[0].shape, what
    bad = np.flatnonzero(codes.reshape(-1) != want[0].reshape(-1))
    assert bad.size == 0, (f"{what}: {bad.size} codes differ, first at {bad[:5]}: "
                           f"{codes.reshape(-1)[bad[:5]]} != {want[0].reshape(-1)[bad[:5]]}")
    assert absmax.shape == want[1].shape, what
    assert np.array_equal(absmax.view(np.uint32), want[1].astype(np.float32).view(np.uint32)), \
        f"{what}: absmax differs"


def _torch(x: np.ndarray) -> torch.Tensor:
    if x.dtype == BF16:
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


# ------------------------------------------------------------------ the hand-worked example
def test_hand_worked_example():
    """§14.2: e4m3, s = fl(1.3) (absmax 448 gives qscale 1), r = 8: code 0x3A (1.25) or 0x3B
    (1.375), up iff rand >= 154; seed 0, stream 0, index 0 has rand 155 (§14.1) — up."""
    x = np.array([1.3, 448.0], np.float32)
    rule = OperandRule("e4m3", tensor(), rounding="stochastic")
    assert int(rnd.random_bits((1,), 0, 0, 8)[0]) == 155
    codes = np.empty(2, np.uint8)
    absmax = np.empty(1, np.float32)
    for seed, want in ((0, 0x3B), *((s, 0x3B if int(rnd.random_bits((1,), s, 0, 8)[0]) >= 154
                                     else 0x3A) for s in range(1, 40))):
        _kernel.quantize_sr(x.ctypes.data, "float32", 2, 2, rule.format, seed=seed, stream=0,
                            sr_bits=8, rows=1, cols=2, transposed=False,
                            codes_ptr=codes.ctypes.data, absmax_ptr=absmax.ctypes.data, nthreads=1)
        assert codes[0] == want and codes[1] == 0x7E and absmax[0] == 448.0, (seed, codes)
    ups = sum(int(rnd.random_bits((1,), s, 0, 8)[0]) >= 154 for s in range(1, 40))
    assert 0 < ups < 39   # both neighbours occur


# ------------------------------------------------------------------ torch's kernel path
@pytest.mark.parametrize("fmt, gran, scale, axis, dtype, sr_bits, seed, stream", _cases())
def test_torch_kernel_equals_reference(fmt, gran, scale, axis, dtype, sr_bits, seed, stream,
                                       kernel_calls):  # noqa: F811
    import fp8core_torch as T

    rule = _rule(fmt, gran, scale, sr_bits)
    x = _input(scale, dtype)
    want = _want(x, rule, axis, seed, stream)
    for ftz in (False, True):
        with _flush_denormal(ftz):
            n = len(kernel_calls)
            got = T.quantize_operand(_torch(x), rule, axis=axis, seed=seed,
                                     stream=torch.tensor(stream, dtype=torch.int64))
            assert SR_ENTRIES & set(kernel_calls[n:]), "quantize_operand did not reach the kernel"
        _assert_same(got, want, f"torch[kernel] ftz={ftz}")


def test_torch_layouts_and_given_absmax(kernel_calls):  # noqa: F811
    """A transposed view passed with axis=-1 (the kernel quantizes its memory layout), a
    3-D input in flat blocks across rows, and a given absmax (fp8q_quantize_given_sr)."""
    import fp8core_torch as T

    x = _special((48, 64))
    rule = OperandRule("e4m3", tile(16), rounding="stochastic", sr_bits=5)
    n = len(kernel_calls)
    got = T.quantize_operand(torch.from_numpy(x).t(), rule, seed=9, stream=1)
    _assert_same(got, _want(np.ascontiguousarray(x.T), rule, -1, 9, 1), "transposed view")
    x3 = _special((4, 6, 64), seed=1)
    rule = OperandRule("e5m2", flat(100), "pow2", rounding="stochastic")
    got = T.quantize_operand(torch.from_numpy(x3), rule, seed=9, stream=1)
    _assert_same(got, _want(x3, rule, -1, 9, 1), "3-D")
    rule = OperandRule("e4m3", tensor(), rounding="stochastic")
    for axis in (-1, 0):
        amax = np.float32(300.0)
        got = T.quantize_operand(torch.from_numpy(x), rule, axis=axis, seed=4, stream=2,
                                 absmax=torch.tensor(amax))
        _assert_same(got, ref.quantize_operand(x, rule, axis=axis, seed=4, stream=2,
                                               absmax=amax), f"given absmax axis={axis}")
    assert {"quantize_tiles_sr", "quantize_sr", "quantize_given_sr"} <= set(kernel_calls[n:])


def test_torch_ops_path_still_equal(monkeypatch):
    """With the kernel off the torch ops give the same bits (the fallback the kernel
    replaced)."""
    import fp8core_torch as T

    monkeypatch.setattr(_kernel, "ENABLED", False)
    x = _special()
    rule = OperandRule("e2m1", block(32), rounding="stochastic", sr_bits=4)
    _assert_same(T.quantize_operand(torch.from_numpy(x), rule, axis=0, seed=5, stream=8),
                 _want(x, rule, 0, 5, 8), "torch[ops]")


# ------------------------------------------------------------------ JAX custom calls
def _jax():
    jax = pytest.importorskip("jax")
    from fp8core_jax import _ffi
    if not _ffi.available():
        pytest.skip("fp8core's C kernel is not available to JAX (no FFI wrapper)")
    return jax


def _jax_check(jax, rule, x, axis, seed, streams, what):
    """One compile with a traced stream; every stream equals the reference; the compiled
    HLO holds the stochastic custom call (XLA:CPU's threads flush subnormals)."""
    import jax.numpy as jnp
    from fp8core_jax import quantize_operand

    xj = jnp.asarray(x)
    fn = jax.jit(lambda v, s: quantize_operand(v, rule, axis=axis, seed=seed, stream=s))
    compiled = fn.lower(xj, jnp.uint32(streams[0])).compile()
    assert "fp8q_xla_quantize_sr" in compiled.as_text() or \
        "fp8q_xla_quantize_tiles_sr" in compiled.as_text(), f"{what}: no stochastic custom call"
    for s in streams:
        _assert_same(compiled(xj, jnp.uint32(s)), _want(x, rule, axis, seed, s),
                     f"{what} stream={s}")


@pytest.mark.parametrize("fmt, gran, scale, axis, dtype, sr_bits, seed, stream", _cases())
def test_jax_custom_call_equals_reference(fmt, gran, scale, axis, dtype, sr_bits, seed, stream,
                                          monkeypatch):
    monkeypatch.setattr(_kernel, "ENABLED", True)
    jax = _jax()
    rule = _rule(fmt, gran, scale, sr_bits)
    _jax_check(jax, rule, _input(scale, dtype), axis, seed, (stream, stream + 1), "jax[ffi]")


def test_jax_eager_and_given_absmax(monkeypatch):
    """Eager (no outer jit) reaches the same bits; a given absmax stays on XLA ops (the
    custom calls take no given amax) and still equals the reference."""
    monkeypatch.setattr(_kernel, "ENABLED", True)
    _jax()
    import jax.numpy as jnp
    from fp8core_jax import quantize_operand

    rule = OperandRule("e4m3", block(32), "mx_even", rounding="stochastic")
    x = np.ascontiguousarray(_mx_blocks()[:40, :96])
    _assert_same(quantize_operand(jnp.asarray(x), rule, axis=0, seed=1, stream=2),
                 _want(x, rule, 0, 1, 2), "jax eager")
    x = _special()
    rule = OperandRule("e5m2", tensor(), rounding="stochastic")
    _assert_same(quantize_operand(jnp.asarray(x), rule, seed=1, stream=2, absmax=np.float32(7.0)),
                 ref.quantize_operand(x, rule, seed=1, stream=2, absmax=np.float32(7.0)),
                 "jax given absmax")


# ------------------------------------------------------------------ ctypes entry points
def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


@pytest.mark.parametrize("ftz", [False, True])
def test_ctypes_entry_points_and_threads(ftz):
    """fp8q_quantize_sr (global and blocks), fp8q_quantize_tiles_sr (tiles, columns) and
    fp8q_quantize_given_sr on numpy buffers, one and four threads (a 640 x 1024 operand is
    split over threads by blocks, element ranges and tile bands), transposed copies with
    the index mapping."""
    x = _special((640, 1024), seed=3)
    cb = fp8core.resolve_codebook("e4m3")
    for gran, axis, nt in (("tensor", -1, 4), ("tensor", 0, 4), ("block32", -1, 4),
                           ("tile16", -1, 4), ("axiswise", 0, 4), ("block32", 0, 1)):
        rule = _rule("e4m3", gran, "pow2", 6)
        want = _want(x, rule, axis, 21, 77)
        phys = np.ascontiguousarray(x.T if axis == 0 else x)   # the operand, contraction last
        rows, cols = phys.shape
        codes = np.empty(phys.shape, np.uint8)
        plan = fp8core.plan_operand(rows, cols, rule.granularity)
        absmax = np.empty(plan.scale_shape, np.float32)
        kw = dict(seed=21, stream=77, sr_bits=6, transposed=axis == 0, codes_ptr=_ptr(codes),
                  absmax_ptr=_ptr(absmax), nthreads=nt, scale="pow2")
        with _flush_denormal(ftz):
            if plan.kind == "flat":
                _kernel.quantize_sr(_ptr(phys), "float32", x.size, plan.flat.blocksize, cb,
                                    rows=rows, cols=cols, **kw)
            else:
                t = plan.tiles
                _kernel.quantize_tiles_sr(_ptr(phys), "float32", rows, cols, t.tile_rows,
                                          t.tile_cols, cb, **kw)
        got = (codes.T if axis == 0 else codes, absmax)
        _assert_same(got, want, f"ctypes {gran} axis={axis} threads={nt} ftz={ftz}")
    # column groups of x itself (the kernel's per-column sweep; no index mapping)
    rule = _rule("e5m2", "axiswise", "fp32", 8)
    want = _want(x, rule, 0, 5, 6)
    codes, absmax = np.empty(x.shape, np.uint8), np.empty((1, x.shape[1]), np.float32)
    with _flush_denormal(ftz):
        _kernel.quantize_tiles_sr(_ptr(x), "float32", *x.shape, x.shape[0], 1,
                                  fp8core.resolve_codebook("e5m2"), seed=5, stream=6, sr_bits=8,
                                  transposed=False, codes_ptr=_ptr(codes), absmax_ptr=_ptr(absmax),
                                  nthreads=4)
    _assert_same((codes, absmax.T), want, f"ctypes columns ftz={ftz}")
    # given absmax (§10.2) through _kernel.call
    rule = _rule("e4m3", "tensor", "fp32", 8)
    amax = np.array(100.0, np.float32)
    want = ref.quantize_operand(x, rule, axis=0, seed=2, stream=3, absmax=amax)
    phys = np.ascontiguousarray(x.T)
    codes = np.empty(phys.shape, np.uint8)
    args = _kernel.sr_args(2, 3, 8, phys.shape[0], phys.shape[1], True)
    fmt = _kernel._format_for(cb, "fp32")
    with _flush_denormal(ftz):
        rc = _kernel.call("quantize_given_sr", _ptr(phys), 0, x.size, ctypes.byref(fmt),
                          ctypes.byref(args), _ptr(codes), _ptr(amax), 4, 0)
    assert rc == 0
    assert np.array_equal(codes.T, want[0]), "given absmax codes"


def test_ctypes_rejects_bad_sr_arguments():
    x = np.ones((4, 8), np.float32)
    codes, absmax = np.empty(32, np.uint8), np.empty(4, np.float32)
    fmt = _kernel._format_for(fp8core.resolve_codebook("e4m3"), "fp32")
    for bits, rows, cols in ((0, 4, 8), (24, 4, 8), (8, 3, 8)):
        args = _kernel.sr_args(1, 2, bits, rows, cols, False)
        assert _kernel.call("quantize_sr", _ptr(x), 0, 32, 8, ctypes.byref(fmt),
                            ctypes.byref(args), _ptr(codes), _ptr(absmax), 1, 0) == -1
        assert _kernel.call("quantize_tiles_sr", _ptr(x), 0, 4, 8, 2, 2, ctypes.byref(fmt),
                            ctypes.byref(args), _ptr(codes), _ptr(absmax), 1, 0) == -1
    args = _kernel.sr_args(1, 2, 8, 4, 8, False)
    assert _kernel.call("quantize_sr", _ptr(x), 0, 32, 8, ctypes.byref(fmt), ctypes.byref(args),
                        None, _ptr(absmax), 1, 0) == -1          # codes are required
    assert _kernel.call("quantize_sr", _ptr(x), 0, 32, 8, ctypes.byref(fmt), ctypes.byref(args),
                        _ptr(codes), _ptr(absmax), 1, 0) == 0


# ------------------------------------------------------------------ the matmuls
# the recipe of tests/test_stochastic_layers.py (stochastic W tiles, dY, re-quantized X)
SR_RECIPE = _layers_test.SR_RECIPE.replace(name="SR_KERNEL_TEST")


def test_matmuls_round_on_the_kernel(kernel_calls, monkeypatch):  # noqa: F811
    """matmul_fp8's stochastic slots run on the kernel in both backends; the products
    equal those of the reference operands (exact here: K = 64 float32 sums of e4m3 x e4m3
    / e5m2 products of these small magnitudes are within float32's bound, checked as
    tests/test_stochastic_layers.py does)."""
    import fp8core_torch as T

    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 7, 64)).astype(np.float32)
    B = rng.standard_normal((64, 40)).astype(np.float32)
    g = rng.standard_normal((3, 7, 40)).astype(np.float32)
    ops = ref.linear_operands(A, B, g, SR_RECIPE, seed=11, stream=5)
    At, Bt = torch.from_numpy(A).requires_grad_(), torch.from_numpy(B).requires_grad_()
    n = len(kernel_calls)
    out = T.matmul_fp8(At, Bt, recipe=SR_RECIPE, seed=11, stream=5)
    out.backward(torch.from_numpy(g))
    assert sum(e in SR_ENTRIES for e in kernel_calls[n:]) >= 3, kernel_calls[n:]  # 3 SR slots

    def within(got, a, b, what):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        want, bound = a @ b, np.abs(a) @ np.abs(b) * a.shape[1] * 2.0**-24 + 1e-30
        err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)
        assert np.all(err <= bound), f"{what}: worst excess {np.max(err - bound):.3g}"

    within(out.detach(), ops["input"], ops["weight"], "torch out")
    within(At.grad, ops["grad_output"], ops["weight_for_grad_input"].T, "torch grad_A")
    within(Bt.grad, ops["input_for_grad_weight"].T, ops["grad_output_for_grad_weight"],
           "torch grad_B")
    monkeypatch.setattr(_kernel, "ENABLED", True)
    jax = _jax()
    import jax.numpy as jnp
    import fp8core_jax as J

    f = jax.jit(jax.grad(lambda a, b, s: (J.matmul_fp8(a, b, recipe=SR_RECIPE, seed=11, stream=s)
                                          * g).sum(), argnums=(0, 1)))
    hlo = f.lower(A, B, jnp.uint32(5)).compile().as_text()
    assert "fp8q_xla_quantize_tiles_sr" in hlo or "fp8q_xla_quantize_sr" in hlo
    ga, gb = f(A, B, jnp.uint32(5))
    within(ga, ops["grad_output"], ops["weight_for_grad_input"].T, "jax grad_A")
    within(gb, ops["input_for_grad_weight"].T, ops["grad_output_for_grad_weight"], "jax grad_B")
