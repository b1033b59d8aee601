"""One small adapter per backend, each calling only that backend's public API.

Every adapter takes and returns numpy arrays (bfloat16 via ml_dtypes), so the
comparisons never depend on a framework. The numpy adapter is the reference:
its quantizers are ``fp8core.reference`` and its matmul/module/training results
are the oracle computed from the reference's dequantized operands.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import numpy as np

import fp8core
from conformance.inputs import NP_DTYPES


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None: ...
    def quantize_blockwise(self, x, codebook, blocksize): ...
    def dequantize_blockwise(self, codes, absmax, codebook, blocksize, dtype): ...
    def quantize_global(self, x, codebook): ...
    def dequantize_global(self, codes, absmax, codebook, dtype): ...
    def fake_quantize(self, x, codebook, blocksize): ...
    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2): ...
    def linear(self, mode, x, weight, bias, fw, bw): ...
    def train(self, mode, params, batches, labels, fw, bw, lr): ...


def _missing(*modules: str) -> str | None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"{m} is not installed"
    return None


# --------------------------------------------------------------------- numpy

class NumpyBackend:
    """The reference quantizers and a float64 / float32 numpy oracle."""

    name = "numpy"

    def unavailable(self):
        return None

    def quantize_blockwise(self, x, codebook, blocksize):
        return fp8core.quantize_blockwise(x, codebook, blocksize)

    def dequantize_blockwise(self, codes, absmax, codebook, blocksize, dtype):
        return fp8core.dequantize_blockwise(codes, absmax, codebook, blocksize, NP_DTYPES[dtype])

    def quantize_global(self, x, codebook):
        return fp8core.quantize_global(x, codebook)

    def dequantize_global(self, codes, absmax, codebook, dtype):
        return fp8core.dequantize_global(codes, absmax, codebook, NP_DTYPES[dtype])

    def fake_quantize(self, x, codebook, blocksize):
        return fp8core.fake_quantize(x, codebook, blocksize)

    # the oracle ------------------------------------------------------------
    @staticmethod
    def operands(mode, a, b, g, fw, bw, bsz, bsz2):
        """The quantized operands (in the compute dtype = A's dtype) of the three products."""
        k, n = b.shape
        bsz = fp8core.select_block_size(k) if bsz in (None, -1) else bsz
        bsz2 = fp8core.select_block_size(n) if bsz2 in (None, -1) else bsz2
        dt = a.dtype
        qb = fp8core.fake_quantize(b, fw).astype(dt)
        if mode == "mixed":
            qa = fp8core.fake_quantize(a, fw, bsz)
            qg = fp8core.fake_quantize(g, bw, bsz2)
            return {"out": (qa, qb), "grad_a": (qg, qb.T), "grad_b": (a.reshape(-1, k).T, g.reshape(-1, n))}
        qa = fp8core.fake_quantize(a, fw)
        qg = fp8core.fake_quantize(g, bw)
        return {"out": (qa, qb), "grad_a": (qg, qb.T), "grad_b": (qa.reshape(-1, k).T, qg.reshape(-1, n))}

    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2):
        ops = self.operands(mode, a, b, g, fw, bw, bsz, bsz2)
        return {name: np.matmul(x.astype(np.float64), y.astype(np.float64)) for name, (x, y) in ops.items()}

    @staticmethod
    def linear_operands(mode, x, weight, fw):
        """``(Q(x), Q(weight))`` of an FP8 linear layer, the weight in x's dtype."""
        k = weight.shape[1]
        qx = fp8core.fake_quantize(x, fw, fp8core.select_block_size(k) if mode == "mixed" else None)
        return qx, fp8core.fake_quantize(weight, fw).astype(x.dtype)

    def linear(self, mode, x, weight, bias, fw, bw):
        qx, qw = self.linear_operands(mode, x, weight, fw)
        return qx.astype(np.float64) @ qw.T.astype(np.float64) + bias.astype(np.float64)

    def train(self, mode, params, batches, labels, fw, bw, lr):
        """The reference MLP (fp8 Linear → ReLU → fp8 Linear, cross-entropy, SGD) in float32 numpy."""
        p = {k: v.astype(np.float32).copy() for k, v in params.items()}
        losses = []
        for x, y in zip(batches, labels):
            h_pre, cache1 = _np_linear(mode, x, p["w1"], p["b1"], fw)
            h = np.maximum(h_pre, 0)
            logits, cache2 = _np_linear(mode, h, p["w2"], p["b2"], fw)
            z = logits - logits.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            losses.append(-logp[np.arange(len(y)), y].mean())
            dlogits = np.exp(logp)
            dlogits[np.arange(len(y)), y] -= 1
            dlogits = (dlogits / len(y)).astype(np.float32)
            dh, dw2, db2 = _np_linear_bwd(mode, dlogits, cache2, bw)
            dh = dh * (h_pre > 0)
            _, dw1, db1 = _np_linear_bwd(mode, dh.astype(np.float32), cache1, bw)
            for name, grad in (("w1", dw1), ("b1", db1), ("w2", dw2), ("b2", db2)):
                p[name] = (p[name] - np.float32(lr) * grad).astype(np.float32)
        return np.array(losses, np.float32)


def _np_linear(mode, x, w, b, fw):
    qx, qw = NumpyBackend.linear_operands(mode, x, w, fw)
    return qx @ qw.T + b, (x, qx, qw)


def _np_linear_bwd(mode, g, cache, bw):
    x, qx, qw = cache
    n = qw.shape[0]
    qg = fp8core.fake_quantize(g, bw, fp8core.select_block_size(n) if mode == "mixed" else None)
    dx = qg @ qw
    dw = (g.T @ x) if mode == "mixed" else (qg.T @ qx)
    return dx, dw, g.sum(axis=0)


# --------------------------------------------------------------------- torch

class TorchBackend:
    name = "torch"

    def unavailable(self):
        return _missing("torch", "fp8core_torch")

    def _t(self, x):
        import torch
        x = np.array(x, order="C", copy=True)  # (np.ascontiguousarray would turn 0-d into 1-d)
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    def _np(self, t):
        import torch
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(NP_DTYPES["bfloat16"])
        return t.numpy()

    def _dtype(self, name):
        import torch
        return getattr(torch, name)

    def quantize_blockwise(self, x, codebook, blocksize):
        import fp8core_torch
        codes, absmax = fp8core_torch.quantize_blockwise(self._t(x), codebook, blocksize)
        return self._np(codes), self._np(absmax)

    def dequantize_blockwise(self, codes, absmax, codebook, blocksize, dtype):
        import fp8core_torch
        return self._np(fp8core_torch.dequantize_blockwise(self._t(codes), self._t(absmax), codebook,
                                                           blocksize, self._dtype(dtype)))

    def quantize_global(self, x, codebook):
        import fp8core_torch
        codes, absmax = fp8core_torch.quantize_global(self._t(x), codebook)
        return self._np(codes), self._np(absmax)

    def dequantize_global(self, codes, absmax, codebook, dtype):
        import fp8core_torch
        return self._np(fp8core_torch.dequantize_global(self._t(codes), self._t(absmax), codebook,
                                                        self._dtype(dtype)))

    def fake_quantize(self, x, codebook, blocksize):
        import fp8core_torch
        return self._np(fp8core_torch.fake_quantize(self._t(x), codebook, blocksize))

    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2):
        import fp8core_torch
        fn = fp8core_torch.matmul_fp8_mixed if mode == "mixed" else fp8core_torch.matmul_fp8_global
        ta = self._t(a).clone().requires_grad_(True)
        tb = self._t(b).clone().requires_grad_(True)
        out = fn(ta, tb, fw_code=fw, bw_code=bw, bsz=bsz or -1, bsz2=bsz2 or -1)
        out.backward(self._t(g))
        return {"out": self._np(out), "grad_a": self._np(ta.grad), "grad_b": self._np(tb.grad)}

    def _layer(self, mode, weight, bias, fw, bw):
        import torch
        import fp8core_torch
        cls = fp8core_torch.LinearFP8Mixed if mode == "mixed" else fp8core_torch.LinearFP8Global
        layer = cls(weight.shape[1], weight.shape[0], fw_format=fw, bw_format=bw)
        layer.load_state_dict({"weight": torch.from_numpy(weight.copy()), "bias": torch.from_numpy(bias.copy())})
        return layer

    def linear(self, mode, x, weight, bias, fw, bw):
        import torch
        with torch.no_grad():
            return self._np(self._layer(mode, weight, bias, fw, bw)(self._t(x)))

    def train(self, mode, params, batches, labels, fw, bw, lr):
        import torch
        l1 = self._layer(mode, params["w1"], params["b1"], fw, bw)
        l2 = self._layer(mode, params["w2"], params["b2"], fw, bw)
        model = torch.nn.Sequential(l1, torch.nn.ReLU(), l2)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        losses = []
        for x, y in zip(batches, labels):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(self._t(x)), torch.from_numpy(y))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return np.array(losses, np.float32)


# ----------------------------------------------------------------------- jax

class JaxBackend:
    name = "jax"

    def unavailable(self):
        return _missing("jax", "flax", "fp8core_jax")

    def _np(self, a):
        return np.asarray(a)

    def quantize_blockwise(self, x, codebook, blocksize):
        import fp8core_jax
        codes, absmax = fp8core_jax.quantize_blockwise(x, codebook, blocksize)
        return self._np(codes), self._np(absmax)

    def dequantize_blockwise(self, codes, absmax, codebook, blocksize, dtype):
        import fp8core_jax
        return self._np(fp8core_jax.dequantize_blockwise(codes, absmax, codebook, blocksize, NP_DTYPES[dtype]))

    def quantize_global(self, x, codebook):
        import fp8core_jax
        codes, absmax = fp8core_jax.quantize_global(x, codebook)
        return self._np(codes), self._np(absmax)

    def dequantize_global(self, codes, absmax, codebook, dtype):
        import fp8core_jax
        return self._np(fp8core_jax.dequantize_global(codes, absmax, codebook, NP_DTYPES[dtype]))

    def fake_quantize(self, x, codebook, blocksize):
        import fp8core_jax
        return self._np(fp8core_jax.fake_quantize(x, codebook, blocksize))

    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2):
        import jax
        import fp8core_jax
        fn = fp8core_jax.matmul_fp8_mixed if mode == "mixed" else fp8core_jax.matmul_fp8_global
        with jax.default_matmul_precision("highest"):
            out, vjp = jax.vjp(lambda x, y: fn(x, y, fw_format=fw, bw_format=bw, bsz=bsz or -1,
                                               bsz2=bsz2 or -1), a, b)
            grad_a, grad_b = vjp(g)
        return {"out": self._np(out), "grad_a": self._np(grad_a), "grad_b": self._np(grad_b)}

    def _layer(self, mode, weight, bias, fw, bw):
        from flax import nnx
        from fp8core_jax import nn as fnn
        from fp8core_jax import transfer
        cls = fnn.LinearFP8Mixed if mode == "mixed" else fnn.LinearFP8Global
        layer = cls(weight.shape[1], weight.shape[0], rngs=nnx.Rngs(0), fw_format=fw, bw_format=bw)
        transfer.load_linear_state_dict(layer, {"weight": weight, "bias": bias})
        return layer

    def linear(self, mode, x, weight, bias, fw, bw):
        import jax
        with jax.default_matmul_precision("highest"):
            return self._np(self._layer(mode, weight, bias, fw, bw)(x))

    def train(self, mode, params, batches, labels, fw, bw, lr):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        class MLP(nnx.Module):
            def __init__(inner, backend):
                inner.l1 = backend._layer(mode, params["w1"], params["b1"], fw, bw)
                inner.l2 = backend._layer(mode, params["w2"], params["b2"], fw, bw)

            def __call__(inner, x):
                return inner.l2(jax.nn.relu(inner.l1(x)))

        model = MLP(self)

        def loss_fn(m, x, y):
            logp = jax.nn.log_softmax(m(x))
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        @nnx.jit
        def step(m, x, y):
            loss, grads = nnx.value_and_grad(loss_fn)(m, x, y)
            state = nnx.state(m, nnx.Param)
            nnx.update(m, jax.tree.map(lambda p, g: p - lr * g, state, grads))
            return loss

        losses = []
        with jax.default_matmul_precision("highest"):
            for x, y in zip(batches, labels):
                losses.append(float(step(model, x, y)))
        return np.array(losses, np.float32)


BACKENDS: dict[str, Backend] = {b.name: b for b in (NumpyBackend(), TorchBackend(), JaxBackend())}
