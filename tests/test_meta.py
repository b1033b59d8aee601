"""Layers and converted models on the ``meta`` device run shape-only, like nn.Linear
(issue 11 item 5). The oracle is nn.Linear / torch.matmul on meta: same output shape and
dtype, same gradient shapes; and the usual meta-init pattern (build on meta, convert,
``to_empty``, load weights) gives the values of a model built on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fp8core_torch as T
from _torch_helpers import pinned_numerics  # noqa: F401  (autouse fixture)

CLASSES = [T.LinearFP8, T.LinearFP8Mixed, T.LinearFP8Global]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_on_meta_matches_nn_linear_shapes(cls, dtype):
    layer = cls(64, 24, device="meta", dtype=dtype)
    ref = nn.Linear(64, 24, device="meta", dtype=dtype)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == dtype
    outs = []
    for m in (layer, ref):
        x = torch.empty(3, 5, 64, device="meta", dtype=dtype, requires_grad=True)
        y = m(x)
        y.sum().backward()
        outs.append((y, x.grad, m.weight.grad, m.bias.grad))
    for got, want in zip(*outs):
        assert got.device.type == "meta"
        assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("kwargs", [{"recipe": "ROWWISE"}, {"mode": "mixed"}, {"mode": "global"}],
                         ids=str)
def test_converted_meta_model_runs_then_materialises(kwargs):
    def build():
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))

    with torch.device("meta"):
        meta_model = build()
    T.convert_to_fp8(meta_model, **kwargs)
    y = meta_model(torch.empty(4, 64, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 64) and y.dtype == torch.float32
    # the meta-init pattern: allocate, load real weights, run
    torch.manual_seed(0)
    cpu_model = T.convert_to_fp8(build(), **kwargs)
    meta_model.to_empty(device="cpu")
    meta_model.load_state_dict(cpu_model.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(meta_model(x), cpu_model(x))


@pytest.mark.parametrize("fn", [
    lambda a, b, **kw: T.matmul_fp8(a, b, recipe="TENSORWISE", **kw),
    lambda a, b, **kw: T.matmul_fp8_mixed(a, b, **kw),
    lambda a, b, **kw: T.matmul_fp8_global(a, b, **kw),
], ids=["matmul_fp8", "mixed", "global"])
def test_matmuls_on_meta(fn):
    a = torch.empty(2, 7, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    b = torch.empty(16, 5, device="meta", requires_grad=True)
    y = fn(a, b)
    want = torch.matmul(a, b.to(a.dtype))
    assert y.device.type == "meta" and (y.shape, y.dtype) == (want.shape, want.dtype)
    y.sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape and b.grad.dtype == b.dtype


def test_bad_input_on_meta_still_raises():
    layer = T.LinearFP8Mixed(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"input has 9 features .*LinearFP8Mixed\(in_features=8"):
        layer(torch.empty(2, 9, device="meta"))
    with pytest.raises(TypeError, match="input must be"):
        layer(torch.empty(2, 8, device="meta", dtype=torch.int32))
