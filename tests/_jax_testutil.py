"""Helpers shared by tests/test_jax_*.py: bit comparison, seeded numpy inputs, variants,
the float32 accumulation bound of the matmul tests, the two-layer MLP twin."""

from __future__ import annotations

import contextlib

import jax
import ml_dtypes
import numpy as np
import pytest

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_UINT = {4: np.uint32, 2: np.uint16, 1: np.uint8, 8: np.uint64}


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(_UINT[a.dtype.itemsize])


def assert_bits_equal(got, want, what: str = "") -> None:
    """Equal bit patterns; float NaNs (any payload/sign) compare equal to each other."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    same = bits(got) == bits(want)
    if got.dtype.kind == "f" or got.dtype == ml_dtypes.bfloat16:
        g32, w32 = got.astype(np.float32), want.astype(np.float32)
        same |= np.isnan(g32) & np.isnan(w32)
    if not same.all():
        idx = np.flatnonzero(~same.reshape(-1))[:8]
        raise AssertionError(
            f"{what}: {idx.size}+ mismatches (of {same.size}) at flat {idx}: "
            f"got {got.reshape(-1)[idx]} (bits {bits(got).reshape(-1)[idx]}), "
            f"want {want.reshape(-1)[idx]} (bits {bits(want).reshape(-1)[idx]})"
        )


def out_eps(dtype) -> float:
    """Half an ulp (relative) of one rounding to ``dtype``."""
    return {np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11,
            np.dtype(ml_dtypes.bfloat16): 2.0**-8}[np.dtype(dtype)]


def assert_close_to_oracle(got, a, b, out_dtype, what, bias=None):
    """``got`` ≈ float64 ``a @ b`` (+ ``bias``), ``a``/``b`` the quantized operands:
    ``|got - want| <= K * 2**-23 * (|a| @ |b|) + eps_out * |a @ b| + subnormal_out / 2``
    (float32 accumulation over K terms and one rounding to the output dtype), plus
    ``eps_out * |want|`` for the rounding of the bias addition."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    prod = a64 @ b64
    k = a64.shape[-1]
    bound = (k * 2.0**-23 * (np.abs(a64) @ np.abs(b64)) + out_eps(out_dtype) * np.abs(prod)
             + float(ml_dtypes.finfo(out_dtype).smallest_subnormal) / 2)
    want = prod
    if bias is not None:
        want = prod + np.asarray(bias, np.float64)
        bound = bound + out_eps(out_dtype) * np.abs(want)
    got = np.asarray(got)
    assert got.dtype == np.dtype(out_dtype), f"{what}: dtype {got.dtype} != {out_dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} outside accumulation bound; worst err "
        f"{err[bad].max()} vs bound {bound[bad].min()}"
    )


def mlp_errors(**convert_kwargs) -> dict[str, float]:
    """bitsandbytes' test_fp8linear: batch 10, 1024 → 2048 → 1024, GELU, loss mean(out),
    an FP8 model (``convert_to_fp8(..., **convert_kwargs)``) vs its float32 twin with
    the same weights. Returns mean and max |error| of the output and of the first
    layer's kernel and bias gradients."""
    import jax.numpy as jnp
    from flax import nnx

    from fp8core_jax.nn import convert_to_fp8

    h, b = 1024, 10
    x = np.random.default_rng(0).standard_normal((b, h)).astype(np.float32)

    def make(linear):
        return nnx.Sequential(linear(h, 2 * h, rngs=nnx.Rngs(1)),
                              lambda v: jax.nn.gelu(v, approximate=False),
                              linear(2 * h, h, rngs=nnx.Rngs(2)))

    fp32 = make(nnx.Linear)
    fp8 = convert_to_fp8(make(nnx.Linear), **convert_kwargs)
    for i in (0, 2):  # same weights (and a check that the conversion kept them)
        np.testing.assert_array_equal(fp32.layers[i].kernel[...], fp8.layers[i].kernel[...])
        fp8.layers[i].bias[...] = fp32.layers[i].bias[...] + 0.01 * (i + 1)
        fp32.layers[i].bias[...] = fp8.layers[i].bias[...]

    def run(model):
        return nnx.value_and_grad(lambda m: m(x).mean())(model)

    (_, g32), (_, g8) = run(fp32), run(fp8)
    diffs = {"out": fp32(x) - fp8(x),
             "kernel_grad": g32["layers"][0]["kernel"][...] - g8["layers"][0]["kernel"][...],
             "bias_grad": g32["layers"][0]["bias"][...] - g8["layers"][0]["bias"][...]}
    out = {}
    for name, d in diffs.items():
        out[f"mean_{name}"] = float(jnp.abs(d).mean())
        out[f"max_{name}"] = float(jnp.abs(d).max())
    return out


@contextlib.contextmanager
def variant(name: str):
    """'jit': the caller jits the whole computation; 'eager': public functions are
    called directly (each runs its own internal jit — what a user gets without
    jax.jit); 'opbyop': jax.disable_jit, every primitive dispatched on its own."""
    if name == "opbyop":
        with jax.disable_jit():
            yield
    else:
        yield


def maybe_jit(fn, name: str):
    return jax.jit(fn) if name == "jit" else fn


@pytest.fixture(params=["kernel", "xla"])
def jax_path(request, monkeypatch):
    """Run a test on both CPU paths of fp8core_jax: the C kernel as an XLA custom call
    and the XLA body (what GPU/TPU lower, and what runs without the kernel). The
    path is a static argument of the jitted cores, so both stay cached."""
    from fp8core import _kernel
    from fp8core_jax import _ffi

    monkeypatch.setattr(_kernel, "ENABLED", request.param == "kernel")
    if request.param == "kernel" and not _ffi.available():
        pytest.skip("fp8core's C kernel is not available to JAX (not built, or no C++ compiler)")
    return request.param
