"""Property tests (hypothesis): random shapes, block sizes, formats and values.

Every torch and JAX path (through the conformance adapters, i.e. their public APIs,
with the path forced as ``python -m conformance`` forces it) must equal the reference
bit for bit, and the reference's error never exceeds half a code step times the scale
(a float64 oracle).
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fp8core
from conformance import compare
from conformance.adapters import BACKENDS

CODEBOOKS = fp8core.ELEMENT_FORMATS + tuple(fp8core.LEGACY_NAMES)
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def quantizer_inputs(draw):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    n = int(np.prod(shape))
    codebook = draw(st.sampled_from(CODEBOOKS))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    blocksize = draw(st.one_of(st.none(), st.integers(1, 70)))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 3.0, 1e4, 1e30]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
    specials = draw(st.lists(st.sampled_from([0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40]), max_size=2))
    for i, v in enumerate(specials):
        x[(seed + 7 * i) % n] = v
    with np.errstate(over="ignore"):
        return x.reshape(shape).astype(DTYPES[dtype]), codebook, blocksize


def _check_backend(name, x, codebook, blocksize):
    backend = BACKENDS[name]
    reason = backend.unavailable()
    if reason:
        pytest.skip(reason)
    with backend.forced():
        _check_forced(backend, x, codebook, blocksize)


def _check_forced(other, x, codebook, blocksize):
    ref = BACKENDS["numpy"]
    if blocksize is None:
        expected = ref.quantize_global(x, codebook)
        actual = other.quantize_global(x, codebook)
    else:
        expected = ref.quantize_blockwise(x, codebook, blocksize)
        actual = other.quantize_blockwise(x, codebook, blocksize)
    for label, e, a in zip(("codes", "absmax"), expected, actual):
        outcome = compare.compare_bits(label, e, np.asarray(a))
        assert outcome.passed, f"{codebook} {x.dtype} {x.shape} bs={blocksize}: {outcome.message}"
    outcome = compare.compare_bits("fake_quantize", ref.fake_quantize(x, codebook, blocksize),
                                   np.asarray(other.fake_quantize(x, codebook, blocksize)))
    assert outcome.passed, f"{codebook} {x.dtype} {x.shape} bs={blocksize}: {outcome.message}"


@pytest.mark.parametrize("path", ["kernel", "ops"])
@SETTINGS
@given(args=quantizer_inputs())
def test_torch_equals_reference(path, args):
    _check_backend(f"torch[{path}]", *args)


@pytest.mark.parametrize("path", ["ffi", "xla"])
@SETTINGS
@given(args=quantizer_inputs())
def test_jax_equals_reference(path, args):
    _check_backend(f"jax[{path}]", *args)


@SETTINGS
@given(quantizer_inputs())
def test_error_at_most_half_a_step_times_the_scale(args):
    x, codebook, blocksize = args
    cb = fp8core.resolve_codebook(codebook)
    x32 = x.astype(np.float32).reshape(-1)
    bs = blocksize or max(x32.size, 1)
    y = fp8core.fake_quantize(x32, cb, blocksize).astype(np.float64)
    pad = -x32.size % bs
    groups = np.concatenate([x32, np.zeros(pad, np.float32)]).reshape(-1, bs)
    absmax = np.repeat(np.max(np.abs(groups.astype(np.float64)), axis=1), bs)[: x32.size]
    ok = np.isfinite(absmax) & (absmax >= float(cb.scale_floor)) & (absmax <= float(cb.scale_ceiling))
    v = np.unique(cb.values[cb.finite]).astype(np.float64)
    s = np.clip(x32.astype(np.float64) * float(cb.max) / np.where(ok, absmax, 1), v[0], v[-1])
    idx = np.clip(np.searchsorted(v, s), 1, v.size - 1)
    half_step = (v[idx] - v[idx - 1]) / 2 * np.where(ok, absmax, 0) / float(cb.max)
    err = np.abs(y - x32.astype(np.float64))
    # float32 scale arithmetic adds a few ulps of x on top of the half step
    allowed = half_step * (1 + 2**-20) + 4 * 2.0**-24 * np.abs(x32.astype(np.float64))
    assert np.all(err[ok] <= allowed[ok]), np.max(err[ok] - allowed[ok])
    assert np.all(np.isnan(y[~np.isfinite(absmax)]))
