"""fp8core_torch's MX block scaling (docs/numerics.md §11) against the numpy reference on
both CPU paths: ``quantize_mx`` / ``dequantize_mx`` and MX operand rules in the operand
engine, bit for bit (codes, e8m0 bytes, dequantized values), special blocks included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fp8core
import fp8core.mx as mx
import fp8core_torch as T
from fp8core import reference as R
from fp8core.recipe import OperandRule, block, tile

from _torch_helpers import pinned_numerics, quant_path  # noqa: F401
from test_mx import _special_blocks

pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.usefixtures("quant_path")]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float32)).view(np.uint32)


@pytest.mark.parametrize("fmt", mx.MX_ELEMENT_FORMATS)
@pytest.mark.parametrize("mode", mx.SCALE_MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_quantize_mx_is_the_reference(fmt, mode, dtype):
    x = torch.from_numpy(_special_blocks()).to(getattr(torch, dtype))
    x32 = x.float().numpy()
    codes, scales = fp8core.quantize_mx(x32, fmt, scale_mode=mode)
    t_codes, t_scales = T.quantize_mx(x, fmt, scale_mode=mode)
    assert t_codes.dtype == t_scales.dtype == torch.uint8
    assert np.array_equal(t_codes.numpy(), codes) and np.array_equal(t_scales.numpy(), scales)
    for out in ("float32", "bfloat16"):
        want = fp8core.dequantize_mx(codes, scales, fmt, dtype=out)
        got = T.dequantize_mx(t_codes, t_scales, fmt, dtype=getattr(torch, out)).float().numpy()
        assert np.array_equal(_bits(got), _bits(want)), out


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float6_e3m2fn", "float4_e2m1fn"])
@pytest.mark.parametrize("mode", mx.SCALE_MODES)
def test_mx_operand_rules_are_the_reference(fmt, mode):
    """1×32 blocks along either axis (partial last blocks) and 32×32 tiles, through
    quantize_operand / dequantize_operand / fake_quantize_operand."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((70, 100)) * np.exp2(rng.integers(-20, 20, (70, 1)))).astype(np.float32)
    x[3, 40:70] = 1e-39
    for gran, axis in ((block(32), -1), (block(32), 0), (tile(32), -1)):
        rule = OperandRule(fmt, gran, f"mx_{mode}")
        codes, absmax = R.quantize_operand(x, rule, axis=axis)
        t_codes, t_absmax = T.quantize_operand(torch.from_numpy(x), rule, axis=axis)
        assert np.array_equal(t_codes.numpy(), codes), (gran, axis)
        assert np.array_equal(_bits(t_absmax.numpy()), _bits(absmax))
        want = R.dequantize_operand(codes, absmax, rule, axis=axis)
        got = T.dequantize_operand(t_codes, t_absmax, rule, axis=axis).numpy()
        assert np.array_equal(_bits(got), _bits(want))
        fake = T.fake_quantize_operand(torch.from_numpy(x), rule, axis=axis).numpy()
        assert np.array_equal(_bits(fake), _bits(want))


def test_quantize_mx_axis0_partial_blocks_and_3d():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((70, 6)).astype(np.float32)
    c, s = fp8core.quantize_mx(x, "e2m1", axis=0, scale_mode="even")
    tc, ts = T.quantize_mx(torch.from_numpy(x), "e2m1", axis=0, scale_mode="even")
    assert ts.shape == (3, 6) and np.array_equal(tc.numpy(), c) and np.array_equal(ts.numpy(), s)
    y = T.dequantize_mx(tc, ts, "e2m1", axis=0)
    assert np.array_equal(_bits(y.numpy()), _bits(fp8core.dequantize_mx(c, s, "e2m1", axis=0)))
    x3 = rng.standard_normal((2, 3, 96)).astype(np.float32)
    c, s = fp8core.quantize_mx(x3, "e4m3")
    tc, ts = T.quantize_mx(torch.from_numpy(x3), "e4m3")
    assert ts.shape == (2, 3, 3) and np.array_equal(ts.numpy(), s) and np.array_equal(tc.numpy(), c)


def test_quantize_mx_errors_are_fp8cores():
    x = torch.ones(4, 32)
    with pytest.raises(ValueError, match=r"element_format must be an MX element format"):
        T.quantize_mx(x, "e4m3fnuz")
    with pytest.raises(ValueError, match=r"scale_mode must be one of floor, ceil, even, rceil"):
        T.quantize_mx(x, "e4m3", scale_mode="nearest")
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 1\)"):
        T.dequantize_mx(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8),
                        "e4m3")
    with pytest.raises(TypeError, match=r"scales must be a uint8 tensor, got ndarray"):
        T.dequantize_mx(torch.zeros(4, 32, dtype=torch.uint8), np.zeros((4, 1), np.uint8), "e4m3")
