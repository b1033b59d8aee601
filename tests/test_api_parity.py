"""The two backends mirror each other (and the reference): names, signatures, layer attributes."""

import inspect

import pytest

import fp8core
import fp8core.stats

torch = pytest.importorskip("torch", reason="torch is not installed")
jax = pytest.importorskip("jax", reason="jax is not installed")
import fp8core_jax  # noqa: E402
import fp8core_jax.nn  # noqa: E402
import fp8core_torch  # noqa: E402
from flax import nnx  # noqa: E402

QUANTIZERS = ("quantize_blockwise", "dequantize_blockwise", "quantize_global", "dequantize_global",
              "fake_quantize")


@pytest.mark.parametrize("name", QUANTIZERS)
def test_quantizers_share_the_reference_signature(name):
    ref = list(inspect.signature(getattr(fp8core, name)).parameters)
    assert list(inspect.signature(getattr(fp8core_torch, name)).parameters) == ref
    assert list(inspect.signature(getattr(fp8core_jax, name)).parameters) == ref


@pytest.mark.parametrize("name", ("matmul_fp8_mixed", "matmul_fp8_global"))
def test_matmul_functions_exist_in_both(name):
    t = list(inspect.signature(getattr(fp8core_torch, name)).parameters)
    j = list(inspect.signature(getattr(fp8core_jax, name)).parameters)
    assert t[:2] == j[:2] == ["A", "B"]
    assert {"bsz", "bsz2"} <= set(t) & set(j)


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_layers_expose_the_same_attributes(mode):
    cls_name = "LinearFP8Mixed" if mode == "mixed" else "LinearFP8Global"
    t = getattr(fp8core_torch, cls_name)(96, 160, fw_format="bnb_e4m3", bw_format="e5m2", bsz=64)
    j = getattr(fp8core_jax.nn, cls_name)(96, 160, rngs=nnx.Rngs(0), fw_format="bnb_e4m3",
                                          bw_format="e5m2", bsz=64)
    for attr in ("mode", "in_features", "out_features", "fw_codebook", "bw_codebook", "bsz", "bsz2"):
        assert getattr(t, attr) == getattr(j, attr), attr
    assert t.mode == mode and t.fw_codebook == fp8core.resolve_codebook("bnb_e4m3")
    assert (t.bsz, t.bsz2) == (64, fp8core.select_block_size(160))
    assert fp8core.stats.specs_of_layer(t) == fp8core.stats.specs_of_layer(j)


def test_convert_to_fp8_in_both():
    assert "convert_to_fp8" in fp8core_torch.__all__ and "convert_to_fp8" in fp8core_jax.nn.__all__
