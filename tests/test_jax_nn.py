"""Flax NNX layers: nnx.Linear parity, dtypes, convert_to_fp8, README example,
and the two-layer MLP accuracy test against its float32 twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fp8core
from fp8core import reference as ref
from fp8core_jax.nn import LinearFP8Global, LinearFP8Mixed, convert_to_fp8
from _jax_testutil import mlp_errors

LAYERS = {"mixed": LinearFP8Mixed, "global": LinearFP8Global}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_readme_example():
    layer = LinearFP8Mixed(768, 3072, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (32, 128, 768), jnp.float16)
    out = layer(x)                                           # (32, 128, 3072), float16
    grads = nnx.grad(lambda m: m(x).astype(jnp.float32).sum())(layer)
    assert out.shape == (32, 128, 3072) and out.dtype == jnp.float16
    assert grads["kernel"][...].shape == (768, 3072) and grads["bias"][...].shape == (3072,)
    assert np.isfinite(np.asarray(grads["kernel"][...])).all()


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_params_like_nnx_linear(mode):
    lin = nnx.Linear(20, 30, rngs=nnx.Rngs(7))
    fp8 = LAYERS[mode](20, 30, rngs=nnx.Rngs(7))
    for name in ("kernel", "bias"):
        a, b = getattr(lin, name)[...], getattr(fp8, name)[...]
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    nb = LAYERS[mode](20, 30, use_bias=False, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert nb.bias is None and nb.kernel[...].dtype == jnp.bfloat16
    assert set(nnx.state(fp8, nnx.Param).keys()) == {"kernel", "bias"}


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_forward_equals_reference_oracle(mode):
    rng = np.random.default_rng(0)
    layer = LAYERS[mode](100, 40, rngs=nnx.Rngs(1))
    layer.bias[...] = jnp.asarray(rng.standard_normal(40).astype(np.float32))
    x = rng.standard_normal((3, 5, 100)).astype(np.float32)
    W, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    x_q = ref.fake_quantize(x, "e4m3", 128) if mode == "mixed" else ref.fake_quantize(x, "e4m3")
    want = x_q.astype(np.float64) @ ref.fake_quantize(W, "e4m3").astype(np.float64) + b
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, v: m(v))(layer, x)), want,
                               rtol=1e-5, atol=1e-5)


def test_dtypes():
    layer = LinearFP8Mixed(64, 16, rngs=nnx.Rngs(0))
    assert layer(jnp.ones((2, 64), jnp.bfloat16)).dtype == jnp.bfloat16  # input's dtype
    assert layer(jnp.ones((2, 64), jnp.float32)).dtype == jnp.float32
    forced = LinearFP8Mixed(64, 16, dtype=jnp.float16, rngs=nnx.Rngs(0))
    assert forced(jnp.ones((2, 64), jnp.float32)).dtype == jnp.float16  # nnx's dtype rule


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_features=-2, out_features=3), ValueError, "in_features must be an int >= 0 .*, got -2"),
        (dict(in_features=3, out_features=-1), ValueError, "out_features must be an int >= 0"),
        (dict(in_features=True, out_features=3), TypeError, "in_features .*not bool.*got bool"),
        (dict(in_features=3.0, out_features=3), TypeError, "in_features"),
        (dict(in_features=3, out_features=3, fw_format="e9"), ValueError, "fw_format"),
        (dict(in_features=3, out_features=3, bsz=0), ValueError, "bsz"),
        (dict(in_features=3, out_features=3, param_dtype=jnp.int32), TypeError, "param_dtype"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LinearFP8Mixed(**kwargs, rngs=nnx.Rngs(0))


def test_bad_call():
    layer = LinearFP8Global(8, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"7 features .*\(in_features=8"):
        layer(jnp.ones((2, 7)))
    with pytest.raises(TypeError, match="inputs must be a floating"):
        layer(jnp.ones((2, 8), jnp.int32))


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Sequential(nnx.Linear(16, 32, rngs=rngs), nnx.gelu,
                                   nnx.Linear(32, 32, rngs=rngs))
        self.head = nnx.Linear(32, 4, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.body(x)))


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_convert_to_fp8_keeps_params(mode):
    net = _Net(nnx.Rngs(0))
    kernels = [net.body.layers[0].kernel, net.body.layers[2].kernel, net.head.kernel]
    seen = []
    out = convert_to_fp8(net, mode, module_filter_fn=lambda m, fqn: seen.append(fqn) or fqn != "head")
    assert out is net
    assert sorted(seen) == ["body.layers.0", "body.layers.2", "head"]
    assert type(net.body.layers[0]) is LAYERS[mode] and type(net.body.layers[2]) is LAYERS[mode]
    assert type(net.head) is nnx.Linear
    assert net.body.layers[0].kernel is kernels[0] and net.body.layers[2].kernel is kernels[1]
    assert net.body.layers[0].bsz == 64 and net.body.layers[0].bsz2 == 64
    y = nnx.jit(lambda m, v: m(v))(net, jnp.ones((3, 16)))
    assert y.shape == (3, 4)
    single = convert_to_fp8(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), mode, fw_format="bnb_e4m3")
    assert type(single) is LAYERS[mode]
    assert single.fw_codebook == fp8core.resolve_codebook("bnb_e4m3")
    with pytest.raises(ValueError, match="mode must be one of"):
        convert_to_fp8(net, "blockwise")


@pytest.mark.slow  # the quick set runs it per preset (BNB_MIXED / BNB_GLOBAL) in test_jax_recipe.py
@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_two_layer_mlp_close_to_fp32_twin(mode):
    e = mlp_errors(mode=mode)
    print(f"{mode}: mean|out err|={e['mean_out']:.3g} mean|W grad err|={e['mean_kernel_grad']:.3g} "
          f"mean|b grad err|={e['mean_bias_grad']:.3g}")
    assert e["mean_out"] < 0.05, e
    assert e["mean_kernel_grad"] < 2e-5, e
    assert e["mean_bias_grad"] < 2e-5, e
