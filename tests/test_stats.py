"""fp8core.stats against hand-computed values, and the PyTorch / JAX collectors
against the numpy math (same operands in, same records out)."""

import math

import numpy as np
import pytest

from fp8core import stats
from fp8core.stats import quantization_stats

F32 = np.float32


# Hand-worked examples, e4m3 (float8_e4m3fn: M = 448, smallest subnormal 2**-9,
# 3 mantissa bits). Global quantization of x = [2, -1, 1e-6, 0]:
#   absmax = 2, qscale = fl(448 / 2) = 224 (exact)
#   scaled = [448, -224, 2.24e-4, 0]
#   448 -> the max code (saturated); -224 = -1.75 * 2**7 is an e4m3 value;
#   2.24e-4 < 2**-10 (half the smallest subnormal) -> +0 (underflow); 0 -> 0.
#   dscale = fl(2 * fl(1/448)); 448 * dscale and 224 * dscale give back 2 and -1
#   exactly (448 * fl(1/448) rounds to 1 in float32, and the rest are powers of 2).
#   signal = 2² + 1² + (1e-6)² = 5 + 1e-12;  noise = (1e-6 - 0)² = 1e-12
#   SQNR = 10·log10(5e12) = 126.9897 dB
#   underflow = 1 of the 3 non-zero values;  saturated = 1 of 4 (the 2.0)
X = np.array([2.0, -1.0, 1e-6, 0.0], F32)


def test_hand_computed_global():
    s = quantization_stats(X, "e4m3")
    assert (s.numel, s.n_nonzero, s.n_underflow, s.n_saturated, s.n_groups) == (4, 3, 1, 1, 1)
    assert s.underflow_frac == pytest.approx(1 / 3)
    assert s.saturated_frac == pytest.approx(1 / 4)
    # 1e-6 is stored as float32 (9.9999999747e-07): noise = its square
    assert s.noise_energy == pytest.approx(float(F32(1e-6)) ** 2, rel=1e-12)
    assert s.sqnr_db == pytest.approx(10 * math.log10(5 / 1e-12), abs=1e-6)
    assert s.sqnr_db == pytest.approx(126.9897, abs=1e-4)
    assert s.absmax_min == s.absmax_max == 2.0


def test_hand_computed_blockwise():
    # blocksize 2: groups [2, -1] and [1e-6, 0]. The second group has its own
    # absmax 1e-6, so 1e-6 scales to 448 (saturated, no underflow) and comes back
    # as fl(448 * fl(1e-6 * fl(1/448))) = 1e-6 exactly (checked: noise 0).
    # Saturated: 2.0 and 1e-6 -> 2 of 4. Every value is reproduced -> SQNR = inf.
    s = quantization_stats(X, "e4m3", blocksize=2)
    assert (s.n_groups, s.n_underflow, s.n_saturated) == (2, 0, 2)
    assert s.saturated_frac == 0.5 and s.underflow_frac == 0.0
    assert s.noise_energy == 0.0 and s.sqnr_db == math.inf
    assert s.absmax_min == float(F32(1e-6)) and s.absmax_max == 2.0


def test_rounding_error_sqnr():
    # x = [2, -1, 1e-3, 0], global: 1e-3 * 224 = 0.224 lies in the e4m3 binade
    # [0.125, 0.25) with spacing 2**-6: 0.224 / 2**-6 = 14.34 -> 14 * 2**-6 = 0.21875,
    # which dequantizes to 0.21875 / 224 = 2**-10 = 0.0009765625.
    # noise = (1e-3 - 2**-10)² = (2.34375e-5)² = 5.4932e-10; signal = 5 + 1e-6
    # SQNR = 10·log10(5.000001 / 5.4932e-10) = 99.59 dB; nothing underflows.
    s = quantization_stats(np.array([2.0, -1.0, 1e-3, 0.0], F32), "e4m3")
    assert s.n_underflow == 0 and s.n_saturated == 1
    expected_noise = (float(F32(1e-3)) - 2.0**-10) ** 2
    assert s.noise_energy == pytest.approx(expected_noise, rel=1e-4)
    assert s.sqnr_db == pytest.approx(10 * math.log10(5.000001 / expected_noise), abs=1e-3)
    assert s.sqnr_db == pytest.approx(99.59, abs=0.01)


def test_exact_and_zero_tensors_have_infinite_sqnr():
    # [1, -0.5, 0.25, 0]: scaled by 448 -> 448, -224, 112: all e4m3 values.
    s = quantization_stats(np.array([1.0, -0.5, 0.25, 0.0], F32), "e4m3")
    assert s.sqnr_db == math.inf and s.n_saturated == 1
    z = quantization_stats(np.zeros(4, F32), "e4m3")
    assert z.sqnr_db == math.inf
    assert (z.n_nonzero, z.n_underflow, z.n_saturated) == (0, 0, 0)
    assert z.underflow_frac == 0.0 and z.absmax_min == z.absmax_max == 0.0


def test_ties_at_the_maximum_all_saturate():
    # [2, 2, -2, 1]: three elements scale to ±448.
    s = quantization_stats(np.array([2.0, 2.0, -2.0, 1.0], F32), "e5m2")
    assert s.n_saturated == 3 and s.saturated_frac == 0.75


def test_saturation_counts_values_rounding_up_to_max():
    # e4m3 neighbours below 448 are 416; the midpoint 432 ties to 448 (even mantissa).
    # x = [448, 440, 430] with absmax 448 -> qscale 1: 440 rounds to 448 (saturated),
    # 430 rounds to 416 (not).
    s = quantization_stats(np.array([448.0, 440.0, 430.0], F32), "e4m3")
    assert s.n_saturated == 2


def test_nonfinite_groups_are_excluded():
    # blocksize 2: group [nan, 1] is non-finite (2 elements), group [1, 1] is exact.
    s = quantization_stats(np.array([np.nan, 1.0, 1.0, 1.0], F32), "e4m3", blocksize=2)
    assert s.n_nonfinite == 2 and math.isnan(s.sqnr_db)
    assert s.n_saturated == 2 and s.saturated_frac == 1.0
    assert s.absmax_min == s.absmax_max == 1.0


def test_float32_subnormal_counts_as_underflow():
    tiny = np.finfo(F32).smallest_subnormal
    s = quantization_stats(np.array([tiny, -tiny], F32), "e4m3")
    assert (s.n_nonzero, s.n_underflow) == (2, 2)


def test_legacy_table_codebook():
    # bnb maps are normalised to M = 1: x = [1, -1] maps to ±1 exactly.
    s = quantization_stats(np.array([1.0, -1.0, 0.0, 0.0], F32), "bnb_e4m3")
    assert s.n_saturated == 2 and s.sqnr_db == math.inf


def test_merge_is_exact_pooling():
    a = quantization_stats(X, "e4m3")
    b = quantization_stats(np.array([1.0, -0.5, 0.25, 0.0], F32), "e4m3")
    m = stats.merge_stats([a, b])
    assert (m.numel, m.n_nonzero, m.n_underflow, m.n_saturated, m.n_groups) == (8, 6, 1, 2, 2)
    # pooled SQNR = (5 + 1e-12 + 1.3125) / 1e-12
    assert m.sqnr_db == pytest.approx(10 * math.log10(6.3125 / 1e-12), abs=1e-4)
    assert m.absmax_min == 1.0 and m.absmax_max == 2.0
    with pytest.raises(ValueError):
        stats.merge_stats([])


def test_layer_operand_specs():
    mixed = stats.layer_operand_specs("mixed", 64, 128)
    assert {k: (v.codebook.name, v.blocksize) for k, v in mixed.items()} == {
        "activation": ("float8_e4m3fn", 64), "weight": ("float8_e4m3fn", None),
        "gradient": ("float8_e5m2", 128)}
    glob = stats.layer_operand_specs("global", 128, 10, fw_format="e5m2", bw_format="e4m3")
    assert {k: (v.codebook.name, v.blocksize) for k, v in glob.items()} == {
        "activation": ("float8_e5m2", None), "weight": ("float8_e5m2", None),
        "gradient": ("float8_e4m3fn", None)}
    assert stats.layer_operand_specs("mixed", 100, 10, bsz=32, bsz2=-1)["gradient"].blocksize == 64
    with pytest.raises(ValueError, match="mode"):
        stats.layer_operand_specs("fp32", 4, 4)


def test_layer_stats_and_summary_table():
    specs = stats.layer_operand_specs("mixed", 4, 2)
    rng = np.random.default_rng(0)
    operands = {"activation": X.reshape(1, 4), "weight": rng.standard_normal((4, 2)).astype(F32),
                "gradient": np.array([[1e-3, -2e-3]], F32)}
    recs = stats.layer_stats("fc1", specs, operands, step=0)
    recs += stats.layer_stats("fc1", specs, operands, step=1)
    assert [r.operand for r in recs[:3]] == list(stats.OPERANDS)
    assert recs[0].stats == quantization_stats(X, "e4m3", 64)
    rows = stats.summary_rows(recs)
    assert len(rows) == 3 and rows[0]["n_records"] == 2
    assert rows[0]["underflow_pct"] == pytest.approx(100 / 3)
    assert rows[1]["blocksize"] == "global"
    table = stats.summary_table(recs)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["layer", "operand", "format", "block"]
    assert len(lines) == 2 + 3
    assert "126.99" in lines[2] and "33.333" in lines[2]


# --- framework collectors --------------------------------------------------------
# One LinearFP8Mixed(4, 2) layer (block sizes 64/64: one block per operand here),
# input X (the hand-worked tensor above), weight W with B = Wᵀ exactly representable,
# loss = Σ out · R so that dL/d out = R exactly. Both collectors must return the same
# records, equal to fp8core.stats on the same numpy operands.

W = np.array([[1.0, -0.5, 0.25, 0.0], [0.125, 0.0, -1.0, 0.5]], F32)   # (out, in)
R = np.array([[1e-3, -2e-3]], F32)                                       # dL/d out


def expected_records(mode):
    specs = stats.layer_operand_specs(mode, 4, 2)
    return stats.layer_stats("fc", specs, {"activation": X.reshape(1, 4), "weight": W.T,
                                           "gradient": R}, step=7)


def check_records(records, mode):
    assert [(r.layer, r.operand, r.step) for r in records] == [
        ("fc", op, 7) for op in stats.OPERANDS]
    assert records == expected_records(mode)
    act = records[0].stats
    if mode == "mixed" or mode == "global":  # one group either way: the hand-worked values
        assert (act.n_underflow, act.n_saturated) == (1, 1)
        assert act.sqnr_db == pytest.approx(126.9897, abs=1e-4)
    assert records[1].stats.sqnr_db == math.inf          # W is exact in e4m3 (global)


def torch_records(mode):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    fp8core_torch = pytest.importorskip("fp8core_torch", reason="fp8core_torch is not importable")
    from fp8core_torch.stats import collect_stats

    cls = fp8core_torch.LinearFP8Mixed if mode == "mixed" else fp8core_torch.LinearFP8Global
    model = torch.nn.Sequential()
    model.add_module("fc", cls(4, 2, fw_format="e4m3", bw_format="e5m2"))
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(W))
        model.fc.bias.zero_()
    with collect_stats(model, step=7) as records:
        out = model(torch.from_numpy(X.reshape(1, 4)))
        (out * torch.from_numpy(R)).sum().backward()
    return records


def jax_records(mode):
    pytest.importorskip("jax", reason="jax is not installed")
    pytest.importorskip("flax", reason="flax is not installed")
    pytest.importorskip("fp8core_jax", reason="fp8core_jax is not importable")
    import jax.numpy as jnp
    from flax import nnx

    from fp8core_jax.stats import collect_stats
    from fp8core_jax import nn as fp8nn

    cls = fp8nn.LinearFP8Mixed if mode == "mixed" else fp8nn.LinearFP8Global

    class Model(nnx.Module):
        def __init__(self):
            self.fc = cls(4, 2, rngs=nnx.Rngs(0), fw_format="e4m3", bw_format="e5m2")

        def __call__(self, x):
            return self.fc(x)

    model = Model()
    model.fc.kernel[...] = jnp.asarray(W.T)
    model.fc.bias[...] = jnp.zeros(2, jnp.float32)
    records = collect_stats(model, jnp.asarray(X.reshape(1, 4)),
                            lambda out: jnp.sum(out * jnp.asarray(R)), step=7)
    assert isinstance(model.fc, cls)  # the layer was put back
    return records


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_torch_collector(mode):
    check_records(torch_records(mode), mode)


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_jax_collector(mode):
    check_records(jax_records(mode), mode)


def test_collectors_print_the_same_table():
    t, j = torch_records("mixed"), jax_records("mixed")
    assert stats.summary_table(t) == stats.summary_table(j)
