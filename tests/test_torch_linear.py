"""LinearFP8Mixed / LinearFP8Global modules, convert_to_fp8, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fp8core_torch as T

from _torch_helpers import (assert_compiled_equals_eager, mlp_errors,  # noqa: F401
                            pinned_numerics, quant_path, to_torch)

pytestmark = [pytest.mark.filterwarnings("ignore:Dynamo detected a call to a .functools.lru_cache"),
              pytest.mark.usefixtures("quant_path")]

CLASSES = {"mixed": T.LinearFP8Mixed, "global": T.LinearFP8Global}
FNS = {"mixed": T.matmul_fp8_mixed, "global": T.matmul_fp8_global}


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_readme_example(mode):
    layer = CLASSES[mode](768, 3072)
    x = torch.randn(32, 128, 768, dtype=torch.float16)
    out = layer(x)
    assert out.shape == (32, 128, 3072) and out.dtype == torch.float16
    out.sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_forward_equals_functional(mode):
    torch.manual_seed(0)
    layer = CLASSES[mode](48, 20, bsz=64, bsz2=32)
    x = to_torch(np.random.default_rng(0).standard_normal((3, 5, 48)).astype(np.float32))
    want = FNS[mode](x, layer.weight.t(), bsz=64, bsz2=32, bias=layer.bias)
    assert torch.equal(layer(x), want)
    layer_nb = CLASSES[mode](48, 20, bias=False)
    assert layer_nb.bias is None
    assert torch.equal(layer_nb(x), FNS[mode](x, layer_nb.weight.t()))


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_state_dict_round_trip(mode):
    lin = nn.Linear(32, 16)
    fp8 = CLASSES[mode](32, 16)
    assert list(fp8.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    fp8.load_state_dict(lin.state_dict())
    assert torch.equal(fp8.weight, lin.weight) and torch.equal(fp8.bias, lin.bias)
    lin2 = nn.Linear(32, 16)
    lin2.load_state_dict(fp8.state_dict())
    assert torch.equal(lin2.weight, lin.weight)


def test_no_buffers_and_dtype_moves_keep_the_codebooks():
    """The layers hold no codebook buffers (nothing for DDP to broadcast); a table
    codebook's constants come from a per-device cache, so .half() cannot round them:
    the output after a dtype round trip equals the fresh layer's."""
    torch.manual_seed(0)
    layer = T.LinearFP8Mixed(16, 8, fw_format="bnb_e4m3", bw_format="e3m4")
    assert list(layer.named_buffers()) == []
    with torch.no_grad():                    # weights exact in float16: the round trip keeps them
        layer.weight.copy_(layer.weight.half().float())
        layer.bias.copy_(layer.bias.half().float())
    x = torch.randn(2, 16)
    want = layer(x)
    layer.half().to("cpu").float()
    assert torch.equal(layer(x), want)


def test_extra_repr_and_block_sizes():
    r = repr(T.LinearFP8Mixed(768, 3072))
    assert "fw_format=float8_e4m3fn" in r and "bw_format=float8_e5m2" in r
    assert "bsz=1024" in r and "bsz2=4096" in r and "mode=mixed" in r
    r = repr(T.LinearFP8Global(10, 5, fw_format="bnb_e4m3", bsz=256, bsz2=128))
    assert "bnb_fp8_map" in r and "bsz=256" in r and "bsz2=128" in r and "mode=global" in r


def test_from_linear_shares_parameters():
    lin = nn.Linear(12, 6)
    fp8 = T.LinearFP8Global.from_linear(lin, bw_format="e4m3")
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert fp8.bw_spec.name == "float8_e4m3fn"
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        T.LinearFP8Mixed.from_linear(nn.Conv1d(1, 1, 1))


def test_convert_to_fp8_with_filter():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                          nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    w0 = model[0].weight
    out = T.convert_to_fp8(model, "global", module_filter_fn=lambda m, fqn: fqn != "2.1")
    assert out is model
    assert type(model[0]) is T.LinearFP8Global and model[0].weight is w0
    assert type(model[2][0]) is T.LinearFP8Global
    assert type(model[2][1]) is nn.Linear
    assert model(torch.randn(3, 8)).shape == (3, 4)
    m2 = T.convert_to_fp8(nn.Sequential(nn.Linear(4, 4)), fw_format="e5m2")
    assert type(m2[0]) is T.LinearFP8Mixed and m2[0].fw_spec.name == "float8_e5m2"
    with pytest.raises(ValueError, match="mode must be one of mixed, global; got 'blockwise'"):
        T.convert_to_fp8(model, "blockwise")
    with pytest.raises(TypeError):
        T.convert_to_fp8(model, "mixed", None)  # options are keyword-only


def test_bad_construction():
    with pytest.raises(TypeError, match=r"input_features must be an int >= 0 \(Python or NumPy integer, not bool\), got float: 3.5"):
        T.LinearFP8Mixed(3.5, 4)
    with pytest.raises(ValueError, match=r"output_features must be an int >= 0 .*, got -1"):
        T.LinearFP8Global(4, -1)
    with pytest.raises(TypeError, match="input_features must be an int >= 0 .*, got str"):
        T.LinearFP8Global("4", 4)
    with pytest.raises(ValueError, match="fw_format: unknown format 'e4m4'"):
        T.LinearFP8Mixed(4, 4, fw_format="e4m4")
    with pytest.raises(ValueError, match="bsz must be a positive int, got 0"):
        T.LinearFP8Mixed(4, 4, bsz=0)
    layer = T.LinearFP8Mixed(4, 4)
    with pytest.raises(ValueError, match=r"input has 5 features \(shape \(2, 5\)\), but "
                                         r"LinearFP8Mixed\(in_features=4, out_features=4\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="input must be a floating-point array.*int64"):
        layer(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_mlp_tracks_fp32_twin(mode):
    """1024 -> 2048 -> 1024 with GELU, batch 10: FP8 vs fp32 with the same weights."""
    out_err, w_err, b_err = mlp_errors(
        lambda m: nn.Sequential(CLASSES[mode].from_linear(m[0]), m[1], CLASSES[mode].from_linear(m[2])),
        mode)
    assert out_err < 0.05, out_err
    assert w_err < 2e-5, w_err
    assert b_err < 2e-5, b_err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_compile_module_same_bits_as_eager_all_modes(mode):
    _compile_check(mode)


def test_compile_module_same_bits_as_eager():
    """torch.compile'd LinearFP8Mixed: forward and grads bit-identical to eager."""
    _compile_check("mixed")


def _compile_check(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = CLASSES[mode](96, 40, bsz=64, bsz2=32)
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((3, 7, 96)).astype(np.float32)
    x_np[0, 0, :5] = 0.0
    assert_compiled_equals_eager(layer, x_np, rng.standard_normal((3, 7, 40)).astype(np.float32))


def test_compile_fake_quantize_same_bits():
    """Compiled blockwise fake_quantize (bf16, partial tail, NaN block) equals the reference."""
    from fp8core import reference as R

    from _torch_helpers import assert_bits_equal, random_input, to_numpy

    torch._dynamo.reset()
    x = random_input(np.random.default_rng(2), (5, 77), "bfloat16")
    x[1, 3] = np.nan
    fq = torch.compile(lambda t: T.fake_quantize(t, "e4m3", 64))
    assert_bits_equal(to_numpy(fq(to_torch(x))), R.fake_quantize(x, "e4m3", 64), "compiled fq")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    from fp8core import reference as R

    x = np.random.default_rng(3).standard_normal((4, 300)).astype(np.float32)
    c, a = T.quantize_blockwise(torch.from_numpy(x).cuda(), "e4m3", 128)
    c_ref, a_ref = R.quantize_blockwise(x, "e4m3", 128)
    np.testing.assert_array_equal(c.cpu().numpy(), c_ref)
    np.testing.assert_array_equal(a.cpu().numpy().view(np.uint32), a_ref.view(np.uint32))
    layer = T.LinearFP8Mixed(300, 50).cuda()
    assert layer(torch.from_numpy(x).cuda()).device.type == "cuda"
