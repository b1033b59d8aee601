"""Helpers shared by tests/test_jax_*.py: bit comparison, seeded numpy inputs, variants."""

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
