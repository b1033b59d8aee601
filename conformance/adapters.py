"""One small adapter per backend *path*, each calling only that backend's public API.

Every adapter takes and returns numpy arrays (bfloat16 via ml_dtypes), so the
comparisons never depend on a framework. The numpy adapter is the reference:
its quantizers are ``fp8core.reference`` and its matmul/module/training results
are the oracle computed from the reference's dequantized operands.

On CPU both frameworks would run the same C kernel, so each framework is run on
each of its paths as a separate implementation under test:

* ``torch[kernel]`` / ``torch[ops]``: fp8core_torch with ``fp8core._kernel.ENABLED``
  on / off (it checks the flag on every call);
* ``jax[ffi]`` / ``jax[xla]``: fp8core_jax with the flag on / off (read at trace time
  by ``fp8core_jax.quantize._kernel_path``; the path is a static argument of the
  jitted cores, so both variants are cached side by side).

:meth:`forced` sets the flag for the duration of one case (restoring it after) and
returns a :class:`PathProbe` recording what ran — C kernel calls for torch, the
kernel/XLA decisions for JAX — so the runner can check that the forced path really
ran (:func:`conformance.runner.path_problem`). A path that cannot run here (no
compiler, no FFI wrapper) reports why in :meth:`unavailable` and is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from typing import Protocol

import numpy as np

import fp8core
from fp8core import reference as ref
from fp8core.recipe import LinearRecipe
from conformance.inputs import NP_DTYPES


#: The seed of every stochastically rounded operand (§14): quantize_operand(seed=SEED,
#: stream=0), matmul_fp8(seed=SEED, stream=0); layers LinearFP8(seed=SEED), whose call t (a
#: training step) draws stream t (§14.3).
SEED = 0

@dataclasses.dataclass
class PathProbe:
    """What one backend path did during a case (filled in by :meth:`Backend.forced`).

    Attributes:
      kernel: whether the path is the C-kernel one (None: not applicable, numpy).
      kernel_calls: calls of the C kernel's entry points in ``fp8core._kernel`` (torch).
      decisions: results of ``fp8core_jax.quantize._kernel_path`` (JAX), in call order.
    """

    kernel: bool | None = None
    kernel_calls: int = 0
    decisions: list = dataclasses.field(default_factory=list)


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None: ...
    def forced(self) -> contextlib.AbstractContextManager[PathProbe]: ...
    def quantize_blockwise(self, x, codebook, blocksize): ...
    def dequantize_blockwise(self, codes, absmax, codebook, blocksize, dtype): ...
    def quantize_global(self, x, codebook): ...
    def dequantize_global(self, codes, absmax, codebook, dtype): ...
    def fake_quantize(self, x, codebook, blocksize): ...
    def quantize_operand(self, x, rule, axis): ...
    def dequantize_operand(self, codes, absmax, rule, axis, dtype): ...
    def fake_quantize_operand(self, x, rule, axis): ...
    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2): ...
    def matmul_recipe(self, a, b, g, recipe): ...
    def linear(self, layer, x, weight, bias, fw, bw): ...
    def train(self, layer, params, batches, labels, fw, bw, lr): ...


def _missing(*modules: str) -> str | None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"{m} is not installed"
    return None


def _kernel_unavailable() -> str | None:
    """Why fp8core's C kernel cannot be forced on here, or None."""
    from fp8core import _kernel
    if _kernel._LIB is None:
        return "fp8core's C kernel is not built (no C compiler at install time, or a stale build)"
    from fp8core import _env
    if not _env.flag("FP8CORE_KERNEL", True):
        return f"the C kernel is disabled by FP8CORE_KERNEL={os.environ['FP8CORE_KERNEL']}"
    return None


def _kernel_entry_points() -> tuple[str, ...]:
    """The C kernel's calls (every public function of fp8core._kernel that runs it)."""
    from fp8core import _kernel
    return tuple(n for n in _kernel.__all__
                 if n not in ("available", "supports", "scale_rule_code") and callable(getattr(_kernel, n)))


@contextlib.contextmanager
def _kernel_flag(enabled: bool):
    """``fp8core._kernel.ENABLED = enabled`` for the block, restored after."""
    from fp8core import _kernel
    saved = _kernel.ENABLED
    _kernel.ENABLED = enabled
    try:
        yield
    finally:
        _kernel.ENABLED = saved


# --------------------------------------------------------------------- numpy

class NumpyBackend:
    """The reference quantizers and a float64 / float32 numpy oracle."""

    name = "numpy"

    def unavailable(self):
        return None

    @contextlib.contextmanager
    def forced(self):
        yield PathProbe()

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

    def quantize_operand(self, x, rule, axis):
        return ref.quantize_operand(x, rule, axis=axis, seed=SEED)

    def dequantize_operand(self, codes, absmax, rule, axis, dtype):
        return ref.dequantize_operand(codes, absmax, rule, axis=axis, dtype=NP_DTYPES[dtype])

    def fake_quantize_operand(self, x, rule, axis):
        return ref.fake_quantize_operand(x, rule, axis=axis, seed=SEED)

    # the oracle ------------------------------------------------------------
    @staticmethod
    def operands(mode, a, b, g, fw, bw, bsz, bsz2):
        """The quantized operands (in the compute dtype = A's dtype) of the three products
        (the oracle and its error bound both need them: :func:`_last_call` keeps the last)."""
        return _last_call(_operands, mode, a, b, g, fw, bw, bsz, bsz2)

    @staticmethod
    def recipe_operands(a, b, g, recipe):
        """The three products of ``matmul_fp8(a, b, recipe=...)`` as float32 operand pairs
        (``fp8core.reference.linear_operands``; out and grad_a with A's leading shape)."""
        return _last_call(_recipe_operands, a, b, g, recipe)

    @staticmethod
    def _product(pairs, a_shape):
        out = {k: np.matmul(x.astype(np.float64), y.astype(np.float64)) for k, (x, y) in pairs.items()}
        for k in ("out", "grad_a"):
            if k in out:
                out[k] = out[k].reshape(a_shape[:-1] + out[k].shape[-1:])
        return out

    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2):
        ops = self.operands(mode, a, b, g, fw, bw, bsz, bsz2)
        return {name: np.matmul(x.astype(np.float64), y.astype(np.float64)) for name, (x, y) in ops.items()}

    def matmul_recipe(self, a, b, g, recipe):
        return self._product(self.recipe_operands(a, b, g, recipe), a.shape)

    @staticmethod
    def linear_operands(layer, x, weight, fw, stream: int = 0):
        """``(Q(x), Q(weight))`` of an FP8 linear layer (``layer``: "mixed", "global" or a
        LinearRecipe; a layer's call ``stream``), the weight in x's dtype; Q(x) has x's shape."""
        if isinstance(layer, LinearRecipe):
            ops = ref.linear_operands(x, weight.T, None, layer, seed=SEED, stream=stream)
            return ops["input"].reshape(x.shape), ops["weight"].T
        k = weight.shape[1]
        qx = fp8core.fake_quantize(x, fw, fp8core.select_block_size(k) if layer == "mixed" else None)
        return qx, fp8core.fake_quantize(weight, fw).astype(x.dtype)

    def linear(self, layer, x, weight, bias, fw, bw):
        qx, qw = self.linear_operands(layer, x, weight, fw)
        return qx.astype(np.float64) @ qw.T.astype(np.float64) + bias.astype(np.float64)

    def train(self, layer, params, batches, labels, fw, bw, lr):
        """The reference MLP (fp8 Linear → ReLU → fp8 Linear, cross-entropy, SGD) in float32
        numpy; ``layer``: "mixed", "global" or a LinearRecipe."""
        p = {k: v.astype(np.float32).copy() for k, v in params.items()}
        losses = []
        for step, (x, y) in enumerate(zip(batches, labels)):   # step = each layer's stream
            h_pre, cache1 = _np_linear(layer, x, p["w1"], p["b1"], fw, step)
            h = np.maximum(h_pre, 0)
            logits, cache2 = _np_linear(layer, h, p["w2"], p["b2"], fw, step)
            z = logits - logits.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            losses.append(-logp[np.arange(len(y)), y].mean())
            dlogits = np.exp(logp)
            dlogits[np.arange(len(y)), y] -= 1
            dlogits = (dlogits / len(y)).astype(np.float32)
            dh, dw2, db2 = _np_linear_bwd(layer, dlogits, cache2, bw)
            dh = dh * (h_pre > 0)
            _, dw1, db1 = _np_linear_bwd(layer, dh.astype(np.float32), cache1, bw)
            for name, grad in (("w1", dw1), ("b1", db1), ("w2", dw2), ("b2", db2)):
                p[name] = (p[name] - np.float32(lr) * grad).astype(np.float32)
        return np.array(losses, np.float32)


def _operands(mode, a, b, g, fw, bw, bsz, bsz2):
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


def _recipe_operands(a, b, g, recipe):
    ops = ref.linear_operands(a, b, g, recipe, seed=SEED)
    pairs = {"out": (ops["input"], ops["weight"])}
    if g is not None:
        pairs["grad_a"] = (ops["grad_output"], ops["weight_for_grad_input"].T)
        pairs["grad_b"] = (ops["input_for_grad_weight"].T, ops["grad_output_for_grad_weight"])
    return pairs


_LAST: list = []  # [(fn, args, result)]: the last oracle call (its arrays kept alive, so ids stay unique)


def forget_oracle() -> None:
    """Drop the kept oracle call (the runner does at the start and end of every case)."""
    _LAST.clear()


def _last_call(fn, *args):
    """``fn(*args)``, reusing the previous result when called again with the same function and
    the very same argument objects (the runner asks for a case's operands twice: oracle, bound)."""
    if _LAST and _LAST[0][0] is fn and len(_LAST[0][1]) == len(args) and all(
            x is y or (not isinstance(x, np.ndarray) and x == y) for x, y in zip(_LAST[0][1], args)):
        return _LAST[0][2]
    result = fn(*args)
    _LAST[:] = [(fn, args, result)]
    return result


def _np_linear(layer, x, w, b, fw, stream: int = 0):
    qx, qw = NumpyBackend.linear_operands(layer, x, w, fw, stream)
    return qx @ qw.T + b, (x, qx, qw, w, stream)


def _np_linear_bwd(layer, g, cache, bw):
    x, qx, qw, w, stream = cache
    if isinstance(layer, LinearRecipe):
        ops = ref.linear_operands(x, w.T, g, layer, seed=SEED, stream=stream)
        dx = ops["grad_output"] @ ops["weight_for_grad_input"].T
        dw = (ops["input_for_grad_weight"].T @ ops["grad_output_for_grad_weight"]).T
        return dx, dw, g.sum(axis=0)
    n = qw.shape[0]
    qg = fp8core.fake_quantize(g, bw, fp8core.select_block_size(n) if layer == "mixed" else None)
    dx = qg @ qw
    dw = (g.T @ x) if layer == "mixed" else (qg.T @ qx)
    return dx, dw, g.sum(axis=0)


# --------------------------------------------------------------------- torch

class TorchBackend:
    """fp8core_torch on one CPU path: ``"kernel"`` (fp8core's C kernel) or ``"ops"`` (torch ops)."""

    def __init__(self, path: str):
        if path not in ("kernel", "ops"):
            raise ValueError(f"torch path must be 'kernel' or 'ops', got {path!r}")
        self.path = path
        self.name = f"torch[{path}]"

    def unavailable(self):
        reason = _missing("torch", "fp8core_torch")
        if reason is None and self.path == "kernel":
            reason = _kernel_unavailable()
        return reason

    @contextlib.contextmanager
    def forced(self):
        """The flag set to this path, and every C kernel call counted."""
        from fp8core import _kernel
        probe = PathProbe(kernel=self.path == "kernel")
        names = _kernel_entry_points()
        saved = {n: getattr(_kernel, n) for n in names}

        def counted(fn):
            @functools.wraps(fn)
            def call(*args, **kwargs):
                probe.kernel_calls += 1
                return fn(*args, **kwargs)
            return call

        with _kernel_flag(self.path == "kernel"):
            for n in names:
                setattr(_kernel, n, counted(saved[n]))
            try:
                yield probe
            finally:
                for n in names:
                    setattr(_kernel, n, saved[n])

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

    def quantize_operand(self, x, rule, axis):
        import fp8core_torch
        codes, absmax = fp8core_torch.quantize_operand(self._t(x), rule, axis=axis, seed=SEED)
        return self._np(codes), self._np(absmax)

    def dequantize_operand(self, codes, absmax, rule, axis, dtype):
        import fp8core_torch
        return self._np(fp8core_torch.dequantize_operand(self._t(codes), self._t(absmax), rule, axis=axis,
                                                         dtype=self._dtype(dtype)))

    def fake_quantize_operand(self, x, rule, axis):
        import fp8core_torch
        return self._np(fp8core_torch.fake_quantize_operand(self._t(x), rule, axis=axis, seed=SEED))

    def _grads(self, fn, a, b, g):
        ta = self._t(a).clone().requires_grad_(True)
        tb = self._t(b).clone().requires_grad_(True)
        out = fn(ta, tb)
        out.backward(self._t(g))
        return {"out": self._np(out), "grad_a": self._np(ta.grad), "grad_b": self._np(tb.grad)}

    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2):
        import fp8core_torch
        fn = fp8core_torch.matmul_fp8_mixed if mode == "mixed" else fp8core_torch.matmul_fp8_global
        return self._grads(lambda x, y: fn(x, y, fw_code=fw, bw_code=bw, bsz=bsz or -1, bsz2=bsz2 or -1),
                           a, b, g)

    def matmul_recipe(self, a, b, g, recipe):
        import fp8core_torch
        return self._grads(lambda x, y: fp8core_torch.matmul_fp8(x, y, recipe=recipe, seed=SEED),
                           a, b, g)

    def _layer(self, layer, weight, bias, fw, bw):
        import torch
        import fp8core_torch
        n, k = weight.shape
        if isinstance(layer, LinearRecipe):
            module = fp8core_torch.LinearFP8(k, n, recipe=layer, seed=SEED)
        else:
            cls = fp8core_torch.LinearFP8Mixed if layer == "mixed" else fp8core_torch.LinearFP8Global
            module = cls(k, n, fw_format=fw, bw_format=bw)
        module.load_state_dict({"weight": torch.from_numpy(weight.copy()), "bias": torch.from_numpy(bias.copy())})
        return module

    def linear(self, layer, x, weight, bias, fw, bw):
        import torch
        with torch.no_grad():
            return self._np(self._layer(layer, weight, bias, fw, bw)(self._t(x)))

    def train(self, layer, params, batches, labels, fw, bw, lr):
        import torch
        l1 = self._layer(layer, params["w1"], params["b1"], fw, bw)
        l2 = self._layer(layer, params["w2"], params["b2"], fw, bw)
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
    """fp8core_jax on one CPU path: ``"ffi"`` (the C kernel as XLA custom calls) or ``"xla"``."""

    def __init__(self, path: str):
        if path not in ("ffi", "xla"):
            raise ValueError(f"jax path must be 'ffi' or 'xla', got {path!r}")
        self.path = path
        self.name = f"jax[{path}]"

    def unavailable(self):
        reason = _missing("jax", "flax", "fp8core_jax")
        if reason is None and self.path == "ffi":
            reason = _kernel_unavailable()
            if reason is None:
                import warnings
                from fp8core_jax import _ffi
                with _kernel_flag(True), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # said here, as the skip reason
                    if not _ffi.available():
                        reason = f"JAX's FFI wrapper of the C kernel is unavailable: {_ffi._STATE.get('why')}"
        return reason

    @contextlib.contextmanager
    def forced(self):
        """The flag set to this path, and every kernel/XLA decision of fp8core_jax recorded."""
        from fp8core_jax import quantize as jq
        probe = PathProbe(kernel=self.path == "ffi")
        original = jq._kernel_path

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            decision = original(*args, **kwargs)
            probe.decisions.append(bool(decision))
            return decision

        with _kernel_flag(self.path == "ffi"):
            jq._kernel_path = recorded
            try:
                yield probe
            finally:
                jq._kernel_path = original

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

    def quantize_operand(self, x, rule, axis):
        import fp8core_jax
        codes, absmax = fp8core_jax.quantize_operand(x, rule, axis=axis, seed=SEED)
        return self._np(codes), self._np(absmax)

    def dequantize_operand(self, codes, absmax, rule, axis, dtype):
        import fp8core_jax
        return self._np(fp8core_jax.dequantize_operand(codes, absmax, rule, axis=axis, dtype=NP_DTYPES[dtype]))

    def fake_quantize_operand(self, x, rule, axis):
        import fp8core_jax
        return self._np(fp8core_jax.fake_quantize_operand(x, rule, axis=axis, seed=SEED))

    def _grads(self, fn, a, b, g):
        import jax
        with jax.default_matmul_precision("highest"):
            out, vjp = jax.vjp(fn, a, b)
            grad_a, grad_b = vjp(g)
        return {"out": self._np(out), "grad_a": self._np(grad_a), "grad_b": self._np(grad_b)}

    def matmul(self, mode, a, b, g, fw, bw, bsz, bsz2):
        import fp8core_jax
        fn = fp8core_jax.matmul_fp8_mixed if mode == "mixed" else fp8core_jax.matmul_fp8_global
        return self._grads(lambda x, y: fn(x, y, fw_format=fw, bw_format=bw, bsz=bsz or -1, bsz2=bsz2 or -1),
                           a, b, g)

    def matmul_recipe(self, a, b, g, recipe):
        import fp8core_jax
        return self._grads(lambda x, y: fp8core_jax.matmul_fp8(x, y, recipe=recipe, seed=SEED),
                           a, b, g)

    def _layer(self, layer, weight, bias, fw, bw):
        from flax import nnx
        from fp8core_jax import nn as fnn
        from fp8core_jax import transfer
        n, k = weight.shape
        if isinstance(layer, LinearRecipe):
            module = fnn.LinearFP8(k, n, recipe=layer, rngs=nnx.Rngs(0), seed=SEED)
        else:
            cls = fnn.LinearFP8Mixed if layer == "mixed" else fnn.LinearFP8Global
            module = cls(k, n, rngs=nnx.Rngs(0), fw_format=fw, bw_format=bw)
        transfer.load_linear_state_dict(module, {"weight": weight, "bias": bias})
        return module

    def linear(self, layer, x, weight, bias, fw, bw):
        import jax
        with jax.default_matmul_precision("highest"):
            return self._np(self._layer(layer, weight, bias, fw, bw)(x))

    def train(self, layer, params, batches, labels, fw, bw, lr):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        class MLP(nnx.Module):
            def __init__(inner, backend):
                inner.l1 = backend._layer(layer, params["w1"], params["b1"], fw, bw)
                inner.l2 = backend._layer(layer, params["w2"], params["b2"], fw, bw)

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


#: Every implementation under test, reference first, in column order.
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    NumpyBackend(), TorchBackend("kernel"), TorchBackend("ops"), JaxBackend("ffi"), JaxBackend("xla"))}
#: ``--backends`` names that stand for several paths (the names before paths existed).
ALIASES: dict[str, tuple[str, ...]] = {
    "torch": ("torch[kernel]", "torch[ops]"),
    "jax": ("jax[ffi]", "jax[xla]"),
}
#: Path-to-path comparisons shown besides "every path vs numpy": the two framework
#: paths, which share no code (the kernel paths run the same C file).
CROSS_PAIRS: tuple[tuple[str, str], ...] = (("torch[ops]", "jax[xla]"),)


def resolve_backends(names) -> tuple[str, ...]:
    """Backend names with aliases expanded, duplicates dropped, numpy first.

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
    """
    out: list[str] = ["numpy"]
    unknown = []
    for n in names:
        for m in ALIASES.get(n, (n,)):
            if m not in BACKENDS:
                unknown.append(m)
            elif m not in out:
                out.append(m)
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(list(BACKENDS) + list(ALIASES))}")
    return tuple(out)
