"""Research workflow for fp8core: reproducible experiments and numerics statistics.

* ``python -m fp8core_experiments.train_digits`` — the same MLP on scikit-learn's
  digits, fp32 / FP8-Mixed / FP8-Global, in PyTorch and JAX, from the same weights
  and batches; CSV, plot, torch-vs-JAX agreement check, quantization statistics.
* ``python -m fp8core_experiments.recipe_study`` — a character-level GPT trained under
  every recipe in both frameworks: CSV, 4-panel plot, Markdown summary.

The statistics collectors live in the backends (:mod:`fp8core_torch.stats`,
:mod:`fp8core_jax.stats`), the math in :mod:`fp8core.stats`.

Importing this package imports neither torch nor JAX.
"""
