"""Stochastic rounding (docs/numerics.md §14): the generator against Python-int arithmetic
and the hand-worked example, its statistics (χ²), the rounding against gfloat given the
same random ints, unbiasedness against float64 neighbours, and numpy / torch ops / JAX
XLA (eager and jit with a traced seed) bit-identical on codes, absmax and values."""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

import fp8core
import fp8core.random as FR
import fp8core.recipe as R
from fp8core import reference as ref

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fp8core_jax as J  # noqa: E402
import fp8core_torch as T  # noqa: E402
from fp8core_jax import quantize as JQ  # noqa: E402
from fp8core_torch import quantize as TQ  # noqa: E402

_M32 = 0xFFFFFFFF


def _mix32_int(v: int) -> int:
    """lowbias32 on a Python int, the definition written out (§14.1)."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) & _M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def _u_int(seed: int, stream: int, i: int) -> int:
    k1 = _mix32_int(seed ^ 0x243F6A88)
    k2 = _mix32_int(k1 ^ stream ^ 0x85A308D3)
    return _mix32_int(_mix32_int(i ^ k1) ^ k2)


# ------------------------------------------------------------------ generator
def test_generator_hand_worked_example():
    """The numbers of docs/numerics.md §14.1 (worked by hand with Python ints)."""
    assert FR.keys(0, 0) == (0x212CA684, 0x6131BE34)
    assert _mix32_int(0 ^ 0x212CA684) == 0xE599DDA0
    u = FR.random_uint32((3,), 0, 0)
    assert [int(v) for v in u] == [0x9B08B364, _u_int(0, 0, 1), _u_int(0, 0, 2)]
    assert [int(v) for v in FR.random_bits((3,), 0, 0, 8)] == [155, 211, 212]


@pytest.mark.parametrize("seed,stream", [(0, 0), (1234, 7), (2**32 - 1, 2**32 - 1), (5, 2**31)])
def test_generator_equals_python_ints_every_backend(seed, stream):
    shape = (3, 7, 5)
    idx = [0, 1, 2, 17, 63, 104]
    want = np.array([_u_int(seed, stream, i) for i in idx], np.uint64)
    for r in (1, 8, 23):
        expect = want >> np.uint64(32 - r)
        got_np = FR.random_bits(shape, seed, stream, r).reshape(-1)[idx]
        got_t = TQ.random_bits(shape, seed, stream, r).reshape(-1)[idx].numpy()
        got_tt = TQ.random_bits(shape, torch.tensor(seed, dtype=torch.int64),
                                torch.tensor(stream, dtype=torch.int64), r).reshape(-1)[idx].numpy()
        got_j = np.asarray(JQ.random_bits(shape, seed, stream, r)).reshape(-1)[idx]
        got_jj = np.asarray(jax.jit(lambda s, t: JQ.random_bits(shape, s, t, r))(
            jnp.uint32(seed), jnp.uint32(stream))).reshape(-1)[idx]
        for name, got in [("numpy", got_np), ("torch", got_t), ("torch tensor seed", got_tt),
                          ("jax", got_j), ("jax jit", got_jj)]:
            np.testing.assert_array_equal(got.astype(np.uint64), expect, err_msg=f"{name} r={r}")


def _chi2(counts: np.ndarray) -> float:
    e = counts.sum() / counts.size
    return float(((counts - e) ** 2 / e).sum())


def _chi2_bound(df: int) -> float:
    return df + 6 * math.sqrt(2 * df)     # mean + 6 sd of χ²(df)


def test_generator_statistics():
    """Uniform 8-bit values; no dependence between adjacent indices, adjacent streams and
    adjacent seeds (χ² of 16 × 16 joint top-4-bit histograms)."""
    n = 1 << 16
    u = FR.random_uint32((n,), 42, 3)
    c8 = np.bincount((u >> 24).astype(np.int64), minlength=256)
    assert _chi2(c8) < _chi2_bound(255), c8
    assert _chi2(c8) > 255 - 6 * math.sqrt(510), "too uniform to be random"
    top4 = lambda v: (v >> 28).astype(np.int64)  # noqa: E731
    pairs = {
        "adjacent indices": (top4(u[:-1]), top4(u[1:])),
        "adjacent streams": (top4(u), top4(FR.random_uint32((n,), 42, 4))),
        "adjacent seeds": (top4(u), top4(FR.random_uint32((n,), 43, 3))),
        "stream 0 / 1 of seed 0": (top4(FR.random_uint32((n,), 0, 0)),
                                   top4(FR.random_uint32((n,), 0, 1))),
    }
    for what, (a, b) in pairs.items():
        joint = np.bincount(a * 16 + b, minlength=256)
        assert _chi2(joint) < _chi2_bound(255), (what, _chi2(joint))
    # a bijection per (seed, stream): no repeated 32-bit value
    assert np.unique(u).size == n


# ------------------------------------------------------------------ rounding rule
_GFLOAT_FORMATS = {"float8_e4m3fn": "format_info_ocp_e4m3", "float8_e5m2": "format_info_ocp_e5m2",
                   "float6_e3m2fn": "format_info_ocp_e3m2", "float6_e2m3fn": "format_info_ocp_e2m3",
                   "float4_e2m1fn": "format_info_ocp_e2m1"}


def _scaled_cases(cb: fp8core.Codebook, rng) -> np.ndarray:
    """Random values over [−M, M], every representable value and its float32 neighbours,
    values among the format's subnormals, ±0, ±M."""
    m = float(cb.max)
    vals = cb.values[np.isfinite(cb.values)].astype(np.float32)
    near = np.concatenate([np.nextafter(vals, np.float32(np.inf)),
                           np.nextafter(vals, np.float32(-np.inf))])
    sub = (rng.uniform(-3, 3, 200) * float(cb.min_nonzero)).astype(np.float32)
    s = np.concatenate([(rng.uniform(-1, 1, 4000) * m).astype(np.float32), vals, near, sub,
                        np.float32([0.0, -0.0, m, -m])])
    return np.clip(s, -cb.max, cb.max).astype(np.float32)


@pytest.mark.parametrize("fmt", list(_GFLOAT_FORMATS))
def test_rounding_equals_gfloat(fmt):
    gfloat = pytest.importorskip("gfloat", reason="gfloat not installed: no peer to compare with")
    import gfloat.formats as gf
    fi = getattr(gf, _GFLOAT_FORMATS[fmt])
    cb = fp8core.resolve_codebook(fmt)
    rng = np.random.default_rng(3)
    s = _scaled_cases(cb, rng)
    for r in (1, 3, 8, 23):
        rand = rng.integers(0, 2**r, s.size)
        rand[:8] = [0, 2**r - 1] * 4
        codes = ref.stochastic_round_to_codes(s, rand, cb, r)
        got = cb.values256[codes].astype(np.float64)
        want = gfloat.round_ndarray(fi, s.astype(np.float64), gfloat.RoundMode.Stochastic,
                                    sat=True, srbits=rand, srnumbits=r)
        bad = np.flatnonzero((got != want) | (np.signbit(got) != np.signbit(want)))
        assert bad.size == 0, (r, s[bad[:5]], rand[bad[:5]], got[bad[:5]], want[bad[:5]])
        # the codes are the values' own: no second rounding
        np.testing.assert_array_equal(codes, got.astype(np.float32).astype(cb.format.ml_dtype)
                                      .view(np.uint8))


def test_rounding_fnuz_sign_and_representables():
    """fnuz: a negative value that stays at 0 gets the one zero (0x80 is NaN), one that
    rounds away the sign bit; representables never move."""
    cb = fp8core.resolve_codebook("float8_e4m3fnuz")
    tiny = np.float32([-1e-5, -0.0, 1e-5])    # δ = 1e-5 / 2**-10 ≈ 0.0102: D = rint(2.62) = 3
    assert list(ref.stochastic_round_to_codes(tiny, np.full(3, 252), cb, 8)) == [0, 0, 0]
    assert list(ref.stochastic_round_to_codes(tiny, np.full(3, 253), cb, 8)) == [0x81, 0, 0x01]
    vals = cb.values[np.isfinite(cb.values)].astype(np.float32)
    for rand in (0, 255):
        c = ref.stochastic_round_to_codes(vals, np.full(vals.size, rand), cb, 8)
        np.testing.assert_array_equal(cb.values256[c], vals)


def _neighbours64(s: np.ndarray, cb: fp8core.Codebook) -> tuple[np.ndarray, np.ndarray]:
    """float64 lower neighbour magnitude and quantum of |s| in a native format."""
    fmt = cb.format
    a = np.abs(s.astype(np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    q = 2.0 ** (np.maximum(e, math.log2(fmt.smallest_normal)) - fmt.mantissa_bits)
    return np.floor(a / q) * q, q


@pytest.mark.parametrize("fmt,r", [("e4m3", 8), ("float4_e2m1fn", 3)])
def test_unbiased(fmt, r):
    """Mean of N independent streams → x within 5σ (Bernoulli variance of each element)
    plus the r-bit rounding of the probability; round-to-nearest fails the same bound."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(1000).astype(np.float32)
    rule = R.OperandRule(fmt, R.tensor(), rounding="stochastic", sr_bits=r)
    n = 200
    ys = np.stack([ref.fake_quantize_operand(x, rule, seed=9, stream=k) for k in range(n)])
    _, absmax = ref.quantize_operand(x, rule, seed=9)
    qscale, dscale = (float(np.reshape(v, ())) for v in ref.operand_scales(absmax, rule))
    s = np.clip(x.astype(np.float64) * qscale, -float(rule.format.max), float(rule.format.max))
    lo, q = _neighbours64(s, rule.format)
    p = (np.abs(s) - lo) / q
    sigma = q * dscale * np.sqrt(p * (1 - p))
    bound = 5 * sigma / math.sqrt(n) + q * dscale * 2.0 ** -(r + 1) + 2.0 ** -22 * np.abs(x)
    err = np.abs(ys.mean(axis=0).astype(np.float64) - x)
    assert np.all(err <= bound), (x[err > bound][:5], err[err > bound][:5])
    nearest = ref.fake_quantize_operand(x, R.nearest_rule(rule)).astype(np.float64)
    assert np.mean(np.abs(nearest - x) > bound) > 0.5   # the bound is not vacuous
    assert np.unique(ys, axis=0).shape[0] == n           # streams differ


# ------------------------------------------------------------------ backends
def _x(shape=(37, 50), dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x[0, :6] = [np.nan, 0.0, -0.0, 1e-40, -1e-40, np.inf]          # a non-finite row / block
    x[3, :5] = [1e-40, -1e-40, -0.0, 2e-39, -1e-45]                  # float32 subnormals
    x[5, 5] = 1e30
    x[9, :8] = rng.standard_normal(8).astype(np.float32) * 1e-30     # tiny normals
    with np.errstate(over="ignore"):
        return x.astype(dtype)                                       # float16: 1e30 → inf


_CASES = [  # (format, granularity, scale, axis, dtype)
    ("e4m3", R.tensor(), "fp32", -1, np.float32),   # all fill codes (a NaN in the tensor)
    ("e4m3", R.tensor(), "fp32", 0, np.float32),    # finite: x without its row 0
    ("e4m3", R.block(16), "pow2", 0, np.float32),
    ("e5m2", R.axiswise(), "fp32", -1, ml_dtypes.bfloat16),
    ("e5m2", R.tile(8), "pow2_torchao", 0, np.float32),
    ("float8_e4m3fnuz", R.flat(64), "fp32", -1, np.float16),
    ("float4_e2m1fn", R.block(16), "mx_floor", -1, np.float32),
    pytest.param(("float6_e3m2fn", R.block(32), "mx_rceil", 0, np.float32),
                 marks=pytest.mark.slow),
    pytest.param(("float8_e4m3fn", R.tile(32), "mx_even", -1, ml_dtypes.bfloat16),
                 marks=pytest.mark.slow),
]


def _finite_x() -> np.ndarray:
    """:func:`_x` without its non-finite row and its 1e30 (one scale would zero the rest)."""
    x = _x()[1:].copy()
    x[4, 5] = 50.0
    return x


def _bits(a) -> np.ndarray:
    a = np.asarray(a.detach().float() if hasattr(a, "detach") else a, np.float32).copy()
    a[np.isnan(a)] = np.nan
    return a.view(np.uint32)


def _torch_in(x: np.ndarray) -> "torch.Tensor":
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(x)


@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-ax{c[3]}-"
                                                      f"{np.dtype(c[4]).name}")
def test_backends_bit_identical(case):
    fmt, gran, scale, axis, dtype = case
    rule = R.OperandRule(fmt, gran, scale, rounding="stochastic", sr_bits=5 if axis else 8)
    x = _x(dtype=dtype)
    if gran.kind == "tensor" and axis == 0:
        x = _finite_x()
    for seed, stream in [(0, 0), (2**32 - 1, 12345)]:
        c0, a0 = ref.quantize_operand(x, rule, axis=axis, seed=seed, stream=stream)
        y0 = ref.fake_quantize_operand(x, rule, axis=axis, seed=seed, stream=stream)
        cn, _ = ref.quantize_operand(x, R.nearest_rule(rule), axis=axis)
        live = cn != rule.format.fill_code        # groups without NaN / inf (tensor(): none)
        assert live.sum() == 0 or 0.05 < np.mean(c0[live] != cn[live]) < 0.95, \
            "stochastic codes differ from nearest ones"
        xt = _torch_in(x)
        c1, a1 = T.quantize_operand(xt, rule, axis=axis, seed=seed, stream=stream)
        y1 = T.fake_quantize_operand(xt, rule, axis=axis, seed=seed, stream=stream)
        xj = jnp.asarray(x)
        c2, a2 = J.quantize_operand(xj, rule, axis=axis, seed=seed, stream=stream)
        y2 = J.fake_quantize_operand(xj, rule, axis=axis, seed=seed, stream=stream)
        for name, c, a, y in [("torch", c1.numpy(), a1, y1), ("jax", np.asarray(c2), a2, y2)]:
            np.testing.assert_array_equal(c, c0, err_msg=f"{name} codes seed={seed}")
            np.testing.assert_array_equal(_bits(a), _bits(a0), err_msg=f"{name} absmax")
            np.testing.assert_array_equal(_bits(y), _bits(y0), err_msg=f"{name} values")
        np.testing.assert_array_equal(_bits(T.dequantize_operand(c1, a1, rule, axis=axis)),
                                      _bits(ref.dequantize_operand(c0, a0, rule, axis=axis)))


def test_index_is_row_major_in_x_as_passed():
    """One scale (tensor()): axis=0 and axis=-1 give every element the same bits, so the
    same codes; the transposed copy passed as x has other indices, so other codes; each
    code is the one its own index's random int gives."""
    rule = R.OperandRule("e4m3", R.tensor(), rounding="stochastic")
    x = _finite_x()
    c_last, a = ref.quantize_operand(x, rule, axis=-1, seed=1)
    c_first, _ = ref.quantize_operand(x, rule, axis=0, seed=1)
    np.testing.assert_array_equal(c_first, c_last)
    c_t, _ = ref.quantize_operand(np.ascontiguousarray(x.T), rule, axis=-1, seed=1)
    assert np.mean(c_t.T != c_last) > 0.05
    qscale, _ = ref.operand_scales(a, rule)
    s = np.clip(x * qscale.reshape(()), -448, 448).reshape(-1)
    rand = np.array([_u_int(1, 0, i) >> 24 for i in range(x.size)])
    want = ref.stochastic_round_to_codes(s, rand, rule.format, 8, np.abs(x.reshape(-1)) < 2**-126)
    np.testing.assert_array_equal(c_last.reshape(-1), want)


def test_jax_jit_traced_seed_does_not_recompile():
    rule = R.OperandRule("e4m3", R.block(16), rounding="stochastic")
    x = _x()
    traces = []

    @jax.jit
    def step(x, seed, stream):
        traces.append(1)
        return J.fake_quantize_operand(x, rule, seed=seed, stream=stream)

    for stream in range(3):
        got = step(jnp.asarray(x), jnp.uint32(77), jnp.int32(stream))
        want = ref.fake_quantize_operand(x, rule, seed=77, stream=stream)
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"stream={stream}")
    assert len(traces) == 1


def test_public_quantizers_take_rounding():
    x = _x((10, 64))
    for fn in (lambda m, a, **k: m.quantize_blockwise(a, "e4m3", 32, **k),
               lambda m, a, **k: m.quantize_mx(a, "e2m1", **k)):
        want = fn(ref, x, rounding="stochastic", seed=3, stream=1, sr_bits=6)
        near = fn(ref, x)
        assert not np.array_equal(want[0], near[0])
        np.testing.assert_array_equal(_bits(want[1]), _bits(near[1]))  # scales unchanged
        for name, mod, a in [("torch", T, torch.from_numpy(x)), ("jax", J, jnp.asarray(x))]:
            got = fn(mod, a, rounding="stochastic", seed=3, stream=1, sr_bits=6)
            np.testing.assert_array_equal(np.asarray(got[0]), want[0], err_msg=name)
            np.testing.assert_array_equal(_bits(got[1]), _bits(want[1]), err_msg=name)


def test_nearest_default_unchanged_and_seed_ignored():
    x = _x()
    rule = R.OperandRule("e4m3", R.block(16))
    assert rule.rounding == "nearest" and rule.sr_bits == 8 and str(rule) == "float8_e4m3fn/block(16)"
    c0, _ = ref.quantize_operand(x, rule)
    c1, _ = ref.quantize_operand(x, rule, seed=5, stream=2)
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_array_equal(T.quantize_operand(torch.from_numpy(x), rule, seed=5)[0].numpy(),
                                  c0)


# ------------------------------------------------------------------ errors
def test_errors():
    sr = R.OperandRule("e4m3", R.tensor(), rounding="stochastic")
    x = np.ones((4, 8), np.float32)
    inputs = [(ref, x), (T, torch.from_numpy(x)), (J, jnp.asarray(x))]
    for mod, a in inputs:
        with pytest.raises(ValueError, match="seed is required"):
            mod.quantize_operand(a, sr)
        with pytest.raises(ValueError, match="seed is required"):
            mod.fake_quantize_operand(a, sr, stream=3)
        with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*32\).*str"):
            mod.quantize_operand(a, sr, seed="1")
        with pytest.raises(TypeError, match="seed must be an int.*bool"):
            mod.quantize_operand(a, sr, seed=True)
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\), got -1"):
            mod.quantize_operand(a, sr, seed=-1)
        with pytest.raises(ValueError, match="stream must be an int.*got 4294967296"):
            mod.quantize_operand(a, sr, seed=1, stream=2**32)
        with pytest.raises(TypeError, match="seed must be an int"):
            mod.quantize_operand(a, R.nearest_rule(sr), seed=1.5)   # checked for nearest too
        with pytest.raises(ValueError, match="rounding must be one of nearest, stochastic, got 'up'"):
            mod.quantize_blockwise(a, "e4m3", 32, rounding="up", seed=1)
        with pytest.raises(ValueError, match="sr_bits must be an int in 1..23, got 24"):
            mod.quantize_mx(a, "e4m3", rounding="stochastic", seed=1, sr_bits=24)
    with pytest.raises(TypeError, match="seed must be an int .* or a 0-d integer array"):
        T.quantize_operand(torch.from_numpy(x), sr, seed=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="seed must be an int .* or a 0-d integer array"):
        J.quantize_operand(jnp.asarray(x), sr, seed=jnp.float32(1))
    with pytest.raises(ValueError, match="OperandRule.rounding must be one of nearest, stochastic"):
        R.OperandRule("e4m3", rounding="Stochastic")
    with pytest.raises(ValueError, match="OperandRule.sr_bits must be an int in 1..23, got 0"):
        R.OperandRule("e4m3", rounding="stochastic", sr_bits=0)
    with pytest.raises(TypeError, match="OperandRule.sr_bits must be an int in 1..23, got float"):
        R.OperandRule("e4m3", rounding="stochastic", sr_bits=8.0)
    with pytest.raises(ValueError, match="needs a native format.*table codebook bnb_fp8_map"):
        R.OperandRule("bnb_e4m3", rounding="stochastic")
    with pytest.raises(ValueError, match="elements, at most 4294967295"):
        FR.check_elements(2**32)
    recipe = dataclasses.replace(R.TENSORWISE, input=sr, name="TENSORWISE_SR_INPUT")
    a, b = np.ones((4, 8), np.float32), np.ones((8, 3), np.float32)
    want = r"matmul_fp8: recipe TENSORWISE_SR_INPUT rounds input stochastically, so seed is required"
    with pytest.raises(ValueError, match=want):
        T.matmul_fp8(torch.from_numpy(a), torch.from_numpy(b), recipe=recipe)
    with pytest.raises(ValueError, match=want):
        J.matmul_fp8(jnp.asarray(a), jnp.asarray(b), recipe=recipe)
