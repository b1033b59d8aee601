"""Distributed amax (docs/numerics.md §10.2): ``LinearRecipe.amax_reduction`` all-reduces the
amax of every per-tensor slot before its scale is formed, so the quantized operands do not
depend on how the batch is split.

Oracles: the reference quantizing the whole (unsplit) tensor — a rank's codes with the reduced
amax are exactly the slice of the whole tensor's codes; a power-of-two amax factor worked by
hand; the unsharded JAX run (a subprocess with 4 host devices). The 2-rank torch DDP run is in
tests/test_torch_distributed.py.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fp8core.recipe as FR
from fp8core import reference as R
from fp8core.recipe import OperandRule, tensor

ROOT = Path(__file__).resolve().parents[1]
NAN_BITS = 0x7FC00000
RULES = [FR.TENSORWISE.input, FR.TENSORWISE.grad_output, OperandRule("e4m3", tensor(), "pow2"),
         OperandRule("e4m3", tensor(), "pow2_torchao")]


def _halves(seed: int = 0, rows: int = 64, cols: int = 48) -> np.ndarray:
    """A batch whose second half has a 16× larger amax (a split moves a local scale)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[rows // 2:] *= 16
    x[::7] *= 1e-3
    return x


# ------------------------------------------------------------------ the recipe option
@pytest.mark.parametrize("value,exc,msg", [
    (3, TypeError, r"amax_reduction must be None, a mesh axis name or a tuple of them .* got int: 3"),
    (True, TypeError, r"got bool: True"),
    (["data"], TypeError, r"got list: \['data'\]"),
    ("", TypeError, r"got str: ''"),
    (("data", 1), TypeError, r"got tuple"),
    ((), TypeError, r"got tuple: \(\)"),
])
def test_bad_amax_reduction_values_name_the_option(value, exc, msg):
    with pytest.raises(exc, match=msg):
        FR.TENSORWISE.replace(amax_reduction=value)


@pytest.mark.parametrize("recipe", [FR.ROWWISE, FR.BLOCKWISE_1x128])
def test_amax_reduction_needs_a_per_tensor_slot(recipe):
    with pytest.raises(ValueError, match=rf"amax_reduction='data': recipe {recipe.name} has no "
                                         r"per-tensor \(tensor\(\)\) slot"):
        recipe.replace(amax_reduction="data")


def test_reduced_slots_are_the_per_tensor_slots_that_quantize():
    r = lambda base: base.replace(amax_reduction=("data", "fsdp")).reduced_slots  # noqa: E731
    # TENSORWISE's backward slots reuse the forward's quantized values (tensor() is
    # orientation-free), which are already reduced
    assert r(FR.TENSORWISE) == ("input", "weight", "grad_output")
    assert r(FR.BNB_GLOBAL) == ("input", "weight", "grad_output")
    assert r(FR.BNB_MIXED) == ("weight",)
    assert r(FR.ROWWISE_WITH_GW_HP) == ("weight_for_grad_input",)
    assert FR.TENSORWISE.reduced_slots == ()
    red = FR.TENSORWISE.replace(amax_reduction="data")
    assert copy.deepcopy(red) is red and copy.copy(red) is red
    assert red != FR.TENSORWISE and hash(red) == hash(FR.TENSORWISE.replace(amax_reduction="data"))
    assert red.describe().endswith("amax_reduction='data'")


# ------------------------------------------------------------------ reference
def test_reduce_absmax_by_hand():
    nan = np.array([NAN_BITS], np.uint32).view(np.float32)[0]
    a = np.array([1.5, 0.0, 2.5], np.float32)
    assert R.reduce_absmax(a) == np.float32(2.5)
    for order in ([1.5, nan, 3.0], [nan, 3.0, 1.5], [3.0, 1.5, nan]):
        got = R.reduce_absmax(np.array(order, np.float32))
        assert got.view(np.uint32) == NAN_BITS                 # NaN on any rank wins
    grid = np.array([[[1.0]], [[4.0]]], np.float32)              # two ranks' (1, 1) absmax
    assert R.reduce_absmax(grid).shape == (1, 1) and R.reduce_absmax(grid)[0, 0] == 4.0


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("axis", [-1, 0])
def test_reference_split_with_reduced_amax_is_the_whole(rule, axis):
    """Each half quantized with the reduced amax gives the whole tensor's codes (and its
    absmax); with its own amax it does not."""
    x = _halves()
    whole, a_whole = R.quantize_operand(x, rule, axis=axis)
    parts = [x[:32], x[32:]]
    local = [R.quantize_operand(p, rule, axis=axis) for p in parts]
    g = R.reduce_absmax([a for _, a in local])
    assert g.view(np.uint32) == a_whole.view(np.uint32)
    reduced = [R.quantize_operand(p, rule, axis=axis, absmax=g) for p in parts]
    assert np.array_equal(np.concatenate([c for c, _ in reduced]), whole)
    assert all(np.array_equal(a, g) for _, a in reduced)
    assert not np.array_equal(np.concatenate([c for c, _ in local]), whole)


def test_reference_given_absmax_by_hand():
    """A given amax G scales x as if x held one more element of magnitude G (the other
    rank's largest); a NaN amax makes every code the fill code."""
    rule = FR.TENSORWISE.input
    x = _halves()
    _, a = R.quantize_operand(x, rule)
    g = np.float32(2.75 * a[0, 0])
    codes, got = R.quantize_operand(x, rule, absmax=g)
    assert got.shape == (1, 1) and got[0, 0] == g
    with_g = np.append(x.reshape(-1), -g).reshape(1, -1)
    assert np.array_equal(codes, R.quantize_operand(with_g, rule)[0][0, :-1].reshape(x.shape))
    assert not np.array_equal(codes, R.quantize_operand(x, rule)[0])
    nan = np.array(NAN_BITS, np.uint32).view(np.float32)
    codes, _ = R.quantize_operand(x, rule, absmax=nan)
    assert (codes == rule.format.fill_code).all()


@pytest.mark.parametrize("absmax,exc,msg", [
    (np.float64(1.0), TypeError, r"absmax must have dtype float32, got float64"),
    (np.ones(2, np.float32), ValueError, r"absmax must have shape \(\)"),
])
def test_reference_given_absmax_errors(absmax, exc, msg):
    with pytest.raises(exc, match=msg):
        R.quantize_operand(np.ones((4, 4), np.float32), FR.TENSORWISE.input, absmax=absmax)
    with pytest.raises(ValueError, match=r"absmax= gives the one amax of a tensor\(\) rule, but "
                                         r"the rule is float8_e4m3fn/axiswise"):
        R.quantize_operand(np.ones((4, 4), np.float32), FR.ROWWISE.input, absmax=np.float32(1))


# ------------------------------------------------------------------ C kernel
@pytest.mark.parametrize("rule", RULES, ids=str)
def test_kernel_quantize_given_is_the_reference(rule):
    """``fp8q_quantize_given`` on 4 threads (a 2**17-element operand is split between them)
    against the reference; bad arguments return -1."""
    import ctypes

    from fp8core import _kernel

    if _kernel._LIB is None:
        pytest.skip("fp8core's C kernel is not built (no C compiler at install time)")
    x = np.random.default_rng(3).standard_normal((512, 256)).astype(np.float32)
    x[5, 7], x[9, 1] = 1e-30, -0.0
    fmt = _kernel._format_for(rule.format, rule.scale)
    for g in (np.float32(100.0), np.float32(0.5), np.float32(0.0)):
        codes = np.empty(x.size, np.uint8)
        vals = np.empty(x.size, np.float32)
        a = np.array([g], np.float32)
        rc = _kernel.call("quantize_given", x.ctypes.data, 0, x.size, ctypes.byref(fmt),
                          codes.ctypes.data, vals.ctypes.data, 0, a.ctypes.data, 4, 0)
        assert rc == 0
        want, _ = R.quantize_operand(x, rule, absmax=g)
        assert np.array_equal(codes.reshape(x.shape), want), g
        deq = R.dequantize_operand(want, np.array(g, np.float32).reshape(1, 1), rule)
        assert np.array_equal(vals.reshape(x.shape).view(np.uint32), deq.view(np.uint32))
    assert _kernel.call("quantize_given", x.ctypes.data, 0, x.size, ctypes.byref(fmt),
                        None, None, 0, None, 1, 0) == -1          # no absmax given
    assert _kernel.call("quantize_given", x.ctypes.data, 7, x.size, ctypes.byref(fmt),
                        None, None, 0, a.ctypes.data, 1, 0) == -1  # bad dtype code


# ------------------------------------------------------------------ torch
@pytest.fixture
def torch_path(request, monkeypatch):
    torch = pytest.importorskip("torch")
    from fp8core import _kernel

    if request.param == "kernel" and _kernel._LIB is None:
        pytest.skip("fp8core's C kernel is not built (no C compiler at install time)")
    monkeypatch.setattr(_kernel, "ENABLED", request.param == "kernel")
    return torch


@pytest.mark.parametrize("torch_path", ["kernel", "torch-ops"], indirect=True)
@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("dtype,axis", [("float32", -1), ("bfloat16", -1), ("float32", 0)])
def test_torch_given_absmax_is_the_reference(torch_path, rule, dtype, axis):
    torch = torch_path
    import fp8core_torch

    x = torch.from_numpy(_halves()).to(getattr(torch, dtype))
    x32 = x.float().numpy()
    for g in (np.float32(2.0 ** 9), np.float32(3.3), np.array([[0.01]], np.float32)):
        want, _ = R.quantize_operand(x32, rule, axis=axis, absmax=g)
        codes, a = fp8core_torch.quantize_operand(x, rule, axis=axis, absmax=torch.from_numpy(
            np.asarray(g)))
        assert np.array_equal(codes.numpy(), want), (rule, g)
        assert a.shape == (1, 1) and a.item() == float(np.asarray(g).reshape(()))


@pytest.mark.parametrize("torch_path", ["kernel", "torch-ops"], indirect=True)
def test_torch_matmul_uses_the_reduced_amax(torch_path, monkeypatch):
    """The layer's per-tensor slots take the all-reduced amax: with a stand-in all_reduce
    that reports another rank's 4× larger amax, the forward is the GEMM of the reference's
    operands quantized with that amax (bit for bit), and the dgrad too."""
    torch = torch_path
    import torch.distributed as dist

    import fp8core_torch

    seen = []

    def all_reduce(bits, op=None, group=None):       # this rank's amax vs a 4× larger one
        assert op == dist.ReduceOp.MAX and group is pg and bits.dtype == torch.int32
        seen.append(bits.view(torch.float32).item())
        torch.maximum(bits, (bits.view(torch.float32) * 4).view(torch.int32), out=bits)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    pg = dist.ProcessGroup(dist.HashStore(), 0, 1)
    recipe = FR.TENSORWISE.replace(amax_reduction=pg)
    x_np = _halves()
    w_np = (np.random.default_rng(1).standard_normal((24, 48)) / 8).astype(np.float32)
    g_np = np.random.default_rng(2).standard_normal((64, 24)).astype(np.float32)
    x = torch.from_numpy(x_np).requires_grad_()
    w = torch.from_numpy(w_np).requires_grad_()
    layer = fp8core_torch.LinearFP8(48, 24, bias=False, recipe=recipe)
    with torch.no_grad():
        layer.weight.copy_(w)
    out = layer(x)
    out.backward(torch.from_numpy(g_np))

    def deq(t, rule):
        a = R.quantize_operand(t, rule)[1] * 4
        codes, _ = R.quantize_operand(t, rule, absmax=a)
        return torch.from_numpy(R.dequantize_operand(codes, a, rule))

    qx, qw, qg = deq(x_np, recipe.input), deq(w_np, recipe.weight), deq(g_np, recipe.grad_output)
    assert len(seen) == 3                                     # X, W (forward), dY (backward)
    assert torch.equal(out, torch.matmul(qx, qw.t()))
    assert torch.equal(x.grad, torch.matmul(qg, qw))


def test_torch_amax_reduction_kind_errors():
    torch = pytest.importorskip("torch")
    import fp8core_torch

    with pytest.raises(TypeError, match=r"amax_reduction='data' is a JAX mesh axis name; in "
                                        r"fp8core_torch it is a torch.distributed process group"):
        fp8core_torch.LinearFP8(8, 8, recipe=FR.TENSORWISE.replace(amax_reduction="data"))
    with pytest.raises(TypeError, match=r"amax_reduction must be a torch.distributed.ProcessGroup"):
        fp8core_torch.matmul_fp8(torch.ones(2, 8), torch.ones(8, 4),
                                 recipe=FR.TENSORWISE.replace(amax_reduction=object()))
    with pytest.raises(TypeError, match=r"absmax must be a float32 tensor, got float"):
        fp8core_torch.quantize_operand(torch.ones(2, 8), FR.TENSORWISE.input, absmax=1.0)


# ------------------------------------------------------------------ JAX: shard_map
JAX_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import fp8core.recipe as FR
    from fp8core import reference as R, _kernel
    import fp8core_jax as fj
    from _jax_testutil import assert_bits_equal

    _kernel.ENABLED = sys.argv[1] == "kernel"
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 64)) * np.exp2(rng.integers(-8, 8, (16, 1)))).astype(np.float32)
    W = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    G = rng.standard_normal((16, 32)).astype(np.float32)

    def step(recipe):
        def local(a, b, g):
            out, vjp = jax.vjp(lambda a, b: fj.matmul_fp8(a, b, recipe=recipe), a, b)
            ga, gb = vjp(g)              # gb: the replicated B's cotangent, psum'd by JAX
            return out, ga, gb
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P(), P("d")),
                                     out_specs=(P("d"), P("d"), P())))

    def unsharded(recipe):
        out, vjp = jax.vjp(lambda a, b: fj.matmul_fp8(a, b, recipe=recipe), x, W)
        return (out, *vjp(G))

    for base in (FR.TENSORWISE, FR.BNB_GLOBAL, FR.BNB_MIXED, FR.ROWWISE, FR.BLOCKWISE_1x128):
        want = [np.asarray(t) for t in unsharded(base)]
        recipes = [base] + ([base.replace(amax_reduction="d")] if base.reduced_slots == () and
                            FR._per_tensor_slots(base) else [])
        for r in recipes:
            out, ga, gb = [np.asarray(t) for t in step(r)(x, W, G)]
            local_amax = r.amax_reduction is None and "input" in FR._per_tensor_slots(r)
            if local_amax:              # each device scales its own 4 rows: not the whole
                assert not np.array_equal(out, want[0]), r.name
                continue
            assert_bits_equal(out, want[0], f"{r.describe()} out")
            assert_bits_equal(ga, want[1], f"{r.describe()} grad_A")
            # float32 sums of 4 per-device partial products (rows 2**±8 apart) vs one sum:
            # measured ≤ 3.4e-6 of the largest element; e4m3's rounding is ~6e-2
            np.testing.assert_allclose(gb, want[2], rtol=0, atol=1e-5 * np.abs(want[2]).max(),
                                       err_msg=r.describe())

    # operands: each device's codes with the reduced amax are its rows of the whole's codes
    rule = FR.TENSORWISE.input
    def q(a):
        from fp8core_jax.quantize import _reduced_absmax
        return fj.quantize_operand(a, rule, absmax=_reduced_absmax(a, "d"))
    codes, absmax = jax.jit(jax.shard_map(q, mesh=mesh, in_specs=P("d"),
                                          out_specs=(P("d"), P())))(x)
    want_codes, want_absmax = R.quantize_operand(x, rule)
    assert_bits_equal(np.asarray(codes), want_codes, "reduced codes")
    assert_bits_equal(np.asarray(absmax), want_absmax, "reduced absmax")
    x_nan = x.copy(); x_nan[13, 3] = np.nan                      # NaN on the last device only
    codes, absmax = jax.jit(jax.shard_map(q, mesh=mesh, in_specs=P("d"),
                                          out_specs=(P("d"), P())))(x_nan)
    assert np.asarray(absmax).view(np.uint32)[0, 0] == 0x7FC00000
    assert (np.asarray(codes) == rule.format.fill_code).all()

    bad = FR.TENSORWISE.replace(amax_reduction="model")
    try:
        jax.jit(jax.shard_map(lambda a, b: fj.matmul_fp8(a, b, recipe=bad), mesh=mesh,
                              in_specs=(P("d"), P()), out_specs=P("d")))(x, W)
        raise AssertionError("no error for an unbound axis")
    except ValueError as e:
        assert "amax_reduction='model': 'model' is not a mesh axis of the enclosing shard_map" in str(e), e
    try:
        fj.matmul_fp8(x, W, recipe=FR.TENSORWISE.replace(amax_reduction="d"))
        raise AssertionError("no error outside shard_map")
    except ValueError as e:
        assert "not inside shard_map" in str(e), e
    print("OK")
    """
)


@pytest.mark.parametrize("path", ["kernel", "xla"])
def test_jax_shard_map_reduced_amax_equals_unsharded(path):
    """Inside ``shard_map`` over 4 host devices: with ``amax_reduction="d"`` the per-tensor
    recipes give the unsharded forward and grad_A bit for bit (grad_B: float32 order of the
    cross-device sum), without it they differ; the split-invariant recipes match without it
    (on the custom-call path too: its outputs are typed as varying, as XLA ops' are)."""
    pytest.importorskip("jax")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", JAX_SCRIPT, path], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK"), proc.stdout
