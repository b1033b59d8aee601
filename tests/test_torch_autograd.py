"""What fp8core_torch differentiates, the same on both CPU paths (C kernel and torch ops):

* the matmuls and layers: straight-through gradients (tested against the reference in
  test_torch_recipe.py); double backward (``create_graph=True``) is a clear error at the
  backward that asks for it, never second-order terms silently dropped;
* the quantizers and dequantizers: not differentiable — their results carry no gradient,
  whatever requires grad going in.
"""

from __future__ import annotations

import pytest
import torch

import fp8core.recipe as FR
import fp8core_torch as T

from _torch_helpers import quant_path  # noqa: F401

pytestmark = pytest.mark.usefixtures("quant_path")

LAYERS = [("LinearFP8", lambda: T.LinearFP8(8, 4, recipe="ROWWISE")),
          ("LinearFP8Mixed", lambda: T.LinearFP8Mixed(8, 4)),
          ("LinearFP8Global", lambda: T.LinearFP8Global(8, 4))]


@pytest.mark.parametrize("name,make", LAYERS, ids=[n for n, _ in LAYERS])
def test_double_backward_is_a_clear_error(name, make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 8, requires_grad=True)
    loss = layer(x).square().sum()
    with pytest.raises(RuntimeError, match="double backward.*create_graph=True.*not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
    # the ordinary backward still works afterwards and gives a gradient
    loss = layer(x).square().sum()
    (g,) = torch.autograd.grad(loss, x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_double_backward_through_matmul_fp8_is_a_clear_error():
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    out = T.matmul_fp8(a, b, recipe="TENSORWISE").sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, (a, b), create_graph=True)


def test_quantizers_and_dequantizers_carry_no_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    rule = FR.get_recipe("ROWWISE").input
    assert not T.fake_quantize(x, "e4m3", 4).requires_grad
    assert not T.fake_quantize_operand(x, rule).requires_grad
    for t in (*T.quantize_blockwise(x, "e4m3", 4), *T.quantize_global(x, "e4m3"),
              *T.quantize_operand(x, rule)):
        assert not t.requires_grad
    codes, absmax = T.quantize_blockwise(x, "e4m3", 4)
    a = absmax.clone().requires_grad_(True)
    d = T.dequantize_blockwise(codes, a, "e4m3", 4)
    assert not d.requires_grad
    torch.testing.assert_close(d, T.fake_quantize(x, "e4m3", 4), rtol=0, atol=0)
    codes, absmax = T.quantize_global(x, "e4m3")
    assert not T.dequantize_global(codes, absmax.clone().requires_grad_(True), "e4m3").requires_grad
    codes, absmax = T.quantize_operand(x, rule)
    assert not T.dequantize_operand(codes, absmax.clone().requires_grad_(True), rule).requires_grad
