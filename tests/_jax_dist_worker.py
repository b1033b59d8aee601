"""One process of the multi-process JAX runs of tests/test_jax_multiprocess.py (not a test file).

Run as

* ``python tests/_jax_dist_worker.py dist PROCESS_ID PORT OUT_DIR CASE[,CASE...]``: one of 2
  processes joined by ``jax.distributed.initialize`` (coordinator ``127.0.0.1:PORT``, gloo CPU
  collectives, one CPU device each);
* ``python tests/_jax_dist_worker.py single OUT_DIR CASE[,CASE...]``: the oracle, one process
  with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (set by the test).

Either way a global 1-D ``Mesh`` of 2 devices over axis ``"d"`` runs, per case
(``PRESET/path``, path ``kernel`` — the C kernel as an XLA FFI custom call — or ``xla``, the
jax.numpy body, selected at trace time through ``fp8core._kernel.ENABLED`` as
``FP8CORE_KERNEL=0`` does), one ``jax.jit(jax.value_and_grad(loss))`` step of a 2-layer MLP of
:func:`fp8core_jax.matmul_fp8` (``gelu(x @ W1 + b1) @ W2``, mean squared error), the batch
sharded ``P("d")`` (:data:`TOKENS` // 2 tokens per device) and the parameters replicated.
Inputs are numpy arrays from fixed seeds; each process builds the global arrays from its
shard with ``jax.make_array_from_process_local_data``. It writes ``OUT_DIR/{dist0,dist1,
single}.npz``: per case the loss, the forward output and the gradients gathered to host
(``process_allgather``), this process's own device copy of every replicated result
(``local/...``), and whether the lowered step calls the custom call (``custom_call``).

Exit code :data:`EXIT_PLATFORM` with a line ``PLATFORM: <reason>`` on stderr when
``jax.distributed.initialize`` or the first collective raises — the platform cannot run
multi-process CPU JAX here (the test skips with that reason); any other failure is a
traceback and exit code 1 (the test fails).
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np

EXIT_PLATFORM = 77
TOKENS, D_IN, HIDDEN, D_OUT = 256, 256, 256, 128   # a device: 128 tokens, one 1×128 block
INIT_TIMEOUT_S = 60
PATHS = ("kernel", "xla")


def inputs() -> dict[str, np.ndarray]:
    """The global batch and the parameters (numpy, seed 0). The second half of the batch (the
    second device's shard) is 16× larger in its even features and a fifth of the tokens are
    tiny, so per-tensor and per-channel amax over the token axis differ between the shards."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((TOKENS, D_IN)).astype(np.float32)
    x[TOKENS // 2:, ::2] *= 16
    x[::5] *= 1e-3
    return {
        "x": x,
        "y": rng.standard_normal((TOKENS, D_OUT)).astype(np.float32),
        "W1": (rng.standard_normal((D_IN, HIDDEN)) / np.sqrt(D_IN)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "W2": (rng.standard_normal((HIDDEN, D_OUT)) / np.sqrt(HIDDEN)).astype(np.float32),
    }


def _platform_exit(what: str, exc: BaseException) -> None:
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:600]
    print(f"PLATFORM: {what} raised {msg}", file=sys.stderr, flush=True)
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(EXIT_PLATFORM)   # no atexit: a half-initialised distributed client may hang


def main(argv: list[str]) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_default_matmul_precision", "highest")
    if argv[0] == "dist":
        pid, port, out_dir, cases = int(argv[1]), int(argv[2]), argv[3], argv[4]
        # gloo is jax 0.10's default for CPU; said explicitly (older jax had none)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                       num_processes=2, process_id=pid,
                                       initialization_timeout=INIT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 — any failure here is the platform's
            _platform_exit("jax.distributed.initialize", e)
        name = f"dist{pid}"
    else:
        out_dir, cases = argv[1], argv[2]
        name = "single"

    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices()
    if len(devices) != 2 or len(jax.local_devices()) != (1 if name != "single" else 2):
        raise RuntimeError(f"expected 2 devices ({name}), got {devices}, "
                           f"local {jax.local_devices()}")
    mesh = Mesh(np.array(devices), ("d",))
    rows, repl = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    nproc, me = jax.process_count(), jax.process_index()

    def global_array(a: np.ndarray, sharding) -> jax.Array:
        if sharding is rows:                 # this process's contiguous share of the tokens
            n = a.shape[0] // nproc
            local = a[me * n:(me + 1) * n]
        else:
            local = a                        # replicated: every process holds all of it
        return jax.make_array_from_process_local_data(sharding, local, a.shape)

    if name != "single":
        try:                                 # the first collective: an all-reduce over gloo
            probe = global_array(np.arange(4, dtype=np.float32).reshape(4, 1), rows)
            total = jax.jit(jnp.sum, out_shardings=repl)(probe)
            gathered = multihost_utils.process_allgather(probe, tiled=True)
            ok = (float(total.addressable_data(0)) == 6.0
                  and gathered.ravel().tolist() == [0, 1, 2, 3])
        except Exception as e:  # noqa: BLE001
            _platform_exit("the first cross-process collective", e)
        if not ok:
            raise RuntimeError(f"collective probe gave {total}, {gathered}")

    import fp8core._kernel
    import fp8core_jax
    from fp8core_jax import _ffi

    kernel_ok = _ffi.available()             # loads the handler library outside any trace
    data = inputs()
    x, y = global_array(data["x"], rows), global_array(data["y"], rows)
    params = {k: global_array(data[k], repl) for k in ("W1", "b1", "W2")}

    results: dict[str, np.ndarray] = {"kernel_available": np.array(kernel_ok)}
    for case in cases.split(","):
        recipe = case
        for path in PATHS:
            if path == "kernel" and not kernel_ok:
                continue
            key = f"{case}/{path}"
            fp8core._kernel.ENABLED = path == "kernel"

            def loss(p, x, y, recipe=recipe):
                h = jax.nn.gelu(fp8core_jax.matmul_fp8(x, p["W1"], recipe=recipe, bias=p["b1"]))
                out = fp8core_jax.matmul_fp8(h, p["W2"], recipe=recipe)
                return jnp.mean(jnp.square(out - y)), out

            step = jax.jit(jax.value_and_grad(loss, has_aux=True),
                           in_shardings=(repl, rows, rows),
                           out_shardings=((repl, rows), repl))
            # the compiled (partitioned) module: under custom_partitioning the kernel's
            # custom call appears only once the sharding rule has run
            compiled = step.lower(params, x, y).compile()
            results[f"{key}/custom_call"] = np.array("fp8q_xla_" in compiled.as_text())
            (value, out), grads = step(params, x, y)
            host = multihost_utils.process_allgather(
                {"loss": value, "out": out, **{f"grad_{k}": g for k, g in grads.items()}},
                tiled=True)
            for k, v in host.items():
                results[f"{key}/{k}"] = np.asarray(v)
            results[f"{key}/local/loss"] = np.asarray(value.addressable_data(0))
            for k, g in grads.items():
                results[f"{key}/local/grad_{k}"] = np.asarray(g.addressable_data(0))
    fp8core._kernel.ENABLED = True
    np.savez(os.path.join(out_dir, f"{name}.npz"), **results)
    if name != "single":
        multihost_utils.sync_global_devices("fp8core results written")
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
