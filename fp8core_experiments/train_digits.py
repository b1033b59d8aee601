"""Train the same MLP on scikit-learn's digits in PyTorch and JAX, fp32 vs FP8.

    python -m fp8core_experiments.train_digits --out-dir runs/train_digits

Six runs by default: {torch, jax} × {nn.Linear (fp32), LinearFP8Mixed, LinearFP8Global}
for a 64 → 128 → 10 ReLU MLP, e4m3 forward / e5m2 backward. All runs start from the
same weights (initialised in PyTorch from ``--seed``, moved to NNX by
``fp8core_jax.transfer``) and see the same batches (numpy RNG from ``--seed``);
plain SGD with the same learning rate. Writes to ``--out-dir``:

* ``train_digits.csv`` — per step: framework, mode, format, step, loss, train_acc,
  test_acc (accuracies on evaluation steps only, after that step's update);
* ``train_digits.png`` — loss curves, test accuracy, |torch − JAX| loss per step;
* ``train_digits_stats.csv`` — quantization statistics of the FP8 runs
  (fp8core.stats.summary_rows per run), also printed.

Then checks that torch and JAX loss trajectories of each configuration agree within
the tolerance (exit status 1 if not; see ``--tolerance``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["main", "run", "DEFAULT_TOLERANCE", "STEP1_TOLERANCE"]

#: Largest |loss_torch − loss_jax| allowed at any step of a run, per mode.
#: Both frameworks start from the same weights, see the same batches, and quantize
#: bit-identically; only matmul/reduction accumulation order differs (≈ 1 float32
#: ulp). In fp32 that stays at float32 noise (measured ≤ 5e-7 on a loss of 0.07–2.3).
#: In FP8 runs the first time such a 1-ulp difference lands on an FP8 rounding
#: midpoint, one element moves by a whole FP8 step (up to 2**-4 relative for e4m3)
#: and the two trajectories then drift apart like two SGD runs with slightly
#: different noise: measured ≤ 3e-3 over 300 steps, hence 1e-2 (loss curves'
#: batch-to-batch noise is ~5e-2). Longer runs drift further: pass --tolerance.
DEFAULT_TOLERANCE: dict[str, float] = {"fp32": 1e-5, "mixed": 1e-2, "global": 1e-2}
#: Largest |loss_torch − loss_jax| at step 1 (same weights, one forward pass), every mode:
#: a quantizer mismatch would show here as ~1e-4 or more.
STEP1_TOLERANCE = 1e-5


def _parse_formats(text: str) -> list[tuple[str, str]]:
    from fp8core import resolve_codebook

    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        fw, sep, bw = item.partition(":")
        if not sep or not fw or not bw:
            raise argparse.ArgumentTypeError(f"format pair must be FW:BW (e.g. e4m3:e5m2), got {item!r}")
        for name in (fw, bw):
            try:
                resolve_codebook(name)
            except (ValueError, TypeError) as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        pairs.append((fw, bw))
    if not pairs:
        raise argparse.ArgumentTypeError("no format pair given")
    return pairs


def _parse_list(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def build_parser() -> argparse.ArgumentParser:
    from fp8core_experiments.runs import MODES

    p = argparse.ArgumentParser(
        prog="python -m fp8core_experiments.train_digits",
        description="Train the same MLP on sklearn digits in PyTorch and JAX: fp32 vs FP8.")
    p.add_argument("--steps", type=int, default=300, help="SGD steps per run (default 300)")
    p.add_argument("--formats", type=_parse_formats, default=_parse_formats("e4m3:e5m2"),
                   help="comma-separated FW:BW codebook pairs for the FP8 runs, e.g. "
                        "e4m3:e5m2 (default), e4m3:e4m3, bnb_e4m3:bnb_e5m2")
    p.add_argument("--modes", type=_parse_list(MODES), default=list(MODES),
                   help="comma-separated subset of fp32,mixed,global (default all)")
    p.add_argument("--backends", type=_parse_list(("torch", "jax")), default=["torch", "jax"],
                   help="comma-separated subset of torch,jax (default both; the initial "
                        "weights are always made with torch)")
    p.add_argument("--seed", type=int, default=0, help="weights, split and batches (default 0)")
    p.add_argument("--out-dir", default=os.path.join("runs", "train_digits"),
                   help="output directory (default runs/train_digits)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    p.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--eval-every", type=int, default=25,
                   help="evaluate train/test accuracy every N steps and at the end")
    p.add_argument("--stats-every", type=int, default=25,
                   help="record FP8 quantization statistics every N steps and at step 1 "
                        "(0: never)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |loss_torch - loss_jax| at any step, all modes (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE.items()) + ")")
    p.add_argument("--no-check", action="store_true",
                   help="report the torch-vs-JAX agreement but exit 0 even if it fails")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the experiment, write the outputs; returns a summary dict
    (``results``, ``agreement``, ``passed``, ``paths``, ``seconds``, ``check``)."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.stats_every < 0:
        raise SystemExit("--steps and --eval-every must be >= 1, --stats-every >= 0")
    t0 = time.perf_counter()

    from fp8core import stats as fstats
    from fp8core_experiments import report, torch_runner
    from fp8core_experiments.data import batch_schedule, load_digits_split
    from fp8core_experiments.runs import RunSpec, TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      hidden=args.hidden, eval_every=args.eval_every,
                      stats_every=args.stats_every, seed=args.seed,
                      progress=not args.no_progress)
    data = load_digits_split(cfg.seed)
    batches = batch_schedule(len(data.y_train), cfg.batch_size, cfg.steps, cfg.seed)
    init = torch_runner.initial_state_dict(data.n_features, cfg.hidden, data.n_classes, cfg.seed)

    specs = [RunSpec("fp32")] if "fp32" in args.modes else []
    for fw, bw in args.formats:
        specs += [RunSpec(m, fw, bw) for m in ("mixed", "global") if m in args.modes]

    runners = {}
    for backend in args.backends:
        if backend == "torch":
            runners["torch"] = torch_runner.train
        else:
            from fp8core_experiments import jax_runner
            runners["jax"] = jax_runner.train

    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test, MLP "
          f"{data.n_features}-{cfg.hidden}-{data.n_classes} ReLU, SGD lr={cfg.lr}, "
          f"batch {cfg.batch_size}, {cfg.steps} steps, seed {cfg.seed}")
    results = []
    for spec in specs:
        for backend, train in runners.items():
            results.append(train(spec, cfg, data, init, batches))

    os.makedirs(args.out_dir, exist_ok=True)
    paths = {"log": os.path.join(args.out_dir, "train_digits.csv"),
             "plot": os.path.join(args.out_dir, "train_digits.png"),
             "stats": os.path.join(args.out_dir, "train_digits_stats.csv")}
    report.write_log_csv(paths["log"], results)
    report.write_stats_csv(paths["stats"], results)
    report.plot_runs(paths["plot"], results,
                     title=f"digits MLP {data.n_features}-{cfg.hidden}-{data.n_classes}, "
                           f"SGD lr={cfg.lr}, batch {cfg.batch_size}, seed {cfg.seed}")

    print("\nfinal accuracy (after the last step)")
    base = {r.framework: r.final["test_acc"] for r in results if r.spec.mode == "fp32"}
    for r in results:
        f = r.final
        delta = ""
        if r.spec.mode != "fp32" and r.framework in base:
            delta = f"   Δ test vs fp32 {100 * (f['test_acc'] - base[r.framework]):+.2f} points"
        print(f"  {r.framework:5s} {r.spec.label:22s} loss {f['loss']:.4f}  train "
              f"{report.fmt_pct(f['train_acc'])}  test {report.fmt_pct(f['test_acc'])}"
              f"  ({r.seconds:.1f} s){delta}")

    for r in results:
        if r.records:
            print(f"\nquantization statistics: {r.framework} {r.spec.label} "
                  f"(pooled over {len({x.step for x in r.records})} steps)")
            print(fstats.summary_table(r.records))

    agree = report.agreement(results)
    passed = True
    if agree:
        print("\ntorch vs JAX: max |loss difference| over all steps")
    for a in agree:
        tol = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[a["mode"]]
        ok = a["max_abs_diff"] <= tol and a["step1_diff"] <= STEP1_TOLERANCE
        passed &= ok
        a["tolerance"], a["ok"] = tol, ok
        print(f"  {a['mode']:6s} {a['format']:20s} max {a['max_abs_diff']:.2e} at step "
              f"{a['at_step']:4d} (tolerance {tol:g}); step 1 {a['step1_diff']:.1e} "
              f"(tolerance {STEP1_TOLERANCE:g}); within 1e-5 for the first "
              f"{a['steps_within_noise']} steps  {'OK' if ok else 'FAIL'}")

    seconds = time.perf_counter() - t0
    print(f"\nwrote {paths['log']}, {paths['plot']}, {paths['stats']}  ({seconds:.1f} s total)")
    return {"results": results, "agreement": agree, "passed": passed, "paths": paths,
            "seconds": seconds, "check": not args.no_check}


def main(argv: list[str] | None = None) -> int:
    summary = run(argv)
    if not summary["passed"]:
        print("torch and JAX loss trajectories disagree beyond the tolerance", file=sys.stderr)
        return 1 if summary["check"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
