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


# ------------------------------------------------- a whole transformer, torch ↔ NNX
V, D, H, T_LEN = 32, 16, 2, 6


class _TorchConv1D(torch.nn.Module):
    """transformers' Conv1D layout (weight (in, out)), without needing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


def _torch_norm(kind):
    return torch.nn.LayerNorm(D, eps=1e-5) if kind == "layernorm" else torch.nn.RMSNorm(D, eps=1e-6)


def _nnx_norm(kind, rngs):
    return (nnx.LayerNorm(D, epsilon=1e-5, rngs=rngs) if kind == "layernorm"
            else nnx.RMSNorm(D, epsilon=1e-6, rngs=rngs))


class _TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = _torch_norm("layernorm"), _torch_norm("rmsnorm")
        self.q, self.k, self.v, self.o = (torch.nn.Linear(D, D) for _ in range(4))
        self.fc1 = _TorchConv1D(4 * D, D)          # GPT-2's MLP layout
        self.fc2 = torch.nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, t, H, D // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2) / (D // H) ** 0.5
        s = s.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        x = x + self.o(a)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class _TorchLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.blocks = torch.nn.ModuleList([_TorchBlock() for _ in range(2)])
        self.ln_f = _torch_norm("rmsnorm")
        self.head = torch.nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class _NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln1, self.ln2 = _nnx_norm("layernorm", rngs), _nnx_norm("rmsnorm", rngs)
        self.q, self.k, self.v, self.o = (nnx.Linear(D, D, rngs=rngs) for _ in range(4))
        self.fc1 = nnx.Linear(D, 4 * D, rngs=rngs)
        self.fc2 = nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, t, H, D // H).transpose(0, 2, 1, 3) for f in (self.q, self.k, self.v))
        s = q @ k.transpose(0, 1, 3, 2) / (D // H) ** 0.5
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        a = (jax.nn.softmax(s, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, D)
        x = x + self.o(a)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))


class _NNXLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([_NNXBlock(rngs) for _ in range(2)])
        self.ln_f = _nnx_norm("rmsnorm", rngs)
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


CONV1D = ("blocks.0.fc1", "blocks.1.fc1")


def _lm_pair():
    torch.manual_seed(3)
    tm = _TorchLM()
    with torch.no_grad():  # norms away from their init, so a swapped scale/bias would show
        for name, p in tm.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return tm, _NNXLM(nnx.Rngs(0))


def test_transformer_torch_to_nnx_same_loss_and_back():
    """Embedding, LayerNorm (ln1), RMSNorm (ln2, ln_f), attention from linears, a Conv1D-
    layout fc1, a bias-free head: same loss (fp32, 1e-5) and gradients, and back."""
    tm, model = _lm_pair()
    sd = _np_state(tm)
    result = transfer.load_state_dict(model, sd, conv1d=CONV1D)
    assert result == transfer.LoadResult([], [])
    ids = np.random.default_rng(0).integers(0, V, (3, T_LEN))
    tgt = np.roll(ids, -1, axis=1)

    def nnx_loss(m):
        logp = jax.nn.log_softmax(m(jnp.asarray(ids)), -1)
        return -jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], -1).mean()

    t_loss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(ids)).reshape(-1, V),
                                               torch.from_numpy(tgt).reshape(-1))
    j_loss, grads = nnx.jit(nnx.value_and_grad(nnx_loss))(model)
    assert abs(float(j_loss) - t_loss.item()) < 1e-5
    # the gradients agree too (mapped back through the same rule)
    t_loss.backward()
    g = transfer.to_state_dict(nnx.merge(nnx.graphdef(model), grads), conv1d=CONV1D)
    assert sorted(g) == sorted(sd)
    for k, p in tm.named_parameters():
        np.testing.assert_allclose(g[k], p.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)
    back = transfer.to_state_dict(model, conv1d=CONV1D)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # NNX → torch: the state dict loads into a fresh torch model, same logits
    t2 = _TorchLM()
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    with torch.no_grad():
        np.testing.assert_array_equal(t2(torch.from_numpy(ids)).numpy(), tm(torch.from_numpy(ids)).numpy())


def test_transformer_strict_lists_keys_and_non_strict_returns_them():
    tm, model = _lm_pair()
    sd = _np_state(tm)
    sd["extra.weight"] = np.zeros(3, np.float32)
    del sd["blocks.1.ln1.bias"]
    del sd["embed.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['blocks.1.ln1.bias \(NNX blocks.1.ln1.bias\)', "
                                         r"'embed.weight \(NNX embed.embedding\)'\]; "
                                         r"unexpected keys: \['extra.weight'\]"):
        transfer.load_state_dict(model, sd, conv1d=CONV1D)
    before = np.asarray(model.embed.embedding[...]).copy()
    res = transfer.load_state_dict(model, sd, strict=False, conv1d=CONV1D)
    assert res.missing_keys == ["blocks.1.ln1.bias", "embed.weight"]
    assert res.unexpected_keys == ["extra.weight"]
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), before)  # kept its init
    np.testing.assert_array_equal(np.asarray(model.blocks[1].ln1.scale[...]), sd["blocks.1.ln1.weight"])
    # Conv1D weights without conv1d=: (in, out) is not Linear's (out, in) — said so
    with pytest.raises(ValueError, match=r"blocks.0.fc1.weight: expected shape \(64, 16\), got "
                                         r"\(16, 64\) \(a transformers Conv1D stores"):
        transfer.load_state_dict(model, _np_state(tm))


def test_unmapped_nnx_params_and_attention_projections():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(2, 8, rngs=rngs, decode=False)
            self.ein = nnx.Einsum("bd,df->bf", (8, 4), rngs=rngs)

    net = Net(nnx.Rngs(0))
    torch.manual_seed(0)
    sd = {f"attn.{n}.{p}": np.random.default_rng(i).standard_normal(
        (8, 8) if p == "weight" else (8,)).astype(np.float32)
        for i, (n, p) in enumerate((n, p) for n in ("query", "key", "value", "out")
                                   for p in ("weight", "bias"))}
    with pytest.raises(ValueError, match=r"missing keys: none; unexpected keys: none; NNX "
                                         r"parameters with no torch name: \['ein.kernel'\]"):
        transfer.load_state_dict(net, sd)
    res = transfer.load_state_dict(net, sd, strict=False)
    assert res == (["ein.kernel"], [])
    # a LinearGeneral (8,) -> (2, 4) is an nn.Linear(8, 8): kernel = weight.T reshaped
    np.testing.assert_array_equal(np.asarray(net.attn.query.kernel[...]),
                                  sd["attn.query.weight"].T.reshape(8, 2, 4))
    np.testing.assert_array_equal(np.asarray(net.attn.out.kernel[...]),
                                  sd["attn.out.weight"].T.reshape(2, 4, 8))
    back = transfer.to_state_dict(net)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    x = np.random.default_rng(9).standard_normal((1, 3, 8)).astype(np.float32)
    q = x @ sd["attn.query.weight"].T + sd["attn.query.bias"]
    np.testing.assert_allclose(np.asarray(net.attn.query(x)).reshape(1, 3, 8), q, rtol=1e-5, atol=1e-6)
