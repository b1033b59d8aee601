"""matmul_fp8_mixed / matmul_fp8_global: outputs and straight-through gradients
against float64 products of the reference's dequantized operands."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fp8core
from fp8core import reference as R
import fp8core_torch as T

from _torch_helpers import (  # noqa: F401
    UNIT,
    assert_close,
    f64,
    NP_DTYPES,
    assert_bits_equal,
    pinned_numerics,
    quant_path,
    random_input,
    to_numpy,
    to_torch,
)

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.usefixtures("quant_path")]



def expected(mode, A, B, g, fw="e4m3", bw="e5m2", bsz=None, bsz2=None, bias=None):
    """Float64 products of the reference's dequantized operands (docs/numerics.md §6)."""
    K, N = B.shape
    bsz = bsz or fp8core.select_block_size(K)
    bsz2 = bsz2 or fp8core.select_block_size(N)
    adt = A.dtype
    qb = f64(R.fake_quantize(B, fw).astype(adt))           # quantized in B's dtype, cast to A's
    if mode == "mixed":
        qa = f64(R.fake_quantize(A, fw, bsz))
        qg = f64(R.fake_quantize(g, bw, bsz2)).reshape(-1, N)
        grad_b = f64(A).reshape(-1, K).T @ f64(g).reshape(-1, N)
    else:
        qa = f64(R.fake_quantize(A, fw))
        qg = f64(R.fake_quantize(g, bw)).reshape(-1, N)
        grad_b = qa.reshape(-1, K).T @ qg
    out = qa @ qb + (0 if bias is None else f64(bias.astype(adt)))
    grad_a = (qg @ qb.T).reshape(A.shape)
    # accumulation bound |sum_k a_k b_k| error <= K * u * sum_k |a_k||b_k|
    bound_out = np.abs(qa) @ np.abs(qb) + (0 if bias is None else np.abs(f64(bias)))
    bound_ga = (np.abs(qg) @ np.abs(qb.T)).reshape(A.shape)
    return out, grad_a, grad_b, bound_out, bound_ga


CASES = [((24, 96), 40), ((3, 8, 96), 200), ((2, 3, 4, 70), 33), ((5, 130), 64)]
FNS = {"mixed": T.matmul_fp8_mixed, "global": T.matmul_fp8_global}


@pytest.mark.parametrize("mode", ["mixed", "global"])
@pytest.mark.parametrize("a_shape,n", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_output_and_grads(mode, a_shape, n, dtype):
    rng = np.random.default_rng(len(a_shape) * 1000 + n)
    k = a_shape[-1]
    A = random_input(rng, a_shape, dtype, spread=1.0)
    B = random_input(rng, (k, n), dtype, spread=1.0)
    g = random_input(rng, (*a_shape[:-1], n), dtype, spread=1.0)
    At = to_torch(A).requires_grad_()
    Bt = to_torch(B).requires_grad_()
    out = FNS[mode](At, Bt)
    assert out.dtype == At.dtype and tuple(out.shape) == (*a_shape[:-1], n)
    out.backward(to_torch(g))
    want_out, want_ga, want_gb, b_out, b_ga = expected(mode, A, B, g)
    assert_close(out, want_out, b_out, k, dtype, "out")
    m = int(np.prod(a_shape[:-1]))
    assert_close(At.grad, want_ga, b_ga, n, dtype, "grad_A")
    grad_b_bound = np.abs(want_gb) if mode == "global" else np.abs(
        f64(A).reshape(-1, k).T) @ np.abs(f64(g).reshape(-1, n))
    if mode == "global":
        qa = np.abs(f64(R.fake_quantize(A, "e4m3"))).reshape(-1, k)
        qg = np.abs(f64(R.fake_quantize(g, "e5m2"))).reshape(-1, n)
        grad_b_bound = qa.T @ qg
    assert_close(Bt.grad, want_gb, grad_b_bound, m, dtype, "grad_B")
    assert At.grad.dtype == At.dtype and Bt.grad.dtype == Bt.dtype


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_float64_grads_equal_formulas(mode):
    """float64 inputs: the autograd grads equal the straight-through formulas
    evaluated in float64 from the reference's dequantized operands."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((6, 50))
    B = rng.standard_normal((50, 30))
    g = rng.standard_normal((6, 30))
    At, Bt = to_torch(A).requires_grad_(), to_torch(B).requires_grad_()
    out = FNS[mode](At, Bt, bsz=64, bsz2=64)
    out.backward(to_torch(g))
    want_out, want_ga, want_gb, _, _ = expected(mode, A, B, g, bsz=64, bsz2=64)
    # float64 matmul of operands exact in float32: differences are float64 rounding only
    np.testing.assert_allclose(out.detach().numpy(), want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(At.grad.numpy(), want_ga, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Bt.grad.numpy(), want_gb, rtol=1e-12, atol=1e-12)


def test_gradcheck_bias_path():
    """The bias enters unquantized: a meaningful torch.autograd.gradcheck (float64).
    (A and B pass through piecewise-constant quantizers, whose numerical derivative is
    0 almost everywhere; their straight-through grads are checked against formulas.)"""
    rng = np.random.default_rng(8)
    A = to_torch(rng.standard_normal((4, 16)))
    B = to_torch(rng.standard_normal((16, 8)))
    bias = to_torch(rng.standard_normal(8)).requires_grad_()
    for fn in FNS.values():
        assert torch.autograd.gradcheck(lambda b: fn(A, B, bias=b) ** 2, (bias,))


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_requires_grad_combinations_and_transposed_b(mode):
    rng = np.random.default_rng(9)
    A = random_input(rng, (2, 5, 48), "float32", spread=1.0)
    W = random_input(rng, (20, 48), "float32", spread=1.0)   # weight (N, K); B = W.T view
    g = random_input(rng, (2, 5, 20), "float32", spread=1.0)
    want_out, want_ga, want_gb, b_out, b_ga = expected(mode, A, np.ascontiguousarray(W.T), g)
    for ra, rb in itertools.product([False, True], repeat=2):
        At = to_torch(A).requires_grad_(ra)
        Wt = to_torch(W).requires_grad_(rb)
        out = FNS[mode](At, Wt.t())
        assert_close(out, want_out, b_out, 48, "float32", f"out ra={ra} rb={rb}")
        if not (ra or rb):
            assert not out.requires_grad
            continue
        out.backward(to_torch(g))
        if ra:
            assert_close(At.grad, want_ga, b_ga, 20, "float32", "grad_A")
        else:
            assert At.grad is None
        if rb:
            assert Wt.grad.is_contiguous()
            np.testing.assert_allclose(Wt.grad.numpy().T, want_gb, rtol=1e-4, atol=1e-4)
        else:
            assert Wt.grad is None


@pytest.mark.parametrize("mode", ["mixed", "global"])
@pytest.mark.parametrize("a_shape,b_shape", [((0, 8), (8, 4)), ((3, 0), (0, 4)), ((3, 8), (8, 0)),
                                             ((2, 0, 8), (8, 4))])
def test_empty_inputs(mode, a_shape, b_shape):
    At = torch.zeros(a_shape, requires_grad=True)
    Bt = torch.ones(b_shape, requires_grad=True)
    out = FNS[mode](At, Bt)
    assert tuple(out.shape) == (*a_shape[:-1], b_shape[1])
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert At.grad is not None and torch.count_nonzero(At.grad) == 0 and At.grad.shape == At.shape
    assert Bt.grad is not None and torch.count_nonzero(Bt.grad) == 0 and Bt.grad.shape == Bt.shape


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_bias_and_mixed_dtypes(mode):
    """fp32 B with bf16 / fp16 A: output and grad_A in A's dtype, grad_B / grad_bias fp32."""
    rng = np.random.default_rng(10)
    for adt in ("bfloat16", "float16"):
        A = random_input(rng, (6, 64), adt, spread=1.0)
        B = random_input(rng, (64, 24), "float32", spread=1.0)
        bias = random_input(rng, (24,), "float32", spread=1.0)
        g = random_input(rng, (6, 24), adt, spread=1.0)
        At, Bt, bt = (to_torch(v).requires_grad_() for v in (A, B, bias))
        out = FNS[mode](At, Bt, bias=bt)
        assert out.dtype == At.dtype
        out.backward(to_torch(g))
        want_out, want_ga, _, b_out, b_ga = expected(mode, A, B, g, bias=bias)
        assert_close(out, want_out, b_out + np.abs(f64(bias.astype(A.dtype))), 64, adt, "out")
        assert_close(At.grad, want_ga, b_ga, 24, adt, "grad_A")
        assert At.grad.dtype == At.dtype and Bt.grad.dtype == torch.float32
        assert bt.grad.dtype == torch.float32
        np.testing.assert_allclose(bt.grad.numpy(), f64(g).sum(0), rtol=2e-2, atol=2e-2)


def test_out_argument():
    A, B = torch.randn(4, 16), torch.randn(16, 8)
    out = torch.empty(4, 8)
    with torch.no_grad():
        res = T.matmul_fp8_mixed(A, B, out=out)
    assert res is out
    torch.testing.assert_close(out, T.matmul_fp8_mixed(A, B), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out= is not supported when a gradient is recorded"):
        T.matmul_fp8_global(A, B.requires_grad_(), out=out)
    with torch.no_grad(), pytest.raises(ValueError, match=r"out must be a tensor of shape \(4, 8\)"):
        T.matmul_fp8_mixed(A, B, out=torch.empty(4, 9))


def test_codebook_arguments():
    A, B = torch.randn(4, 16), torch.randn(16, 8)
    code = torch.from_numpy(fp8core.create_fp8_map(True, 4, 3, 8).values.copy())
    ref = T.matmul_fp8_mixed(A, B, fw_code="bnb_e4m3", bw_code="bnb_e5m2")
    for fw in (code, fp8core.resolve_codebook("bnb_e4m3")):
        torch.testing.assert_close(T.matmul_fp8_mixed(A, B, fw, "bnb_e5m2"), ref, rtol=0, atol=0)
    # the formats differ: e4m3 and bnb_e4m3 give different products
    assert not torch.equal(T.matmul_fp8_mixed(A, B), ref)


def test_bad_inputs():
    A, B = torch.randn(4, 16), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"A's last dim must equal B's first dim.*\(4, 16\).*\(15, 8\)"):
        T.matmul_fp8_mixed(A, torch.randn(15, 8))
    with pytest.raises(ValueError, match="B must be 2-D"):
        T.matmul_fp8_global(A, torch.randn(16))
    with pytest.raises(TypeError, match="A must be a floating-point array.*int64"):
        T.matmul_fp8_mixed(torch.ones(4, 16, dtype=torch.int64), B)
    with pytest.raises(TypeError, match="B must be a floating-point array.*complex64"):
        T.matmul_fp8_mixed(A, torch.ones(16, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="bsz must be a positive int, got 0"):
        T.matmul_fp8_mixed(A, B, bsz=0)
    with pytest.raises(ValueError, match="bsz2 must be a positive int, got -5"):
        T.matmul_fp8_global(A, B, bsz2=-5)
    with pytest.raises(ValueError, match="fw_code: unknown format 'e7m7'"):
        T.matmul_fp8_mixed(A, B, fw_code="e7m7")
    with pytest.raises(ValueError, match=r"bw_code: a code tensor must have shape \(256,\), got shape \(255,\)"):
        T.matmul_fp8_mixed(A, B, bw_code=torch.linspace(-1, 1, 255))
    with pytest.raises(TypeError, match="fw_code: a code tensor must be a real floating-point.*int64"):
        T.matmul_fp8_mixed(A, B, fw_code=torch.arange(256))


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_no_grad_and_inference_mode(mode):
    A, B = torch.randn(4, 16), torch.randn(16, 8, requires_grad=True)
    ref = FNS[mode](A, B).detach()
    with torch.no_grad():
        out = FNS[mode](A, B)
    assert not out.requires_grad and torch.equal(out, ref)
    with torch.inference_mode():
        out = FNS[mode](A, B)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("mode", ["mixed", "global"])
def test_autocast_bf16(mode):
    """Under CPU autocast the inputs are cast to bf16 first, as F.linear would."""
    rng = np.random.default_rng(11)
    A = to_torch(random_input(rng, (6, 64), "float32", spread=1.0)).requires_grad_()
    B = to_torch(random_input(rng, (64, 24), "float32", spread=1.0)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FNS[mode](A, B)
    assert out.dtype == torch.bfloat16
    want = FNS[mode](A.detach().bfloat16(), B.detach().bfloat16())
    assert torch.equal(out.detach(), want)
    out.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()


def _saved_bytes(fn) -> int:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_saved_for_backward_memory():
    """What backward reuses in quantized form is saved as uint8 codes + absmax (1 byte
    per element + 4 per group): Mixed keeps A (its weight gradient is full precision)
    and Q(W) as codes; Global keeps both as codes. nn.Linear keeps A and W."""
    A = torch.randn(256, 512, requires_grad=True)
    W = torch.randn(128, 512, requires_grad=True)
    lin = _saved_bytes(lambda: torch.nn.functional.linear(A, W))
    mixed = _saved_bytes(lambda: T.matmul_fp8_mixed(A, W.t()))
    glob = _saved_bytes(lambda: T.matmul_fp8_global(A, W.t()))
    a_bytes, w_bytes = A.numel() * 4, W.numel() * 4
    assert lin == a_bytes + w_bytes                 # nn.Linear: input + weight (a parameter)
    assert mixed == a_bytes + W.numel() + 4          # A + codes(W) + absmax
    assert glob == A.numel() + 4 + W.numel() + 4     # codes(A) + absmax + codes(W) + absmax


@pytest.mark.parametrize("fn", ["mixed", "global"])
def test_results_survive_buffer_reuse(fn):
    """The CPU quantizers reuse freed host buffers (fp8core_torch._pool): results of a
    first call stay unchanged by a second call on other data, and equal those
    computed after the cache is emptied."""
    f = T.matmul_fp8_mixed if fn == "mixed" else T.matmul_fp8_global
    rng = np.random.default_rng(11)
    mk = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32)).requires_grad_()
    a1, a2, b = mk(64, 96), mk(64, 96), mk(96, 80)
    out1 = f(a1, b)
    out1.sum().backward()
    saved = (out1.detach().clone(), a1.grad.clone(), b.grad.clone())
    f(a2, b).pow(2).sum().backward()                     # reuses the buffers
    torch.testing.assert_close(out1.detach(), saved[0], rtol=0, atol=0)
    torch.testing.assert_close(a1.grad, saved[1], rtol=0, atol=0)
    T.empty_cache()
    a1.grad = b.grad = None
    out3 = f(a1, b)
    out3.sum().backward()
    torch.testing.assert_close(out3.detach(), saved[0], rtol=0, atol=0)
    torch.testing.assert_close(b.grad, saved[2], rtol=0, atol=0)
