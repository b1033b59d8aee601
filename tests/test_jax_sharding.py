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
