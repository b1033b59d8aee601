"""Exhaustive checks of fp8core_jax's two native rounding paths against ml_dtypes.

* codes: the formats in ``NATIVE_CAST_FORMATS`` are rounded with XLA's own
  ``convert`` (after the contract's clamp to [−M, M]);
* values (fused fake_quantize): every native format is rounded with integer
  arithmetic on the float32 bits (``_rne_values``).

Both are compared with ml_dtypes' cast (the reference's) on **every** float32 in
[−M, M], both signs, including float32 subnormals and −0.0. ~20 s per format on 2 CPU cores (155 s for all 7): slow.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fp8core
from fp8core_jax import quantize as jq

CHUNK = 1 << 24


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(jq.NATIVE_CAST_FORMATS))
def test_native_cast_exhaustive(name):
    cb = fp8core.resolve_codebook(name)
    c = jq._constants(cb)
    assert c.native_dtype is not None
    fn = jax.jit(lambda b: jq._round_to_codes(jax.lax.bitcast_convert_type(b, jnp.float32), c))
    top = int(np.float32(cb.max).view(np.uint32))  # bit pattern of +M
    mdt = cb.format.ml_dtype
    for sign in (np.uint32(0), np.uint32(0x80000000)):
        for start in range(0, top + 1, CHUNK):
            bits = np.arange(start, min(start + CHUNK, top + 1), dtype=np.uint32) | sign
            got = np.asarray(fn(bits))
            want = bits.view(np.float32).astype(mdt).view(np.uint8)
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, (
                f"{name}: XLA cast != ml_dtypes at float32 bits {bits[bad[:5]]}: "
                f"got {got[bad[:5]]}, want {want[bad[:5]]}"
            )


@pytest.mark.slow
@pytest.mark.parametrize("name", fp8core.ELEMENT_FORMATS)
def test_integer_rne_values_exhaustive(name):
    cb = fp8core.resolve_codebook(name)
    c = jq._constants(cb)
    fn = jax.jit(lambda b: jax.lax.bitcast_convert_type(
        jq._round_to_values(jax.lax.bitcast_convert_type(b, jnp.float32), c), jnp.uint32))
    top = int(np.float32(cb.max).view(np.uint32))
    mdt = cb.format.ml_dtype
    for sign in (np.uint32(0), np.uint32(0x80000000)):
        for start in range(0, top + 1, CHUNK):
            bits = np.arange(start, min(start + CHUNK, top + 1), dtype=np.uint32) | sign
            got = np.asarray(fn(bits))
            want = bits.view(np.float32).astype(mdt).astype(np.float32).view(np.uint32)
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, (
                f"{name}: integer RNE != ml_dtypes at float32 bits {bits[bad[:5]]}: "
                f"got {got[bad[:5]]}, want {want[bad[:5]]}"
            )


@pytest.mark.parametrize("name", sorted(jq.NATIVE_CAST_FORMATS))
def test_native_decode_all_codes(name):
    """uint8 → 8-bit float → float32 equals the codebook's value table on all 256 codes."""
    cb = fp8core.resolve_codebook(name)
    c = jq._constants(cb)
    codes = np.arange(256, dtype=np.uint8)
    got = np.asarray(jax.jit(lambda k: jq._decode(k, c))(codes))
    want = cb.values256
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{name}: codes {codes[~same]} decode to {got[~same]}, want {want[~same]}"
