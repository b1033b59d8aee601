"""What fp8core_jax differentiates, the same on both CPU paths (custom call and XLA body),
mirroring tests/test_torch_autograd.py:

* the matmuls and layers: straight-through gradients (tested against the reference in
  test_jax_recipe.py); a second derivative (``grad`` of ``grad``, ``hessian``) is a clear
  RuntimeError at trace time — before, the custom call raised "cannot be differentiated"
  and the XLA body a TypeError about a symbolic zero deep inside;
* the quantizers and dequantizers: a zero derivative (the dequantizers used to differentiate
  through absmax on the XLA path and fail on the custom call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fp8core.recipe as FR
import fp8core_jax as J
from fp8core_jax import nn as jnn
from _jax_testutil import jax_path  # noqa: F401

pytestmark = pytest.mark.usefixtures("jax_path")

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((3, 8)), jnp.float32)
W = jnp.asarray(RNG.standard_normal((8, 4)), jnp.float32)


@pytest.mark.parametrize("call", [
    lambda x: J.matmul_fp8(x, W, recipe="TENSORWISE"),
    lambda x: J.matmul_fp8(x, W, recipe="BLOCKWISE_1x128"),
    lambda x: J.matmul_fp8_mixed(x, W),
    lambda x: J.matmul_fp8_global(x, W),
], ids=["TENSORWISE", "BLOCKWISE_1x128", "mixed", "global"])
def test_second_derivative_is_a_clear_error(call):
    first = jax.grad(lambda x: jnp.sum(call(x) ** 2))
    g = first(X)                                     # a first derivative still works
    assert g.shape == X.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
    with pytest.raises(RuntimeError, match="double backward.*not supported"):
        jax.grad(lambda x: jnp.sum(first(x)))(X)
    with pytest.raises(RuntimeError, match="double backward"):
        jax.hessian(lambda x: jnp.sum(call(x)))(X)


def test_second_derivative_through_a_layer_is_a_clear_error():
    layer = jnn.LinearFP8(8, 4, recipe="ROWWISE", rngs=nnx.Rngs(0))

    def loss(x):
        return jnp.sum(layer(x) ** 2)

    with pytest.raises(RuntimeError, match="double backward"):
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x)))(X)


def test_quantizers_and_dequantizers_have_zero_derivative():
    rule = FR.get_recipe("ROWWISE").input
    for f in (lambda x: J.fake_quantize(x, "e4m3", 4), lambda x: J.fake_quantize(x, "e4m3"),
              lambda x: J.fake_quantize_operand(x, rule)):
        np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(f(x)))(X)), 0.0)
    codes, absmax = J.quantize_blockwise(X, "e4m3", 4)
    g = jax.grad(lambda a: jnp.sum(J.dequantize_blockwise(codes, a, "e4m3", 4)))(absmax)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    # the values are unchanged by the zero derivative
    np.testing.assert_array_equal(np.asarray(J.dequantize_blockwise(codes, absmax, "e4m3", 4)),
                                  np.asarray(J.fake_quantize(X, "e4m3", 4)))
    codes, absmax = J.quantize_global(X, "e4m3")
    g = jax.grad(lambda a: jnp.sum(J.dequantize_global(codes, a, "e4m3")))(absmax)
    assert float(g) == 0.0
    codes, absmax = J.quantize_operand(X, rule)
    g = jax.grad(lambda a: jnp.sum(J.dequantize_operand(codes, a, rule)))(absmax)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
