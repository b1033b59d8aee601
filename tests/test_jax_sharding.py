"""Sharded inputs over 4 host devices give the single-device results.

XLA_FLAGS must be set before jax initialises, so the check runs in a
subprocess. Quantizers: bits. Matmuls: forward and grad_A bits (rows are
independent); grad_B within float32 summation-order tolerance (the batch
reduction is split across devices).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import fp8core_jax as fj
    from _jax_testutil import assert_bits_equal, bits

    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = NamedSharding(mesh, P("d"))
    repl = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 200)) * np.exp2(rng.integers(-10, 10, (16, 1)))).astype(np.float32)
    x_nan = x.copy(); x_nan[13, 7] = np.nan          # NaN on the last shard only
    x_inf = x.copy(); x_inf[2, 9] = -np.inf          # inf on the first shard only

    def quantizers(v):
        return (fj.quantize_blockwise(v, "e4m3", 64), fj.quantize_global(v, "e5m2"),
                fj.fake_quantize(v, "bnb_e4m3", 100), fj.fake_quantize(v, "e4m3"))

    f = jax.jit(quantizers)
    for arr in (x, x_nan, x_inf, x.astype(jnp.bfloat16)):
        single = jax.tree.map(np.asarray, f(jnp.asarray(arr)))
        sharded_in = jax.device_put(arr, rows)
        assert len(sharded_in.sharding.device_set) == 4
        sharded = jax.tree.map(np.asarray, f(sharded_in))
        for s, m in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
            assert_bits_equal(m, s, "sharded quantizer")
    assert bits(np.asarray(f(jax.device_put(x_nan, rows))[1][1])) == 0x7FC00000

    B = (rng.standard_normal((200, 64)) / 14).astype(np.float32)
    G = rng.standard_normal((16, 64)).astype(np.float32)
    for fn in (fj.matmul_fp8_mixed, fj.matmul_fp8_global):
        def loss(a, b):
            out = fn(a, b)
            return jnp.sum(out * G), out
        g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (l1, o1), (ga1, gb1) = jax.tree.map(np.asarray, g(jnp.asarray(x), jnp.asarray(B)))
        (l2, o2), (ga2, gb2) = jax.tree.map(
            np.asarray, g(jax.device_put(x, rows), jax.device_put(B, repl)))
        assert_bits_equal(o2, o1, f"{fn.__name__} out")
        assert_bits_equal(ga2, ga1, f"{fn.__name__} grad_A")
        np.testing.assert_allclose(gb2, gb1, rtol=1e-5, atol=1e-5 * np.abs(gb1).max())
        print(fn.__name__, "grad_B bit-identical:", bool((bits(gb2) == bits(gb1)).all()))
    print("OK")
    """
)


def test_sharded_equals_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    print(proc.stdout)


OPERAND_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import fp8core.reference as ref
    import fp8core_jax as fj
    from fp8core import _kernel
    from fp8core.recipe import OperandRule, axiswise, block, flat, tensor, tile
    from _jax_testutil import assert_bits_equal

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(1)
    RULES = [OperandRule("e4m3", tensor()), OperandRule("e5m2", axiswise(), "pow2_torchao"),
             OperandRule("e4m3", block(128), "pow2"), OperandRule("e4m3", tile(128), "pow2"),
             OperandRule("e4m3", flat(256)), OperandRule("e4m3", block(48))]
    # rows: 512 / 4 = 128 (tiles of 128 local), 256 (a 128-tile holds 2 shards), 200
    # (50-row shards, 128-row tiles: neither, gathered), 64; columns sharded the same way;
    # 768 columns: the 192-column shards of a tensor-parallel qkv weight and its dY
    cases = []
    for rows, cols in ((512, 256), (256, 512), (200, 256), (64, 200), (256, 768)):
        x = (rng.standard_normal((rows, cols)) * np.exp2(rng.integers(-8, 8, (rows, 1)))
             ).astype(np.float32)
        x[rows - 3, 5] = np.nan    # last shard of rows, first of columns
        x[1, cols - 2] = np.inf    # first shard of rows, last of columns
        cases.append(x)

    def all_four(rule, axis):
        def f(v):
            codes, absmax = fj.quantize_operand(v, rule, axis=axis)
            return (codes, absmax, fj.fake_quantize_operand(v, rule, axis=axis),
                    fj.dequantize_operand(codes, absmax, rule, axis=axis))
        return jax.jit(f)

    for path in ("kernel", "xla"):
        _kernel.ENABLED = path == "kernel"   # read at trace time: new jits per path
        fns = {(rule, axis): all_four(rule, axis) for rule in RULES for axis in (-1, 0)}
        for x in cases:
            for (rule, axis), f in fns.items():
                want_c, want_a = ref.quantize_operand(x, rule, axis=axis)
                want = (want_c, want_a, ref.fake_quantize_operand(x, rule, axis=axis),
                        ref.dequantize_operand(want_c, want_a, rule, axis=axis))
                for spec in (P("d"), P(None, "d")):
                    got = f(jax.device_put(x, NamedSharding(mesh, spec)))
                    for name, g, w in zip(("codes", "absmax", "fake", "dequantize"), got, want):
                        assert_bits_equal(np.asarray(g), w,
                                          f"{path} {x.shape} {spec} {rule} axis={axis} {name}")
    print("OK")
    """
)

STEP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import fp8core.recipe
    import fp8core_jax as fj
    from fp8core import _kernel
    import sharding_collectives as sc

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    s = lambda *spec: NamedSharding(mesh, P(*spec))
    rng = np.random.default_rng(0)
    K, H, N, M = 256, 512, 256, 64
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = ((rng.standard_normal((K, H)) / 16).astype(np.float32),
         (rng.standard_normal((H, N)) / 22).astype(np.float32))
    y = rng.standard_normal((M, N)).astype(np.float32)

    def step(mm):
        def loss(params, x, y):
            return jnp.mean((mm(jax.nn.gelu(mm(x, params[0])), params[1]) - y) ** 2)
        return jax.jit(jax.value_and_grad(loss))

    layouts = {"data-parallel": ((s(), s()), s("d")), "tensor-parallel": ((s(None, "d"), s("d", None)), s())}
    for path in ("kernel", "xla"):
        _kernel.ENABLED = path == "kernel"
        for rec in fp8core.recipe.PRESETS:
            if fp8core.recipe.PRESETS[rec].stochastic_slots:
                continue  # NVFP4 still adds all-gathers on both paths: a declared gap (§10.3)
            f = step(lambda a, b, r=rec: fj.matmul_fp8(a, b, recipe=r, seed=0))
            l1, g1 = f(w, x, y)
            for name, (ps, xs) in layouts.items():
                args = ((jax.device_put(w[0], ps[0]), jax.device_put(w[1], ps[1])),
                        jax.device_put(x, xs), jax.device_put(y, xs))
                base = sc._count(step(lambda a, b: a @ b).lower(*args).compile().as_text())
                got = sc._count(f.lower(*args).compile().as_text())
                what = f"{path} {rec} {name}"
                assert got["all-gather"] == base["all-gather"], (what, got, base)
                assert got["all-to-all"] == base["all-to-all"], (what, got, base)
                l2, g2 = f(*args)
                for g, p, want in zip(g2, args[0], g1):
                    assert g.sharding.is_equivalent_to(p.sharding, 2), (what, g.sharding, p.sharding)
                    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5,
                                               atol=1e-5 * np.abs(np.asarray(want)).max(), err_msg=what)
                np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6, err_msg=what)
    print("OK")
    """
)

TP_STEP_SCRIPT = textwrap.dedent(
    """
    import warnings
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import Mesh
    import fp8core.recipe
    from fp8core import _kernel
    import bench_jax as bj, bench_sharded as bs

    warnings.filterwarnings("ignore", message=".*span rows.*")  # BNB_MIXED's flat blocks
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    cfg = bs.QUICK_MODEL      # 1 block, d_model 256: qkv 768 -> 192 columns per device
    rng = np.random.default_rng(2)
    idx = jnp.asarray(rng.integers(0, cfg["vocab"], (cfg["batch"], cfg["seq"])), jnp.int32)
    tgt = jnp.asarray(rng.integers(0, cfg["vocab"], (cfg["batch"], cfg["seq"])), jnp.int32)
    # all-gathers beyond the fp32 step's (docs/numerics.md §10.3): BLOCKWISE_1x128's
    # 128-wide groups straddle the 192-column qkv shards (W's 128x128 tiles, dY's 1x128 blocks)
    EXTRA = {("kernel", "BLOCKWISE_1x128"): 5, ("xla", "BLOCKWISE_1x128"): 2}

    def model(rec):
        m = bj.TinyLM(**cfg, rngs=nnx.Rngs(0))
        return m if rec is None else bj.convert_for(rec, m)

    base = bs.ShardedStep(model(None), idx, tgt, mesh, "tp").collectives()
    for path in ("kernel", "xla"):
        _kernel.ENABLED = path == "kernel"
        for rec in fp8core.recipe.PRESETS:
            if fp8core.recipe.PRESETS[rec].stochastic_slots:
                continue  # NVFP4 still adds all-gathers on both paths: a declared gap (§10.3)
            what = f"{path} {rec} tensor-parallel transformer"
            st = bs.ShardedStep(model(rec), idx, tgt, mesh, "tp")
            got = st.collectives()
            want = base["all-gather"] + EXTRA.get((path, rec), 0)
            assert got["all-gather"] == want, (what, got, base)
            assert got["all-to-all"] == base["all-to-all"], (what, got, base)
            if path == "kernel":
                continue
            # the gradients: sharded like their parameters, the unsharded step's values
            graphdef, params, rest = nnx.split(model(rec), nnx.Param, ...)
            def loss(params):
                logits = nnx.merge(graphdef, params, rest)(idx)
                return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()
            g1 = jax.jit(jax.grad(loss))(params)
            g2 = jax.jit(jax.grad(loss), out_shardings=st.p_shard)(jax.device_put(params, st.p_shard))
            l1, l2 = jax.jit(loss)(params), jax.jit(loss)(jax.device_put(params, st.p_shard))
            np.testing.assert_allclose(float(l2), float(l1), rtol=5e-5, err_msg=what)
            # the row-sharded proj/fc2 sum in another order, so an activation's absmax may
            # differ by an ulp and codes flip downstream (seen: up to 2.3% of a leaf's
            # largest gradient, TENSORWISE); the quantizers' bits on these sharded shapes
            # are the reference's (test_sharded_operands_are_the_reference_bits, 256x768)
            for a, b, sh in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), jax.tree.leaves(st.p_shard)):
                assert a.sharding.is_equivalent_to(sh, a.ndim), (what, a.sharding, sh)
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                           atol=0.05 * np.abs(np.asarray(b)).max(), err_msg=what)
    print("OK")
    """
)


def _run_4_devices(script: str, *extra_path: Path) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *map(str, extra_path),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK"), proc.stdout
    return proc.stdout


@pytest.mark.slow
def test_sharded_operands_are_the_reference_bits():
    """Every granularity, both orientations, rows or columns sharded 4 ways — groups local
    to a shard, groups holding whole shards (all-reduced absmax), neither (gathered) —
    with NaN and inf in different shards: the reference's codes, absmax, fake-quantized
    and dequantized bits, on the custom-call and XLA paths."""
    _run_4_devices(OPERAND_SCRIPT)


@pytest.mark.slow
def test_presets_add_no_all_gather():
    """Issue 12: every preset's jit(value_and_grad) MLP step, data- and tensor-parallel,
    on both paths, has the all-gathers (and all-to-alls) of the x @ W step and no more;
    gradients keep the parameters' sharding and equal the unsharded step's (float32
    summation order)."""
    _run_4_devices(STEP_SCRIPT, ROOT / "benchmarks")


@pytest.mark.slow
def test_presets_add_no_all_gather_to_tp_transformer():
    """Issue 12 in bench_sharded.py's tensor-parallel (Megatron) layout of the transformer
    step (qkv/fc1 column-sharded, proj/fc2 row-sharded, qkv's 768 columns 192 per device):
    every preset on both paths has the fp32 step's all-gathers and no more, except
    BLOCKWISE_1x128, whose 128-wide groups straddle the 192-column shards (numerics.md
    §10.3, counted). On the XLA path the gradients keep the parameters' sharding, the loss
    is the unsharded step's to 5e-5 and the gradients to 5% of each leaf's largest (the
    row-sharded GEMMs sum in another order and codes flip downstream; the quantizers' bits
    on these shapes are pinned by test_sharded_operands_are_the_reference_bits)."""
    _run_4_devices(TP_STEP_SCRIPT, ROOT / "benchmarks")


@pytest.mark.slow
def test_bench_sharded_counts_flat_blocks_spanning_rows():
    """docs/numerics.md §10.3's width limit, through benchmarks/bench_sharded.py --quick:
    in the data-parallel transformer step BNB_MIXED's flat(1024) blocks of qkv's 768-feature
    dY span rows, so the kernel path gathers once (one block) and the XLA path does not;
    the parameters keep their sharding."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), "--quick",
                           "--recipes", "BNB_MIXED", "--layouts", "dp", "--repeats", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()
            if line.startswith("  ") and "BNB_MIXED" in line and "AG" in line
            and line.split()[0] in ("kernel", "xla")}
    assert set(rows) == {"kernel", "xla"}, proc.stdout
    assert " +1  " in rows["kernel"], rows["kernel"]
    assert " +0  " in rows["xla"], rows["xla"]
    assert "LOST" not in proc.stdout, proc.stdout
