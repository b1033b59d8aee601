"""What collecting quantization statistics costs in a training step, torch and JAX.

    python benchmarks/stats_overhead.py [--recipes MXFP8,TENSORWISE] [--steps 40] [--every 1,10,100]

Trains the recipe study's char GPT (default sizes) once without statistics (only the last
step records) and once recording every step, and prints the median step time of each, the
cost of one collected step (hooks / taps, the device-to-host copy and fp8core.stats' numpy
math) and the average overhead when collecting every N steps (= that cost / N). The JAX
step always returns the operands (the taps are part of the one jitted step); collecting
means fetching them and computing the records. Timing on a shared machine is noisy: run
it on a quiet one and quote ``uptime``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _common import header  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", default="TENSORWISE,MXFP8")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", default="1,10,100")
    args = p.parse_args(argv)
    from fp8core_experiments import char_gpt, gpt_jax, gpt_torch

    corpus = char_gpt.load_corpus()
    cfg = char_gpt.GPTConfig(vocab_size=len(corpus.vocab))
    batches = char_gpt.train_batches(corpus, cfg, args.steps, 0)
    val = char_gpt.val_batches(corpus, cfg, n_batches=1)
    init = gpt_torch.initial_state_dict(cfg, 0)
    every = [int(n) for n in args.every.split(",")]
    print(header())
    print(f"char GPT {cfg.n_blocks}x{cfg.d_model}, batch {cfg.batch_size}x{cfg.context}, "
          f"{args.steps} steps (step 1 excluded)")
    print(f"{'framework':9s} {'recipe':16s} {'ms/step':>8s} {'ms/collected':>12s} "
          + " ".join(f"{'every ' + str(n):>10s}" for n in every))
    for recipe in args.recipes.split(","):
        for name, train in (("torch", gpt_torch.train), ("jax", gpt_jax.train)):
            plain = train(recipe, cfg, init, batches, val, eval_every=10**9, stats_every=0,
                          progress=False)
            full = train(recipe, cfg, init, batches, val, eval_every=10**9, stats_every=1,
                         progress=False)
            base = np.median([r["seconds"] for r in plain["rows"][1:-1]])
            coll = np.median([r["seconds"] for r in full["rows"][1:-1]])
            extra = coll - base
            print(f"{name:9s} {recipe:16s} {1e3 * base:8.1f} {1e3 * coll:12.1f} "
                  + " ".join(f"{100 * extra / n / base:+9.1f}%" for n in every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
