"""Sharded JAX training step on 4 host devices (not a test): every recipe preset against the
fp32 step, data-parallel and tensor-parallel, on the C-kernel (custom call) and XLA paths,
with the collectives of each compiled step printed beside its time (issue 12 item 5).

    python benchmarks/bench_sharded.py [--quick] [--repeats 5] [--recipes A,B]
                                       [--layouts dp,tp] [--paths kernel,xla] [--no-single]

The step is bench_jax.py's ``model`` step — one jitted AdamW step (forward, cross-entropy,
backward, optax AdamW; parameters and optimizer state donated) of its small pre-norm causal
NNX transformer (``_common.MODEL``; ``--quick``: 1 block, batch 4, sequence 64), every
``nnx.Linear`` but the head converted with ``convert_to_fp8(recipe=...)`` — on a mesh of 4
host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``; the script re-executes
itself with the flag, which must be set before jax starts):

* ``dp`` (data-parallel): tokens and targets sharded over the batch (``P('d')``), every
  parameter and optimizer state replicated;
* ``tp`` (tensor-parallel, Megatron-style): ``qkv`` and ``fc1`` column-sharded (kernel
  ``P(None, 'd')``, bias ``P('d')``), ``proj`` and ``fc2`` row-sharded (kernel ``P('d', None)``,
  bias replicated), the rest replicated; tokens replicated. The optimizer state follows its
  parameter; the step's outputs are pinned to its inputs' shardings.

Each ratio is FP8 / the fp32 step of the same layout (the same ``nnx.Linear`` model
unconverted), the median of ``repeats`` back-to-back pairs in one process after warm-up
(``_common.paired``; the best-times and process-CPU-time ratios are printed as second
opinions). Target ≤ 1.15× (``_common.TARGETS["model"]``). ``single`` is the same pair with
every array on one device (no collectives), the reference for what sharding adds. The
collective counts are those of the compiled (partitioned) step's HLO, counted by
``sharding_collectives._count``; "+n AG" is the all-gathers the FP8 step has beyond the
fp32 step's.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
QUICK_MODEL = dict(layers=1, d_model=256, heads=4, seq=64, batch=4, vocab=512)
LAYOUTS = ("dp", "tp")
PATHS = ("kernel", "xla")


def _tp_spec(path: tuple) -> tuple:
    """Megatron sharding of a parameter, by its state path (…, layer name, 'kernel'|'bias')."""
    names = [n for n in (str(getattr(k, "key", getattr(k, "name", k))) for k in path) if n != "value"]
    layer, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1])
    if layer in ("qkv", "fc1"):
        return (None, "d") if leaf == "kernel" else ("d",)
    if layer in ("proj", "fc2") and leaf == "kernel":
        return ("d", None)
    return ()


class ShardedStep:
    """bench_jax.TrainStep on a mesh: parameters (and their optimizer state) placed by
    ``layout``, outputs pinned to the inputs' shardings (so every call runs the one
    compiled step), parameters and optimizer state donated."""

    def __init__(self, model, idx, tgt, mesh, layout: str):
        import bench_jax as bj
        import jax
        import optax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(1e-4)

        def spec(path, _):
            return NamedSharding(mesh, P(*_tp_spec(path)) if layout == "tp" else P())
        p_shard = jax.tree_util.tree_map_with_path(spec, params)
        params = jax.device_put(params, p_shard)
        repl = NamedSharding(mesh, P())
        opt_state = jax.jit(tx.init)(params)  # moments follow their parameter; the count:
        opt_state = jax.tree.map(  # a fresh scalar on one device, replicated here
            lambda a: a if len(a.sharding.device_set) == mesh.size else jax.device_put(a, repl),
            opt_state)
        o_shard = jax.tree.map(lambda a: a.sharding, opt_state)
        data = NamedSharding(mesh, P("d") if layout == "dp" else P())

        self.fn = jax.jit(bj.adamw_step(graphdef, rest, tx), donate_argnums=(0, 1),
                          out_shardings=(p_shard, o_shard, repl))
        self.state = (params, opt_state)
        self.data = (jax.device_put(idx, data), jax.device_put(tgt, data))
        self.p_shard = p_shard

    def collectives(self) -> dict[str, int]:
        from sharding_collectives import _count
        return _count(self.fn.lower(*self.state, *self.data).compile().as_text())

    def __call__(self):
        import jax
        params, opt_state, loss = self.fn(*self.state, *self.data)
        self.state = (params, opt_state)
        jax.block_until_ready(loss)

    def shardings_kept(self) -> bool:
        import jax
        got = jax.tree.leaves(jax.tree.map(lambda a: a.sharding, self.state[0]))
        return all(g.is_equivalent_to(w, a.ndim) for g, w, a in
                   zip(got, jax.tree.leaves(self.p_shard), jax.tree.leaves(self.state[0])))


def _fmt(c: dict[str, int]) -> str:
    return f"AG {c['all-gather']} AR {c['all-reduce']} A2A {c['all-to-all']} CP {c['collective-permute']}"


def _run(a) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    import bench_jax as bj
    from _common import TARGETS, cpu_flags, flags_line, header, paired, stamp, verdict
    from fp8core import _kernel
    from fp8core_jax import _ffi

    warnings.filterwarnings("ignore", message=".*span rows.*")  # BNB_MIXED's flat blocks
    assert len(jax.devices()) == 4, jax.devices()
    cfg = QUICK_MODEL if a.quick else bj.MODEL
    mesh = Mesh(np.array(jax.devices()), ("d",))
    one = Mesh(np.array(jax.devices()[:1]), ("d",))
    rng = np.random.default_rng(2)
    shape = (cfg["batch"], cfg["seq"])
    idx = jnp.asarray(rng.integers(0, cfg["vocab"], shape), jnp.int32)
    tgt = jnp.asarray(rng.integers(0, cfg["vocab"], shape), jnp.int32)
    target = TARGETS["model"]
    print(header())
    print(f"jax {jax.__version__}, {len(jax.devices())} host devices, repeats {a.repeats}, "
          f"C kernel {'on' if _ffi.available() else 'off'}; model {cfg} "
          f"({cfg['batch'] * cfg['seq']} tokens, {cfg['batch'] * cfg['seq'] // 4} per device in dp)")
    print(flags_line(cpu_flags()))
    paths = [p for p in a.paths if p != "kernel" or _ffi.available()]
    if len(paths) < len(a.paths):
        print("kernel path: unavailable (no FFI wrapper), skipped")
    results = {}
    for layout in a.layouts:
        base = ShardedStep(bj.TinyLM(**cfg, rngs=nnx.Rngs(0)), idx, tgt, mesh, layout)
        bc = base.collectives()
        single = ShardedStep(bj.TinyLM(**cfg, rngs=nnx.Rngs(0)), idx, tgt, one, "dp") \
            if a.single else None
        print(f"\n[{layout}] fp32 step: {_fmt(bc)}  {stamp()}")
        print(f"  {'path':6} {'preset':20} {'fp32 ms':>8} {'FP8 ms':>8} {'ratio':>6} {'best':>5} "
              f"{'cpu':>5} {'single':>6}  {'collectives (FP8 step)':30} {'+AG':>4}  target")
        for path in paths:
            _kernel.ENABLED = path == "kernel"   # read at trace time: each step traces anew
            for rec in a.recipes:
                try:
                    cand = ShardedStep(bj.convert_for(rec, bj.TinyLM(**cfg, rngs=nnx.Rngs(0))),
                                       idx, tgt, mesh, layout)
                    cc = cand.collectives()
                    tb, tc, *ratio = paired(base, cand, a.repeats, warmup=2)
                    kept = cand.shardings_kept()
                    rs = None
                    if single is not None:
                        s1 = ShardedStep(bj.convert_for(rec, bj.TinyLM(**cfg, rngs=nnx.Rngs(0))),
                                         idx, tgt, one, "dp")
                        rs = paired(single, s1, a.repeats, warmup=2)[2]
                except Exception as e:  # noqa: BLE001 - a failing candidate is reported
                    print(f"  {path:6} {rec:20} failed: {type(e).__name__}: {e}"[:300], flush=True)
                    continue
                extra = cc["all-gather"] - bc["all-gather"]
                results[(layout, path, rec)] = (ratio[0], extra, rs)
                print(f"  {path:6} {rec:20} {tb * 1e3:8.1f} {tc * 1e3:8.1f} {ratio[0]:6.2f} "
                      f"{ratio[1]:5.2f} {ratio[2]:5.2f} {'' if rs is None else f'{rs:6.2f}':>6}  "
                      f"{_fmt(cc):30} {extra:+4d}  {verdict(ratio[0], target)}"
                      f"{'' if kept else '  parameter sharding LOST'}", flush=True)
        _kernel.ENABLED = True
    if results:
        print(f"\nsummary (ratio FP8 / fp32 sharded step, extra all-gathers), target ≤ {target}:")
        print(f"  {'preset':20} " + " ".join(f"{l + ' ' + p:>14}" for l in a.layouts for p in paths))
        for rec in a.recipes:
            cells = []
            for layout in a.layouts:
                for path in paths:
                    r = results.get((layout, path, rec))
                    cells.append(f"{'failed':>14}" if r is None else
                                 f"{r[0]:7.2f} {'✓' if r[0] <= target else '✗'} {r[1]:+3d}AG")
            print(f"  {rec:20} " + " ".join(cells))
    print(f"\ndone {stamp()}")


def main() -> None:
    sys.path[:0] = [str(HERE), str(ROOT)]
    import fp8core.recipe

    presets = list(fp8core.recipe.PRESETS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"model {QUICK_MODEL}, 3 repeats, no single-device column (< 3 min)")
    p.add_argument("--repeats", type=int, default=None, help="pairs per ratio (default 5; --quick 3)")
    p.add_argument("--recipes", default=",".join(presets),
                   help=f"comma-separated presets (default all: {','.join(presets)})")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="dp, tp or both (default)")
    p.add_argument("--paths", default=",".join(PATHS), help="kernel, xla or both (default)")
    p.add_argument("--no-single", action="store_true", help="skip the one-device reference ratio")
    a = p.parse_args()
    a.recipes = [r.strip() for r in a.recipes.split(",") if r.strip()]
    a.layouts = [x.strip() for x in a.layouts.split(",") if x.strip()]
    a.paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    for what, got, allowed in (("--recipes", a.recipes, presets), ("--layouts", a.layouts, LAYOUTS),
                               ("--paths", a.paths, PATHS)):
        bad = [g for g in got if g not in allowed]
        if bad or not got:
            p.error(f"{what}: {bad or 'empty'} not allowed; choose from {', '.join(allowed)}")
    if a.repeats is None:
        a.repeats = 3 if a.quick else 5
    a.single = not (a.no_single or a.quick)
    from sharding_collectives import reexec_on_host_devices
    reexec_on_host_devices(__file__)
    _run(a)


if __name__ == "__main__":
    main()
