"""Weight transfer: PyTorch state dicts (as numpy) → NNX models and back.

torch is imported only here, never by fp8core_jax (checked in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fp8core import reference as ref
from fp8core_jax import transfer
from fp8core_jax.nn import LinearFP8Mixed, convert_to_fp8

torch = pytest.importorskip("torch", reason="weight transfer tests need torch")


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _np_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _torch_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 8))


def _nnx_mlp(linear=nnx.Linear):
    return nnx.Sequential(linear(24, 48, rngs=nnx.Rngs(5)), lambda v: jax.nn.gelu(v, approximate=False),
                          linear(48, 8, rngs=nnx.Rngs(6)))


def test_sequential_forward_matches_torch():
    tm = _torch_mlp()
    model = _nnx_mlp()
    transfer.load_state_dict(model, _np_state(tm))
    x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-5, atol=1e-6)
    assert transfer.torch_names(model) == {"0": ("layers", "0"), "2": ("layers", "2")}


def test_fp8_model_from_torch_weights_matches_reference():
    tm = _torch_mlp()
    model = convert_to_fp8(_nnx_mlp(), "mixed")
    transfer.load_state_dict(model, _np_state(tm))
    sd = _np_state(tm)
    x = np.random.default_rng(1).standard_normal((4, 24)).astype(np.float32)
    h = ref.fake_quantize(x, "e4m3", 64).astype(np.float64) @ ref.fake_quantize(
        sd["0.weight"].T.copy(), "e4m3") + sd["0.bias"]
    h = np.asarray(jax.nn.gelu(jnp.asarray(h, jnp.float32), approximate=False))
    want = ref.fake_quantize(h, "e4m3", 64).astype(np.float64) @ ref.fake_quantize(
        sd["2.weight"].T.copy(), "e4m3") + sd["2.bias"]
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-4, atol=1e-5)


class _ListNet(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs), LinearFP8Mixed(6, 6, rngs=rngs)])
        self.proj = nnx.Linear(6, 3, use_bias=False, rngs=rngs)


class _TorchListNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)])
        self.proj = torch.nn.Linear(6, 3, bias=False)


def test_module_list_names_and_round_trip():
    torch.manual_seed(1)
    sd = _np_state(_TorchListNet())
    model = _ListNet(nnx.Rngs(0))
    transfer.load_state_dict(model, sd)
    back = transfer.to_state_dict(model)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
        assert back[k].flags.c_contiguous
    np.testing.assert_array_equal(np.asarray(model.layers[1].kernel[...]), sd["layers.1.weight"].T)
    # NNX → torch: the state dict loads into the torch model
    t2 = _TorchListNet()
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})


def test_single_linear_and_dtype_cast():
    tl = torch.nn.Linear(10, 7)
    layer = LinearFP8Mixed(10, 7, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    transfer.load_linear_state_dict(layer, _np_state(tl))
    assert layer.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(layer.kernel[...], np.float32),
                                  tl.weight.detach().numpy().T.astype(jnp.bfloat16).astype(np.float32))
    assert sorted(transfer.to_state_dict(layer)) == ["bias", "weight"]
    with pytest.raises(TypeError, match="nnx.Linear or LinearFP8"):
        transfer.load_linear_state_dict(nnx.LayerNorm(3, rngs=nnx.Rngs(0)), {})


def test_unmatched_keys_are_listed():
    sd = _np_state(_torch_mlp())
    sd["5.weight"] = np.zeros((2, 2), np.float32)
    del sd["2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: \['2.bias.*unexpected keys: \['5.weight'\]"):
        transfer.load_state_dict(_nnx_mlp(), sd)
    sd = _np_state(_torch_mlp())
    sd["0.weight"] = sd["0.weight"].T
    with pytest.raises(ValueError, match=r"0.weight: expected shape \(48, 24\)"):
        transfer.load_state_dict(_nnx_mlp(), sd)


def test_fp8core_jax_never_imports_torch():
    code = ("import sys, fp8core_jax, fp8core_jax.nn, fp8core_jax.transfer; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
