"""convert_to_fp8 in both frameworks: what it converts, what it reports, when it warns;
Conv1DFP8 (transformers' Conv1D layout) and LinearGeneralFP8 (NNX attention projections)."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fp8core.recipe
from fp8core.conversion import REASONS, ConversionReport, LayerRecord

torch = pytest.importorskip("torch", reason="the conversion tests need torch")
jax = pytest.importorskip("jax", reason="the conversion tests need jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402

import fp8core_jax  # noqa: E402
import fp8core_jax.nn as JN  # noqa: E402
import fp8core_torch as T  # noqa: E402
from tests._torch_helpers import pinned_numerics  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


# ------------------------------------------------------------------ the shared record
def test_report_fraction_and_table_by_hand():
    rep = ConversionReport(
        "torch",
        converted=(LayerRecord("a", "nn.Linear", 4, 8, 32, recipe="ROWWISE"),),
        already_fp8=(LayerRecord("b", "LinearFP8", 8, 8, 64, recipe="TENSORWISE"),),
        skipped=(LayerRecord("c", "nn.Linear", 8, 2, 16, reason=REASONS["filtered"]),
                 LayerRecord("d", "nn.Conv2d", None, None, 8, reason="x")))
    assert (rep.fp8_params, rep.matmul_params) == (96, 120)
    assert rep.fp8_fraction == 0.8
    assert [r.fqn for r in rep.unexpected_skips] == ["d"]
    lines = str(rep).splitlines()
    assert lines[0] == ("convert_to_fp8 (torch): 1 converted, 1 already FP8, 2 high precision; "
                        "80.0% of 120 matmul weights are FP8")
    assert lines[2].split() == ["converted", "a", "nn.Linear", "4", "8", "32", "ROWWISE"]
    assert lines[5].split()[:6] == ["high", "precision", "d", "nn.Conv2d", "-", "-"]
    assert ConversionReport("jax").fp8_fraction == 0.0
    hash(rep)  # frozen and hashable (NNX keeps it as a static attribute)


def test_conversion_record_imports_without_frameworks():
    code = ("import sys\n"
            "for n in ('torch', 'jax', 'jaxlib', 'flax', 'transformers'): sys.modules[n] = None\n"
            "import fp8core.conversion as c\n"
            "print(c.ConversionReport('torch').summary())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("convert_to_fp8 (torch): 0 converted, 0 already FP8, 0 high "
                                  "precision; 0.0% of 0 matmul weights are FP8")


# ------------------------------------------------------------------ torch
class _MyLinear(nn.Linear):
    def forward(self, x):  # a subclass with its own forward
        return super().forward(x) * 2


class _TorchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.conv = nn.Conv1d(16, 16, 1)
        self.sub = _MyLinear(16, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 4, bias=False)


def test_torch_report_lists_converted_and_skipped_and_warns():
    net = _TorchNet()
    with pytest.warns(UserWarning, match=r"left 3 matmul-bearing module\(s\) in high precision "
                                         r"that module_filter_fn did not exclude: 'attn' "
                                         r"\(nn.MultiheadAttention\), 'conv' \(nn.Conv1d\), 'sub' "
                                         r"\(_MyLinear\)"):
        out = T.convert_to_fp8(net, recipe="ROWWISE", module_filter_fn=lambda m, f: f != "head")
    assert out is net
    rep = net.fp8_conversion_report
    assert [(r.fqn, r.kind, r.in_features, r.out_features, r.params, r.recipe)
            for r in rep.converted] == [("inp", "nn.Linear", 8, 16, 128, "ROWWISE"),
                                        ("blocks.0", "nn.Linear", 16, 16, 256, "ROWWISE"),
                                        ("blocks.1", "nn.Linear", 16, 16, 256, "ROWWISE")]
    skipped = {r.fqn: r for r in rep.skipped}
    assert skipped["attn"].reason == REASONS["torch_mha"]
    assert skipped["attn"].params == 3 * 16 * 16 + 16 * 16          # in_proj + out_proj
    assert skipped["conv"].params == 16 * 16
    assert "include_subclasses=True" in skipped["sub"].reason
    assert skipped["head"].reason == REASONS["filtered"]
    assert rep.fp8_fraction == (128 + 512) / (128 + 512 + 1024 + 256 + 256 + 64)
    assert type(net.inp) is T.LinearFP8 and type(net.sub) is _MyLinear
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_torch_subclasses_on_request_and_mha_stays():
    net = _TorchNet()
    with pytest.warns(UserWarning, match="'attn'"):
        T.convert_to_fp8(net, "global", include_subclasses=True)
    rep = net.fp8_conversion_report
    assert type(net.sub) is T.LinearFP8Global
    assert [r.fqn for r in rep.skipped] == ["attn", "conv"]
    # the MHA's out_proj is not converted even with include_subclasses: its forward never runs
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_torch_filtered_only_is_silent_logged_and_nothing_converted_warns(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ctx = _no_warnings()
    try:
        with caplog.at_level(logging.INFO, logger="fp8core"):
            T.convert_to_fp8(model, module_filter_fn=lambda m, f: f != "2")
    finally:
        ctx.__exit__(None, None, None)
    assert "1 converted, 0 already FP8, 1 high precision; 66.7% of 24" in caplog.text
    with pytest.warns(UserWarning, match=r"converted no layer \(1 layer\(s\) were FP8 already\); "
                                         r"1 matmul-bearing module\(s\) stay high precision: '2'"):
        T.convert_to_fp8(model, module_filter_fn=lambda m, f: f != "2")
    assert model.fp8_conversion_report.already_fp8[0].recipe == "BNB_MIXED"
    with pytest.warns(UserWarning, match="converted no layer; 0 matmul-bearing"):
        T.convert_to_fp8(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="include_subclasses must be True or False, got 1"):
        T.convert_to_fp8(model, include_subclasses=1)


def test_torch_model_that_is_a_layer_carries_its_report():
    new = T.convert_to_fp8(nn.Linear(4, 3), recipe="TENSORWISE")
    assert type(new) is T.LinearFP8
    assert new.fp8_conversion_report.converted[0].fqn == ""


@pytest.mark.parametrize("how", ["ROWWISE", "BNB_MIXED", "BNB_GLOBAL"])
def test_conv1dfp8_equals_matmul_fp8_and_linearfp8(how):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)           # Conv1D layout (nx, nf)
    b = torch.randn(128, generator=g)
    x = torch.randn(3, 5, 64, generator=g)
    layer = T.Conv1DFP8(128, 64, recipe=how)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    lin = T.LinearFP8(64, 128, recipe=how)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        lin.bias.copy_(b)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    y_layer = layer(xs[0])
    if how == "BNB_MIXED":
        y_fn = T.matmul_fp8_mixed(xs[1], layer.weight, bias=layer.bias)
    elif how == "BNB_GLOBAL":
        y_fn = T.matmul_fp8_global(xs[1], layer.weight, bias=layer.bias)
    else:
        y_fn = T.matmul_fp8(xs[1], layer.weight, recipe=how, bias=layer.bias)
    y_lin = lin(xs[2])
    assert y_layer.shape == (3, 5, 128)
    assert torch.equal(y_layer, y_fn) and torch.equal(y_layer, y_lin)
    # an independent figure: within FP8's error of the float64 product
    exact = x.double() @ w.double() + b.double()
    rel = ((y_layer.double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.1
    gy = torch.randn(3, 5, 128, generator=g)
    y_layer.backward(gy)
    y_lin.backward(gy)
    assert torch.equal(xs[0].grad, xs[2].grad)
    assert torch.equal(layer.weight.grad, lin.weight.grad.t())
    assert torch.equal(layer.bias.grad, lin.bias.grad)
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    assert "nf=128, nx=64" in repr(layer)


def test_conv1dfp8_errors():
    with pytest.raises(ValueError, match=r"input has 7 features .* Conv1DFP8\(nf=4, nx=6\) "
                                         r"expects 6"):
        T.Conv1DFP8(4, 6)(torch.randn(2, 7))
    with pytest.raises(TypeError, match="conv1d must be a transformers Conv1D"):
        T.Conv1DFP8.from_conv1d(nn.ReLU(), recipe="ROWWISE")


# ------------------------------------------------------------------ JAX / NNX
class _MyNNXLinear(nnx.Linear):
    pass


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(8, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, 16, rngs=rngs, decode=False)
        self.ein = nnx.Einsum("btd,df->btf", (16, 16), rngs=rngs)
        self.sub = _MyNNXLinear(16, 16, rngs=rngs)
        self.batched = nnx.LinearGeneral(16, 8, batch_axis={0: 3}, rngs=rngs)
        self.head = nnx.Linear(16, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attn(self.inp(x)))


def test_nnx_report_converts_attention_and_reports_the_rest():
    net = _NNXNet(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"left 3 matmul-bearing module\(s\) .*'batched' "
                                         r"\(nnx.LinearGeneral\), 'ein' \(nnx.Einsum\), 'sub' "
                                         r"\(_MyNNXLinear\)"):
        out = JN.convert_to_fp8(net, recipe="ROWWISE", module_filter_fn=lambda m, f: f != "head")
    assert out is net
    rep = net.fp8_conversion_report
    assert rep.framework == "jax"
    assert sorted(r.fqn for r in rep.converted) == ["attn.key", "attn.out", "attn.query",
                                                    "attn.value", "inp"]
    assert {r.fqn: r.reason for r in rep.skipped} == {
        "batched": REASONS["linear_general"].format(axis=(-1,)),
        "ein": REASONS["einsum"].format(einsum="'btd,df->btf'"),
        "sub": REASONS["subclass"].format(base="nnx.Linear"),
        "head": REASONS["filtered"]}
    assert rep.fp8_fraction == (128 + 4 * 256) / (128 + 4 * 256 + 256 + 256 + 3 * 128 + 64)
    assert isinstance(net.attn.query, JN.LinearGeneralFP8)
    # nnx.jit takes the model with the report attached (a static attribute)
    x = jnp.ones((2, 8))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, v: m.inp(v))(net, x)),
                                  np.asarray(net.inp(x)))
    with pytest.raises(TypeError, match="include_subclasses must be True or False"):
        JN.convert_to_fp8(net, include_subclasses="yes")


def test_nnx_subclass_on_request_and_layer_model():
    net = _NNXNet(nnx.Rngs(0))
    with pytest.warns(UserWarning, match="'batched'"):
        JN.convert_to_fp8(net, "global", include_subclasses=True)
    assert type(net.sub) is JN.LinearFP8Global
    assert net.fp8_conversion_report.converted[-1].recipe == "BNB_GLOBAL"
    with pytest.warns(UserWarning, match=r"converted no layer \(7 layer\(s\) were FP8 already\)"):
        JN.convert_to_fp8(net, "global", include_subclasses=True)
    single = JN.convert_to_fp8(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), recipe="TENSORWISE")
    assert single.fp8_conversion_report.converted[0].fqn == ""


@pytest.mark.parametrize("how", ["ROWWISE", "mixed"])
def test_nnx_attention_bits_equal_hand_written_fp8(how):
    kw = dict(recipe=how) if how != "mixed" else dict(mode="mixed")
    recipe = fp8core.recipe.get_recipe(how) if how != "mixed" else None
    rngs = nnx.Rngs(3)
    mha = nnx.MultiHeadAttention(4, 64, rngs=rngs, decode=False)
    x = jax.random.normal(jax.random.key(2), (2, 6, 64))
    hp = np.asarray(mha(x))
    JN.convert_to_fp8(mha, **kw)
    got = np.asarray(mha(x))

    def proj(v, layer):
        k = layer.kernel[...]
        kin = int(np.prod(layer.in_features))
        w = k.reshape(kin, -1)
        b = layer.bias[...].reshape(-1)
        flat = v.reshape(*v.shape[:v.ndim - len(layer.in_features)], kin)
        y = (fp8core_jax.matmul_fp8(flat, w, recipe=recipe, bias=b) if recipe is not None
             else fp8core_jax.matmul_fp8_mixed(flat, w) + b)
        return y.reshape(*flat.shape[:-1], *layer.out_features)

    q, k, v = proj(x, mha.query), proj(x, mha.key), proj(x, mha.value)
    want = proj(nnx.dot_product_attention(q, k, v), mha.out)
    np.testing.assert_array_equal(got, np.asarray(want))
    rel = np.linalg.norm(got - hp) / np.linalg.norm(hp)
    assert 1e-4 < rel < 0.1


def test_linear_general_fp8_errors():
    layer = JN.LinearGeneralFP8((4, 2), (3,), rngs=nnx.Rngs(0))
    assert layer(jnp.ones((5, 4, 2))).shape == (5, 3)
    with pytest.raises(ValueError, match=r"expects trailing dimensions \(4, 2\)"):
        layer(jnp.ones((5, 8)))
    with pytest.raises(ValueError, match="out_sharding"):
        layer(jnp.ones((5, 4, 2)), out_sharding=object())
    with pytest.raises(TypeError, match="LinearGeneral over its trailing axes"):
        JN.LinearGeneralFP8.from_linear_general(
            nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=nnx.Rngs(0)), recipe="ROWWISE")


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_transformers_conv1d_converts_in_bnb_modes(mode):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(128, 64), nn.GELU(), Conv1D(64, 128))
    old_w = model[0].weight
    seen = []
    T.convert_to_fp8(model, mode, module_filter_fn=lambda m, f: seen.append(type(m)) or True)
    assert seen == [Conv1D, Conv1D]
    assert type(model[0]) is T.Conv1DFP8 and model[0].weight is old_w
    assert model.fp8_conversion_report.converted[0] == LayerRecord(
        "0", "Conv1D", 64, 128, 64 * 128, recipe="BNB_MIXED" if mode == "mixed" else "BNB_GLOBAL")
    x = torch.randn(4, 64)
    fn = T.matmul_fp8_mixed if mode == "mixed" else T.matmul_fp8_global
    with torch.no_grad():
        assert torch.equal(model[0](x), fn(x, model[0].weight, bias=model[0].bias))
    assert T.convert_to_fp8(Conv1D(8, 4), recipe="TENSORWISE").weight.shape == (4, 8)


def test_torch_encoder_layer_fast_path_is_noted():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True,
                                                           dropout=0.0), 2,
                                enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        hp = enc(x)
    with pytest.warns(UserWarning) as rec:
        T.convert_to_fp8(enc, recipe="ROWWISE")
    msgs = [str(w.message) for w in rec]
    assert any("nn.TransformerEncoderLayer 'layers.0', 'layers.1': in eval mode" in m for m in msgs)
    assert any("'layers.0.self_attn' (nn.MultiheadAttention)" in m for m in msgs)
    rep = enc.fp8_conversion_report
    assert [r.fqn for r in rep.converted] == ["layers.0.linear1", "layers.0.linear2",
                                              "layers.1.linear1", "layers.1.linear2"]
    assert "note: nn.TransformerEncoderLayer" in str(rep)
    # what the note says: with gradients the FP8 layers run; the fast path (eval, no
    # gradients) is high precision bit for bit, unless it is switched off
    fp8 = enc(x).detach()
    assert not torch.equal(fp8, hp)
    with torch.no_grad():
        assert torch.equal(enc(x), hp)
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            assert torch.equal(enc(x), fp8)
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)
