"""Shared helpers for the torch backend tests (inputs from numpy, bit comparisons)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

NP_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


@pytest.fixture(autouse=True)
def pinned_numerics():
    """TF32 / reduced-precision fp32 matmuls off for the test, restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def to_torch(a: np.ndarray) -> torch.Tensor:
    """numpy (incl. ml_dtypes bfloat16) -> torch, exactly."""
    if a.dtype == NP_DTYPES["bfloat16"]:
        return torch.from_numpy(a.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True, order="C"))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).view(ml_dtypes.bfloat16)
    return t.numpy()


def f32_bits(a) -> np.ndarray:
    """float32 bit patterns with every NaN canonicalised to 0x7FC00000."""
    a = np.asarray(a).astype(np.float32)
    b = a.view(np.uint32).copy()
    b[np.isnan(a)] = 0x7FC00000
    return b


def value_bits(a) -> np.ndarray:
    """Bits of a float array in its own width (fp16/bf16 as uint16), NaNs equal."""
    a = np.asarray(a)
    if a.dtype.itemsize == 8:
        b = a.view(np.uint64).copy()
        b[np.isnan(a)] = 0x7FF8000000000000
        return b
    if a.dtype.itemsize == 2:
        b = a.view(np.uint16).copy()
        b[np.isnan(a.astype(np.float32))] = 0x7FFF
        return b
    return f32_bits(a)


def assert_bits_equal(actual, expected, what: str) -> None:
    a, e = value_bits(actual), value_bits(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    bad = np.flatnonzero(a.reshape(-1) != e.reshape(-1))
    assert bad.size == 0, (
        f"{what}: {bad.size} of {a.size} differ; first at {bad[:5]}: "
        f"got {np.asarray(actual).reshape(-1)[bad[:5]]} want {np.asarray(expected).reshape(-1)[bad[:5]]}"
    )


def random_input(rng: np.random.Generator, shape, dtype: str, spread: float = 6.0) -> np.ndarray:
    """Normal values with a log-uniform magnitude spread, some exact ±0, in ``dtype``."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-spread, spread, shape))
    x = x.astype(np.float64)
    flat = x.reshape(-1)
    flat[::53] = 0.0
    flat[7::53] = -0.0
    if dtype == "float16":
        x = np.clip(x, -60000, 60000)
    return x.astype(NP_DTYPES[dtype])


@pytest.fixture(params=["kernel", "torch-ops"])
def quant_path(request, monkeypatch):
    """Run a test on both CPU quantizer paths: fp8core's C kernel and the torch ops
    (the path CUDA tensors, table codebooks and installs without a compiler take)."""
    from fp8core import _kernel

    if request.param == "kernel" and _kernel._LIB is None:
        pytest.skip("fp8core's C kernel is not built (no C compiler at install time)")
    monkeypatch.setattr(_kernel, "ENABLED", request.param == "kernel")
    return request.param


#: Unit roundoff of each output dtype (the final cast of a float32 product).
UNIT = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8, "float64": 2.0**-24}


def f64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def assert_close(actual, want, bound, k, dtype, what):
    """|actual - want| <= out-dtype rounding + k * 2**-23 * sum |a||b| (+ tiny)."""
    actual = f64(to_numpy(actual))
    tol = UNIT[dtype] * np.abs(want) + (k + 2) * 2.0**-23 * bound + 1e-30
    err = np.abs(actual - want)
    bad = np.flatnonzero(~(err <= tol))
    assert bad.size == 0, (f"{what}: {bad.size} of {err.size} outside tolerance; worst excess "
                           f"{np.max(err - tol):.3g}; got {actual.reshape(-1)[bad[:3]]} "
                           f"want {want.reshape(-1)[bad[:3]]}")


def mlp_errors(convert, label: str) -> tuple[float, float, float]:
    """1024 -> 2048 -> 1024 GELU MLP, batch 10: ``convert(fp32 twin copy)`` vs the fp32 twin
    with the same weights and an MSE loss; returns (mean |output error|, mean |weight-grad
    error|, mean |bias-grad error|) of the first layer, printed with ``label``."""
    from torch import nn

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024))
    fp8 = convert(nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024)))
    fp8.load_state_dict(ref.state_dict())
    rng = np.random.default_rng(0)
    x = to_torch(rng.standard_normal((10, 1024)).astype(np.float32))
    target = to_torch(rng.standard_normal((10, 1024)).astype(np.float32))
    outs = []
    for model in (ref, fp8):
        out = model(x)
        nn.functional.mse_loss(out, target).backward()
        outs.append(out.detach())
    out_err = (outs[0] - outs[1]).abs().mean().item()
    w_err = (ref[0].weight.grad - fp8[0].weight.grad).abs().mean().item()
    b_err = (ref[0].bias.grad - fp8[0].bias.grad).abs().mean().item()
    print(f"{label}: mean |out err| {out_err:.3g}, |w-grad err| {w_err:.3g}, |b-grad err| {b_err:.3g}")
    return out_err, w_err, b_err


def assert_compiled_equals_eager(layer, x_np: np.ndarray, g_np: np.ndarray, *,
                                 fullgraph: bool = False) -> None:
    """``torch.compile(layer)``: forward and every gradient bit-identical to eager."""
    g = to_torch(g_np)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=fullgraph)):
        layer.zero_grad(set_to_none=True)
        if hasattr(layer, "sr_stream"):      # a stochastic recipe: both runs draw stream 0
            layer.sr_stream.zero_()
        x = to_torch(x_np).requires_grad_()
        out = fn(x)
        out.backward(g)
        results.append((out.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for name, a, b in zip(("out", "grad_x", "grad_w", "grad_b"), *results):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
