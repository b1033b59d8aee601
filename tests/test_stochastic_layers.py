"""Stochastic rounding in the matmuls and layers (docs/numerics.md §14.3): every GEMM
operand equals fp8core.reference.linear_operands with the same seed and stream (so the
products are within the float32 accumulation bound of the reference operands' float64
product), torch == JAX, the layers' streams advance per call, convert_to_fp8 gives the
two frameworks the same per-layer seeds, and a 20-step training run gives the same
losses in both up to accumulation order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fp8core.random
import fp8core.recipe as R
from fp8core import reference as ref

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import fp8core_jax as J  # noqa: E402
import fp8core_torch as T  # noqa: E402
from fp8core_jax.nn import convert_to_fp8 as nnx_convert  # noqa: E402


def _sr(rule):
    return dataclasses.replace(rule, rounding="stochastic")


#: stochastic weight (tiles: dgrad reuses the forward's value), stochastic dY in both
#: orientations, a re-quantized stochastic X for wgrad
SR_RECIPE = R.LinearRecipe(
    input=R.OperandRule("e4m3", R.block(32)), weight=_sr(R.OperandRule("e4m3", R.tile(32))),
    grad_output=_sr(R.OperandRule("e5m2", R.block(32))), weight_for_grad_input=R.REUSE,
    input_for_grad_weight=_sr(R.OperandRule("e4m3", R.block(32), sr_bits=3)),
    grad_output_for_grad_weight=R.REUSE, name="SR_TEST")
#: MXFP8 with stochastically rounded gradients (TE's NVFP4 recipe rounds dY so)
MX_SR = R.MXFP8.replace(grad_output=_sr(R.MXFP8.grad_output),
                        grad_output_for_grad_weight=_sr(R.MXFP8.grad_output), name="MXFP8_SR_DY")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((3, 7, 64)).astype(np.float32),
            rng.standard_normal((64, 40)).astype(np.float32),
            rng.standard_normal((3, 7, 40)).astype(np.float32))


def _within(got, a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want, bound = a @ b, np.abs(a) @ np.abs(b) * a.shape[1] * 2.0**-24 + 1e-30
    err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)
    assert np.all(err <= bound), f"{what}: worst excess {np.max(err - bound):.3g}"


@pytest.mark.parametrize("recipe", [SR_RECIPE, MX_SR], ids=str)
def test_matmul_operands_are_the_references(recipe):
    A, B, g = _data()
    ops = ref.linear_operands(A, B, g, recipe, seed=11, stream=5)
    At, Bt = torch.from_numpy(A).requires_grad_(), torch.from_numpy(B).requires_grad_()
    out_t = T.matmul_fp8(At, Bt, recipe=recipe, seed=11, stream=5)
    out_t.backward(torch.from_numpy(g))
    out_j, vjp = jax.vjp(lambda a, b: J.matmul_fp8(a, b, recipe=recipe, seed=11, stream=5), A, B)
    ga_j, gb_j = vjp(g)
    for name, out, ga, gb in (("torch", out_t.detach(), At.grad, Bt.grad),
                              ("jax", out_j, ga_j, gb_j)):
        _within(out, ops["input"], ops["weight"], f"{name} out")
        _within(ga, ops["grad_output"], ops["weight_for_grad_input"].T, f"{name} grad_A")
        _within(gb, ops["input_for_grad_weight"].T, ops["grad_output_for_grad_weight"],
                f"{name} grad_B")
    # another stream draws other bits: some operand moves
    other = ref.linear_operands(A, B, g, recipe, seed=11, stream=6)
    assert any(not np.array_equal(ops[s], other[s]) for s in recipe.stochastic_slots)


def test_jit_traced_stream_compiles_once_and_matches_eager():
    A, B, g = _data(1)
    f = jax.jit(jax.grad(lambda b, s: (J.matmul_fp8(A, b, recipe=SR_RECIPE, seed=3, stream=s)
                                       * g).sum()))
    eager = [jax.grad(lambda b: (J.matmul_fp8(A, b, recipe=SR_RECIPE, seed=3, stream=s) * g)
                      .sum())(B) for s in (0, 1)]
    for s in (0, 1):    # the same operands; jit may order the float32 sums differently
        np.testing.assert_allclose(np.asarray(f(B, jnp.uint32(s))), np.asarray(eager[s]),
                                   rtol=1e-5, atol=1e-5)
    assert f._cache_size() == 1
    assert np.abs(np.asarray(eager[0]) - np.asarray(eager[1])).max() > 1e-3  # streams differ


def test_seed_required_and_validated():
    A, B, _ = _data()
    for fn, a, b in ((T.matmul_fp8, torch.from_numpy(A), torch.from_numpy(B)),
                     (J.matmul_fp8, A, B)):
        with pytest.raises(ValueError, match=r"matmul_fp8: recipe SR_TEST rounds weight, "
                                             r"grad_output, input_for_grad_weight stochastically, "
                                             r"so seed is required"):
            fn(a, b, recipe=SR_RECIPE)
        with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*32\), got float"):
            fn(a, b, recipe=SR_RECIPE, seed=1.5)
        with pytest.raises(ValueError, match=r"stream must be an int in \[0, 2\*\*32\), got -1"):
            fn(a, b, recipe=SR_RECIPE, seed=1, stream=-1)
    # the layers default to seed 0 (convert_to_fp8: per-layer seeds from seed 0)
    assert T.LinearFP8(8, 4, recipe=MX_SR).seed == J.nn.LinearFP8(8, 4, recipe=MX_SR,
                                                                  rngs=nnx.Rngs(0)).seed == 0
    net = T.convert_to_fp8(torch.nn.Sequential(torch.nn.Linear(8, 4)), recipe=MX_SR)
    assert net[0].seed == fp8core.random.layer_seed(0, "0")
    for bad, exc in ((-1, ValueError), (1.0, TypeError)):
        with pytest.raises(exc, match="seed must be an int in"):
            T.LinearFP8(8, 4, recipe=MX_SR, seed=bad)
        with pytest.raises(exc, match="seed must be an int in"):
            J.nn.LinearFP8(8, 4, recipe=MX_SR, rngs=nnx.Rngs(0), seed=bad)


def test_layer_seed_definition():
    """mix32(seed ^ crc32(name)), worked with Python ints here."""
    import zlib

    def mix(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    for seed, name in ((0, "0"), (7, "blocks.1.mlp.fc1"), (2**32 - 1, "")):
        assert fp8core.random.layer_seed(seed, name) == mix(seed ^ zlib.crc32(name.encode()))
    assert fp8core.random.slot_stream(2**32 - 1, 5) == (2**32 - 8 + 5)


class _NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(64, 48, rngs=rngs), nnx.Linear(48, 16, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def test_twenty_steps_same_losses_in_torch_and_jax():
    """The same weights, data, recipe and seed: per-layer seeds from the module paths
    agree, streams advance once per step, and SGD losses agree within 1e-5 relative at
    every step (only accumulation order differs)."""
    torch.manual_seed(0)
    tm = torch.nn.Module()
    tm.layers = torch.nn.ModuleList([torch.nn.Linear(64, 48), torch.nn.Linear(48, 16)])
    tm.forward = lambda x: tm.layers[1](torch.relu(tm.layers[0](x)))
    jm = _NNXMLP(nnx.Rngs(0))
    for tl, jl in zip(tm.layers, jm.layers):
        jl.kernel[...] = jnp.asarray(tl.weight.detach().numpy().T)
        jl.bias[...] = jnp.asarray(tl.bias.detach().numpy())
    T.convert_to_fp8(tm, recipe=MX_SR, seed=42)
    jm = nnx_convert(jm, recipe=MX_SR, seed=42)
    assert [l.seed for l in tm.layers] == [l.seed for l in jm.layers] == [
        fp8core.random.layer_seed(42, f"layers.{i}") for i in range(2)]
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((20, 32, 64)).astype(np.float32)
    ys = rng.standard_normal((20, 32, 16)).astype(np.float32)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)

    @nnx.jit
    def jax_step(model, x, y):
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads))
        return loss

    t_losses, j_losses = [], []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = ((tm(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        loss.backward()
        opt.step()
        t_losses.append(loss.item())
        j_losses.append(float(jax_step(jm, x, y)))
    assert int(tm.layers[0].sr_stream) == int(jm.layers[0].sr_stream[...]) == 20
    np.testing.assert_allclose(j_losses, t_losses, rtol=1e-5)
    assert t_losses[-1] < t_losses[0]
