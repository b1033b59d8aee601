"""JAX benchmark: FP8-simulated linear forward+backward vs a plain jitted ``x @ W``,
and fake_quantize throughput vs a jitted copy. Not a test.

    python benchmarks/bench_jax.py [--m 4096 --k 1024 --n 4096 --repeats 5] [--no-kernel]

Prints best-of-N wall times (after one warm-up/compile call; candidates
interleaved round by round, since the machine may be shared) and ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fp8core import _kernel  # noqa: E402
from fp8core_jax import _ffi, fake_quantize, matmul_fp8_global, matmul_fp8_mixed  # noqa: E402


def timeit(fn, *args, repeats):
    return compare({"f": fn}, args, repeats)["f"]


CPU_TIMES: dict = {}  # name -> best process CPU seconds (all threads), filled by compare()


def compare(fns, args, repeats):
    """Best-of-``repeats`` seconds per function, calls interleaved round by round so
    that load from other processes hits every candidate alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    CPU_TIMES.update({k: min(v) for k, v in cpu.items()})
    return {k: min(v) for k, v in times.items()}


def fwd_bwd(matmul):
    """A training step: the loss value and its gradients. (``jax.grad`` alone would let
    XLA drop the forward product — the loss is linear in it — and time the backward only.)"""
    def loss(x, w, g):
        return jnp.sum((matmul(x, w) * g).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--numel", type=int, default=16 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-kernel", action="store_true",
                   help="the XLA path (as on GPU/TPU or without the C kernel)")
    a = p.parse_args()
    if a.no_kernel:
        _kernel.ENABLED = False
    print(f"jax {jax.__version__}, devices {jax.devices()}, "
          f"C kernel {'on' if _ffi.available() else 'off (XLA path)'}")
    rng = np.random.default_rng(0)
    plain = fwd_bwd(lambda x, w: x @ w)
    # the FP8 functions accumulate in float32 and round once; for bf16 that is also a
    # faster XLA:CPU program than a bf16 `x @ W`, so it is shown as a second baseline
    plain_f32acc = fwd_bwd(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32)
                           .astype(x.dtype))
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.standard_normal((a.m, a.k)), dtype)
        w = jnp.asarray(rng.standard_normal((a.k, a.n)) / 32, dtype)
        g = jnp.asarray(rng.standard_normal((a.m, a.n)), dtype)
        fns = {"plain": plain, "mixed": fwd_bwd(matmul_fp8_mixed), "global": fwd_bwd(matmul_fp8_global)}
        if dtype == jnp.bfloat16:
            fns["plain_f32acc"] = plain_f32acc
        t = compare(fns, (x, w, g), a.repeats)
        print(f"{jnp.dtype(dtype).name:8s} {a.m}x{a.k} @ {a.k}x{a.n} fwd+bwd plain x@W: "
              f"{t['plain']*1e3:8.1f} ms")
        if "plain_f32acc" in t:
            print(f"{jnp.dtype(dtype).name:8s} {'':>24s} plain, f32 accumulate: "
                  f"{t['plain_f32acc']*1e3:8.1f} ms  (FP8 mixed / global vs this: "
                  f"{t['mixed'] / t['plain_f32acc']:.3f} / {t['global'] / t['plain_f32acc']:.3f})")
        for name in ("mixed", "global"):
            print(f"{jnp.dtype(dtype).name:8s} {'':>24s} fwd+bwd {name:6s}: {t[name]*1e3:8.1f} ms  "
                  f"ratio {t[name] / t['plain']:.3f} (CPU-time ratio "
                  f"{CPU_TIMES[name] / CPU_TIMES['plain']:.3f})")
    x = jnp.asarray(rng.standard_normal(a.numel), jnp.float32)
    copy = jax.jit(lambda v: v + 0)
    tc = timeit(copy, x, repeats=a.repeats)
    print(f"jitted copy {a.numel} float32: {tc*1e3:.1f} ms ({a.numel * 8 / tc / 1e9:.1f} GB/s r+w)")
    for bs in (64, 4096, None):
        fq = jax.jit(lambda v, bs=bs: fake_quantize(v, "e4m3", bs))
        t = timeit(fq, x, repeats=a.repeats)
        print(f"fake_quantize e4m3 blocksize={bs}: {t*1e3:.1f} ms  "
              f"({a.numel / t / 1e6:.0f} Melem/s, {t / tc:.2f}x copy)")


if __name__ == "__main__":
    main()
