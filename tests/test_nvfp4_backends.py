"""NVFP4 in torch and JAX (docs/numerics.md §13.3): bit-identical to the numpy reference —
codes, block-scale bytes, tensor scale, decoded values — for both variants, with and
without the per-tensor scale, float32 / bfloat16 / float16 inputs, special blocks (zero,
−0, ±inf, NaN, float32 subnormals beside normals, blocks far below the amax), a partial
last block, axis 0 and 3-D, 16x16 tiles; JAX eager and under an outer ``jit``; their e2m1 rounding
against ml_dtypes at every midpoint; the argument errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fp8core
import fp8core.nvfp4 as nv

VARIANTS = [(v, p) for v in nv.VARIANTS for p in (False, True)]
IDS = [f"{v}-{'two_level' if p else 'single'}" for v, p in VARIANTS]


def _bytes(a):
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def _cases():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 80)) * np.exp2(rng.uniform(-25, 25, (24, 1)))).astype(np.float32)
    x[0, :16] = 0.0
    x[0, 16:32] = -0.0
    x[1, :16] = 1e-40
    x[1, 16:24] = [-3e-39, 2e-45, 0.5, -1e-41, 1e-38, -1e-39, 0, -0.0]
    x[2, 16:32] *= np.float32(1e-30)
    specials = x.copy()
    specials[3, 5] = np.inf
    specials[4, 70] = -np.inf
    specials[5, 33] = np.nan
    tiny = (rng.standard_normal((4, 64)) * 2.0 ** -95).astype(np.float32)   # A ≥ 2**-100
    tiny[0, :6] = [1e-40, -2e-39, 3e-38, 0, -0.0, 1e-45]
    return {
        "finite": (x, -1), "specials": (specials, -1), "finite_axis0": (x[:, :48].T.copy(), 0),
        "3d": (x.reshape(4, 6, 80), -1), "partial": (x[:, :37], -1),
        "zeros": (np.zeros((3, 32), np.float32), -1),
        "tiny": (tiny, -1), "empty": (np.zeros((0, 16), np.float32), -1),
        "tiles": (specials[:, :75], -1, (16, 16)), "tiles_axis0": (x[:21], 0, (16, 16)),
    }


CASES = _cases()


def _check(name, q, dq, conv, variant, per_tensor, dtype="float32"):
    x, ax, bs = (CASES[name] + (16,))[:3]
    with np.errstate(over="ignore"):                       # float16: huge rows become ±inf
        x = x.astype(getattr(ml_dtypes, dtype, None) or np.dtype(dtype))
    kw = dict(variant=variant, per_tensor_scale=per_tensor, axis=ax, block_size=bs)
    c, s, t = fp8core.quantize_nvfp4(x, **kw)
    c2, s2, t2 = q(conv(x), **kw)
    assert np.array_equal(c, np.asarray(c2)), np.argwhere(c != np.asarray(c2))[:5]
    assert np.array_equal(s, np.asarray(s2)), np.argwhere(s != np.asarray(s2))[:5]
    assert np.asarray(t2).dtype == np.float32 and np.asarray(t2).shape == ()
    assert np.array_equal(_bytes(np.float32(t)), _bytes(np.asarray(t2))), (t, t2)
    for out in ("float32", "bfloat16"):
        d = fp8core.dequantize_nvfp4(c, s, t, axis=ax, block_size=bs,
                                     dtype=getattr(ml_dtypes, out, None) or np.float32)
        d2 = dq(c2, s2, t2, axis=ax, out=out, block_size=bs)
        assert np.array_equal(_bytes(d), _bytes(d2)), (out, np.argwhere(_bytes(d) != _bytes(d2))[:5])


# ---------------------------------------------------------------- torch
@pytest.fixture(scope="module")
def ft():
    pytest.importorskip("torch", reason="torch is not installed")
    import fp8core_torch
    return fp8core_torch


def _torch_fns(ft):
    import torch

    def conv(x):
        if x.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(x))

    def dq(c, s, t, axis, out, block_size):
        y = ft.dequantize_nvfp4(c, s, t, axis=axis, block_size=block_size, dtype=getattr(torch, out))
        return (y.view(torch.int16) if out == "bfloat16" else y).numpy()
    return conv, dq


@pytest.mark.parametrize("variant,per_tensor", VARIANTS, ids=IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_torch_equals_reference(ft, name, variant, per_tensor):
    conv, dq = _torch_fns(ft)
    _check(name, ft.quantize_nvfp4, dq, conv, variant, per_tensor)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant,per_tensor", VARIANTS, ids=IDS)
def test_torch_low_precision_inputs(ft, dtype, variant, per_tensor):
    conv, dq = _torch_fns(ft)
    _check("specials", ft.quantize_nvfp4, dq, conv, variant, per_tensor, dtype)


# ---------------------------------------------------------------- JAX
@pytest.fixture(scope="module")
def fj():
    pytest.importorskip("jax", reason="jax is not installed")
    import fp8core_jax
    return fp8core_jax


def _jax_fns(fj, jit):
    import jax
    import jax.numpy as jnp

    def q(x, **kw):
        if jit:
            return jax.jit(lambda a: fj.quantize_nvfp4(a, **kw))(x)
        return fj.quantize_nvfp4(x, **kw)

    def dq(c, s, t, axis, out, block_size):
        f = (lambda c, s, t: fj.dequantize_nvfp4(c, s, t, axis=axis, block_size=block_size,
                                                 dtype=getattr(jnp, out)))
        y = jax.jit(f)(c, s, t) if jit else f(c, s, t)
        return np.asarray(y)
    return q, dq, jnp.asarray


#: quick: every variant on the special blocks (eager), one jitted partial-block case and one
#: tiled case; the rest slow (each case is an XLA compilation, ~0.3–1.5 s).
JAX_QUICK = {("specials", False, v, p) for v, p in VARIANTS} | {
    ("partial", True, "torchao", True), ("tiles", False, "te", True)}
JAX_PARAMS = [pytest.param(name, jit, v, p,
                           marks=() if (name, jit, v, p) in JAX_QUICK else pytest.mark.slow,
                           id=f"{name}-{'jit' if jit else 'eager'}-{i}")
              for name in CASES for jit in (False, True) for (v, p), i in zip(VARIANTS, IDS)]


@pytest.mark.parametrize("name,jit,variant,per_tensor", JAX_PARAMS)
def test_jax_equals_reference(fj, name, variant, per_tensor, jit):
    q, dq, conv = _jax_fns(fj, jit)
    _check(name, q, dq, conv, variant, per_tensor)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant,per_tensor", VARIANTS, ids=IDS)
def test_jax_low_precision_inputs(fj, dtype, variant, per_tensor):
    q, dq, conv = _jax_fns(fj, False)
    _check("specials", q, dq, conv, variant, per_tensor, dtype)


# ---------------------------------------------------------------- rounding, errors
def _midpoints():
    mid, _, _ = nv.e2m1_round_table()
    m = np.concatenate([mid, np.nextafter(mid, 0), np.nextafter(mid, 7), [0, 6, 1e-45]])
    m = np.concatenate([m, -m, [-0.0]]).astype(np.float32)
    return m, m.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


def test_torch_e2m1_rounding_equals_ml_dtypes(ft):
    import torch

    from fp8core_torch import nvfp4 as tn
    m, want = _midpoints()
    assert np.array_equal(tn._round_e2m1(torch.from_numpy(m)).numpy(), want)


def test_jax_e2m1_rounding_equals_ml_dtypes(fj):
    import jax.numpy as jnp

    from fp8core_jax import nvfp4 as jn
    m, want = _midpoints()
    got = np.asarray(jn._round_e2m1(jnp.asarray(m)))
    keep = np.abs(m) >= np.finfo(np.float32).tiny          # XLA:CPU reads a subnormal as ±0
    assert np.array_equal(got[keep], want[keep]) and np.array_equal(got[~keep] & 8, want[~keep] & 8)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_backend_errors_are_the_references(backend):
    if backend == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        import fp8core_torch as b
        x = torch.zeros(2, 32)
    else:
        jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
        import fp8core_jax as b
        x = jnp.zeros((2, 32))
    for kw, exc in ((dict(block_size=32), ValueError), (dict(variant="x"), ValueError),
                    (dict(per_tensor_scale=None), TypeError), (dict(axis=2), ValueError)):
        with pytest.raises(exc) as e_b:
            b.quantize_nvfp4(x, **kw)
        with pytest.raises(exc) as e_r:
            fp8core.quantize_nvfp4(np.zeros((2, 32), np.float32), **kw)
        assert str(e_b.value) == str(e_r.value)
    c, s, t = b.quantize_nvfp4(x)
    with pytest.raises(ValueError, match="block_scales must have shape"):
        b.dequantize_nvfp4(c, s[:, :1], t)
