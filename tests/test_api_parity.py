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
              "fake_quantize", "quantize_nvfp4", "dequantize_nvfp4")


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


# ------------------------------------------------- full signatures, declared exceptions
#: Parameters that exist in one backend only, or whose default differs, each with its
#: reason. Anything not listed must match exactly (name, kind, default); an entry that
#: no longer applies is an error too (stale).
DECLARED = {
    ("matmul_fp8_mixed", "fw_code"): "torch keeps bitsandbytes' positional call shape (fw_code, bw_code, out, bsz, bsz2)",
    ("matmul_fp8_mixed", "bw_code"): "torch: bitsandbytes' name; JAX names it bw_format as its layers do",
    ("matmul_fp8_mixed", "out"): "torch: bitsandbytes' out= (JAX arrays are immutable)",
    ("matmul_fp8_mixed", "fw_format"): "JAX: the layers' name for the forward codebook",
    ("matmul_fp8_mixed", "bw_format"): "JAX: the layers' name for the backward codebook",
    ("matmul_fp8_mixed", "bias"): "torch: fused into the GEMM as nn.Linear does; JAX layers add it after the product",
    ("matmul_fp8_global", "fw_code"): "as matmul_fp8_mixed",
    ("matmul_fp8_global", "bw_code"): "as matmul_fp8_mixed",
    ("matmul_fp8_global", "out"): "as matmul_fp8_mixed",
    ("matmul_fp8_global", "fw_format"): "as matmul_fp8_mixed",
    ("matmul_fp8_global", "bw_format"): "as matmul_fp8_mixed",
    ("matmul_fp8_global", "bias"): "as matmul_fp8_mixed",
    ("dequantize_operand", "dtype"): "default is each framework's float32 dtype object",
    ("dequantize_nvfp4", "dtype"): "default is each framework's float32 dtype object",
    ("LinearFP8", "bias"): "nn.Linear's argument (NNX: use_bias)",
    ("LinearFP8", "device"): "nn.Linear's argument (JAX places arrays by sharding, not per module)",
    ("LinearFP8", "dtype"): "nn.Linear: parameter dtype; nnx.Linear: computation dtype (default None in both)",
    ("LinearFP8", "use_bias"): "nnx.Linear's argument (torch: bias)",
    ("LinearFP8", "param_dtype"): "nnx.Linear's argument",
    ("LinearFP8", "kernel_init"): "nnx.Linear's argument",
    ("LinearFP8", "bias_init"): "nnx.Linear's argument",
    ("LinearFP8", "rngs"): "nnx.Linear's argument",
}
MIRRORED = ("quantize_operand", "dequantize_operand", "fake_quantize_operand", "quantize_nvfp4",
            "dequantize_nvfp4", "matmul_fp8",
            "matmul_fp8_mixed", "matmul_fp8_global", "convert_to_fp8", "LinearFP8")


def _public(name):
    if name in ("convert_to_fp8", "LinearFP8"):
        return getattr(fp8core_torch, name), getattr(fp8core_jax.nn, name)
    return getattr(fp8core_torch, name), getattr(fp8core_jax, name)


def _params(obj):
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    return {n: p for n, p in sig.parameters.items() if n != "self"}


def test_full_signatures_match_except_the_declared():
    used, problems = set(), []
    for name in MIRRORED:
        t, j = (_params(o) for o in _public(name))
        for p in sorted(set(t) | set(j)):
            key = (name, p)
            if p not in t or p not in j:
                (used.add(key) if key in DECLARED else problems.append(f"{name}: {p} only in "
                                                                        f"{'torch' if p in t else 'jax'}"))
                continue
            same = (t[p].kind == j[p].kind and repr(t[p].default) == repr(j[p].default))
            if not same:
                (used.add(key) if key in DECLARED else problems.append(
                    f"{name}({p}): torch {t[p].kind.name}={t[p].default!r} vs jax "
                    f"{j[p].kind.name}={j[p].default!r}"))
        same_t = [p for p in t if p in j and (name, p) not in DECLARED]
        same_j = [p for p in j if p in t and (name, p) not in DECLARED]
        if same_t != same_j:
            problems.append(f"{name}: shared parameters in another order: {same_t} vs {same_j}")
    stale = set(DECLARED) - used
    assert not problems, problems
    assert not stale, f"declared differences that no longer exist: {sorted(stale)}"


def test_recipe_layers_expose_the_same_attributes():
    t = fp8core_torch.LinearFP8(96, 160, recipe="BLOCKWISE_1x128")
    j = fp8core_jax.nn.LinearFP8(96, 160, recipe="BLOCKWISE_1x128", rngs=nnx.Rngs(0))
    for attr in ("in_features", "out_features", "recipe"):
        assert getattr(t, attr) == getattr(j, attr), attr
    assert t.recipe is fp8core.recipe.BLOCKWISE_1x128


#: Public layers that exist in one backend only, each with its reason (an entry that no
#: longer applies — the name missing, or present in the other backend too — is an error).
BACKEND_ONLY = {
    ("torch", "Conv1DFP8"): "transformers' Conv1D (GPT-2) is a torch module; NNX has no Conv1D",
    ("jax", "LinearGeneralFP8"): "nnx.LinearGeneral (MultiHeadAttention's projections) has no "
                                 "torch counterpart (torch attention projections are nn.Linear)",
}


def test_backend_only_layers_are_declared():
    spaces = {"torch": set(fp8core_torch.__all__), "jax": set(fp8core_jax.nn.__all__)}
    for (backend, name), _reason in BACKEND_ONLY.items():
        other = "jax" if backend == "torch" else "torch"
        assert name in spaces[backend] and name not in spaces[other], (backend, name)
    layers = {n for s in spaces.values() for n in s if n.endswith("FP8")}
    undeclared = layers - {n for _, n in BACKEND_ONLY} - (spaces["torch"] & spaces["jax"])
    assert not undeclared, f"layers in one backend only, not in BACKEND_ONLY: {sorted(undeclared)}"
