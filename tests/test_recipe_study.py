"""The recipe study end to end (tiny model, a few steps) and the recipe-slot statistics of
fp8core.stats / fp8core_torch.stats / fp8core_jax.stats (the JAX collector under jit)."""

import csv
import importlib.util
import math

import numpy as np
import pytest

from fp8core import recipe as R
from fp8core import stats
from fp8core_experiments.numerics import native_bf16_gemms

HAVE_BACKENDS = all(importlib.util.find_spec(m) is not None
                    for m in ("torch", "jax", "flax", "optax", "fp8core_torch", "fp8core_jax"))
needs_backends = pytest.mark.skipif(
    not HAVE_BACKENDS, reason="needs torch, jax, flax, optax, fp8core_torch and fp8core_jax")
F32 = np.float32


# --- fp8core.stats on recipe slots, against hand-worked values ---------------------------

def test_tensor_slot_equals_the_global_quantizer_stats():
    # TENSORWISE's input slot is one fp32 scale per tensor: the same quantization as
    # quantize_global (a different code path), so the same statistics
    x = np.array([[3.0, -1.5, 1e-3, 0.0], [0.5, 2.0, -0.25, 7.0]], F32)
    assert stats.operand_stats(x, R.TENSORWISE.input) == stats.quantization_stats(x, "e4m3")


def test_scale_clamping_by_hand():
    # e4m3's scale floor is 2**-106 (≈ 1.23e-32, so that M / floor stays finite and the
    # dequantized values normal): an absmax of 1e-37 is clipped up to it
    assert float(R.OperandRule("e4m3").format.scale_floor) == 2.0 ** -106
    s = stats.operand_stats(np.array([[1e-37, 0.0], [1.0, 0.5]], F32),
                            R.OperandRule("e4m3", R.axiswise()))
    assert (s.n_groups, s.n_scale_clamped) == (2, 1)   # row 0 clamped, row 1 (absmax 1) not
    # MX FLOOR e8m0 byte = floor(log2 absmax) - emax(e4m3)=8 + 127: absmax 2**-126 gives -7,
    # clamped to byte 0; absmax 1.0 gives 119 (in range); an all-zero block is not counted
    mx = R.OperandRule("e4m3", R.block(32), "mx_floor")
    x = np.zeros((3, 32), F32)
    x[0, 5] = 2.0 ** -126
    x[1, :] = 1.0
    s = stats.operand_stats(x, mx)
    assert (s.n_groups, s.n_scale_clamped) == (3, 1)


def test_recipe_layer_stats_slots_and_orientation():
    rng = np.random.default_rng(0)
    X, B, g = (rng.standard_normal(s).astype(F32) for s in ((6, 40), (40, 8), (6, 8)))
    recs = stats.recipe_layer_stats("fc", R.MXFP8, X, B, g, step=3)
    assert [r.operand for r in recs] == list(R.SLOTS)
    # weight slot: B along K (axis 0) = W along its rows; dgrad's: B along N
    w = next(r for r in recs if r.operand == "weight").stats
    assert w == stats.operand_stats(B.T, R.MXFP8.weight, axis=-1)
    assert w.n_groups == 8 * 2                            # 8 columns x ceil(40 / 32) blocks
    assert next(r for r in recs if r.operand == "weight_for_grad_input").stats.n_groups == 40
    # reused / high-precision slots have no record
    assert [r.operand for r in stats.recipe_layer_stats("fc", R.BNB_MIXED, X, B, g)] == [
        "input", "weight", "grad_output"]
    assert [r.operand for r in stats.recipe_layer_stats("fc", R.TENSORWISE, X, B)] == [
        "input", "weight"]                               # no dY: forward slots only


def test_native_bf16_flag_check():
    assert native_bf16_gemms(frozenset({"avx2", "amx_bf16"}))
    assert native_bf16_gemms(frozenset({"avx512_bf16"}))
    assert not native_bf16_gemms(frozenset({"avx2", "avx512f"}))


# --- the collectors: torch hooks == JAX taps under jit == fp8core.stats -----------------

X1 = np.random.default_rng(1).standard_normal((2, 3, 40)).astype(F32)
W1 = (np.random.default_rng(2).standard_normal((8, 40)) * 0.1).astype(F32)   # (out, in)
G1 = (np.random.default_rng(3).standard_normal((2, 3, 8)) * 1e-3).astype(F32)  # dL/d out


def torch_records(recipe):
    import torch
    import fp8core_torch
    from fp8core_torch.stats import collect_stats

    model = torch.nn.Sequential()
    model.add_module("fc", fp8core_torch.LinearFP8(40, 8, recipe=recipe))
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(W1))
        model.fc.bias.zero_()
    with collect_stats(model, step=5) as records:
        (model(torch.from_numpy(X1)) * torch.from_numpy(G1)).sum().backward()
    return records


def jax_records(recipe):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from fp8core_jax import nn as fp8nn
    from fp8core_jax import stats as jstats

    class Model(nnx.Module):
        def __init__(self):
            self.fc = fp8nn.LinearFP8(40, 8, recipe=recipe, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x)

    model = Model()
    model.fc.kernel[...] = jnp.asarray(W1.T)
    model.fc.bias[...] = jnp.zeros(8, jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    taps = jstats.zero_taps(model, jnp.asarray(X1))
    assert {k: v.shape for k, v in taps.items()} == {"fc": (2, 3, 8)}
    traced = []

    @jax.jit
    def step(params, taps, x, g):
        traced.append(1)
        def loss_of(p, t):
            m = nnx.merge(graphdef, p, rest)
            with jstats.tapped(m, t) as tap:
                loss = jnp.sum(m(x) * g)
            return loss, tap.operands
        (loss, ops), (grads, dys) = jax.value_and_grad(loss_of, argnums=(0, 1),
                                                       has_aux=True)(params, taps)
        return ops, dys

    ops, dys = step(params, taps, jnp.asarray(X1), jnp.asarray(G1))
    assert traced == [1]                                  # ran as one jitted computation
    assert isinstance(model.fc, fp8nn.LinearFP8)          # the model was not modified
    return jstats.records(model, jax.device_get(ops), jax.device_get(dys), step=5)


@needs_backends
@pytest.mark.parametrize("recipe", ["TENSORWISE", "ROWWISE", "BLOCKWISE_1x128", "MXFP8_FLOOR",
                                    "BNB_MIXED"])
def test_collectors_give_the_reference_records(recipe):
    expected = stats.recipe_layer_stats("fc", recipe, X1, W1.T, G1, step=5)
    t, j = torch_records(recipe), jax_records(recipe)
    assert t == expected, (t, expected)
    assert j == expected, (j, expected)
    # tensor() backward slots with the forward rule reuse its value (orientation-free)
    assert len(expected) == {"TENSORWISE": 3, "ROWWISE": 6, "BLOCKWISE_1x128": 5,
                             "MXFP8_FLOOR": 6, "BNB_MIXED": 3}[recipe]


# --- the study ----------------------------------------------------------------------------

def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_backends
@pytest.mark.parametrize("recipes", [
    ("TENSORWISE",),
    pytest.param(("fp32", "TENSORWISE", "MXFP8"), marks=pytest.mark.slow),  # ~45 s loaded
], ids=",".join)
def test_study_tiny_run(tmp_path, recipes):
    from fp8core_experiments import recipe_study

    out = recipe_study.run(["--steps", "6", "--recipes", ",".join(recipes),
                            "--d-model", "32", "--blocks", "1", "--context", "16",
                            "--batch-size", "4", "--eval-every", "3", "--out-dir", str(tmp_path),
                            "--no-progress"])
    rows = read_csv(tmp_path / "recipe_study.csv")
    assert list(rows[0]) == list(recipe_study.LOG_COLUMNS)
    assert len(rows) == len(recipes) * 2 * 6
    by = {}
    for r in rows:
        by.setdefault((r["recipe"], r["framework"]), []).append(float(r["train_loss"]))
        assert float(r["tokens_per_s"]) > 0
    for key, losses in by.items():
        assert all(math.isfinite(x) for x in losses), key
        # uniform prediction over the vocabulary is log(V) ≈ 5: training starts there
        assert abs(losses[0] - math.log(len(out["corpus"].vocab))) < 0.5, (key, losses[0])
        assert np.mean(losses[3:]) < losses[0], (key, losses)
    for recipe in recipes:
        d1 = abs(by[(recipe, "torch")][0] - by[(recipe, "jax")][0])
        assert d1 <= 1e-5, (recipe, d1)
    # the summary table has a row per recipe with finite numbers, the PNG is a picture
    table = (tmp_path / "recipe_study.md").read_text()
    for recipe in recipes:
        assert f"| {recipe} |" in table
    assert out["passed"]
    png = (tmp_path / "recipe_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000
    st = read_csv(tmp_path / "recipe_study_stats.csv")
    assert {r["recipe"] for r in st} == set(recipes) - {"fp32"}   # fp32 has no FP8 layer
    assert {r["framework"] for r in st} == {"torch", "jax"}
    assert all(0 <= float(r["underflow_pct"]) <= 100 for r in st)
