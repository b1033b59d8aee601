"""torch.compile of a converted two-block model: zero graph breaks (``torch._dynamo.explain``)
and ``fullgraph=True`` forward + backward bit-identical to eager, for every recipe preset and
both bitsandbytes layers (issue 11, item 3).

The oracle is the same converted model run eagerly (itself tested against the numpy
reference elsewhere). Compiling takes ~5–20 s per case, so all of them are ``slow`` (CI runs
them); the quick set compiles a layer with ``fullgraph=True`` in tests/test_torch_linear.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fp8core.recipe as FR
import fp8core_torch as T
from _torch_helpers import pinned_numerics  # noqa: F401  (autouse fixture)

#: No quick case: compiling costs ~9-20 s a preset, and the README test command keeps
#: fullgraph compile-vs-eager of a layer (tests/test_torch_linear.py; fullgraph=True fails on
#: any graph break); every preset here runs with the slow tests in CI.
QUICK_PRESET = None


class _Block(nn.Module):
    """MLP block ``x + down(act(up(norm(x))))``; pre-norm with GELU (a transformer's) or
    no norm with ReLU (see :func:`_check`)."""

    def __init__(self, d: int, h: int, prenorm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d) if prenorm else nn.Identity()
        self.act = F.gelu if prenorm else F.relu
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


def _model(prenorm: bool, **convert_kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(64, 128, prenorm), _Block(64, 128, prenorm))
    T.convert_to_fp8(model, **convert_kwargs)
    n_fp8 = sum(isinstance(m, T.LinearFP8) for m in model.modules())
    assert n_fp8 == 4, f"expected the 4 linears converted, got {n_fp8}"
    return model


def _run(fn, model: nn.Module, x0: torch.Tensor, g: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    out = fn(x)
    out.backward(g)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def _check(convert_kwargs: dict) -> None:
    """Graph breaks are counted on the pre-norm GELU model. Bits are compared on the
    ReLU model without norm: inductor's own LayerNorm and GELU kernels round differently
    from eager (the *unconverted* pre-norm model is not bit-identical compiled either),
    whereas ReLU and the residual add are exact in any fusion — so every difference
    there would come from the FP8 layers."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, 64, generator=gen)
    g = torch.randn(3, 5, 64, generator=gen)
    explained = torch._dynamo.explain(_model(True, **convert_kwargs))(x0)
    assert explained.graph_break_count == 0, (
        f"{convert_kwargs}: {explained.graph_break_count} graph breaks: "
        f"{[str(b.reason) for b in explained.break_reasons]}")
    assert explained.graph_count == 1
    torch._dynamo.reset()
    model = _model(False, **convert_kwargs)
    eager = _run(model, model, x0, g)
    compiled = _run(torch.compile(model, fullgraph=True), model, x0, g)
    for what, a, b in (("out", eager[0], compiled[0]), ("grad_x", eager[1], compiled[1])):
        assert torch.equal(a, b), f"{convert_kwargs}: {what} differs, max |d| = {(a - b).abs().max()}"
    assert eager[2].keys() == compiled[2].keys()
    for name in eager[2]:
        a, b = eager[2][name], compiled[2][name]
        assert torch.equal(a, b), (f"{convert_kwargs}: grad of {name} differs, "
                                   f"max |d| = {(a - b).abs().max()}")


#: docs/numerics.md §14.3: torch.compile of a stochastic recipe does not give eager's bits yet
_SR_COMPILE_BUG = pytest.mark.xfail(strict=True, reason="known bug: NVFP4's stochastic dY under "
                                    "torch.compile differs from eager (grad_x) — open")


def _preset_params():
    return [pytest.param(p, marks=(() if p == QUICK_PRESET else (pytest.mark.slow,))
                         + ((_SR_COMPILE_BUG,) if FR.PRESETS[p].stochastic_slots else ()), id=p)
            for p in FR.PRESETS]


@pytest.mark.parametrize("preset", _preset_params())
def test_recipe_preset_zero_breaks_and_same_bits(preset):
    _check({"recipe": preset})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_bnb_layers_zero_breaks_and_same_bits(mode):
    _check({"mode": mode})
