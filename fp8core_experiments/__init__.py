"""Research workflow for fp8core: reproducible experiments and numerics statistics.

* ``python -m fp8core_experiments.train_digits`` — the same MLP on scikit-learn's
  digits, fp32 / FP8-Mixed / FP8-Global, in PyTorch and JAX, from the same weights
  and batches; CSV, plot, torch-vs-JAX agreement check, quantization statistics.
* :mod:`fp8core_experiments.torch_stats`, :mod:`fp8core_experiments.jax_stats` —
  thin collectors feeding the operands FP8 layers quantize to :mod:`fp8core.stats`.

Importing this package imports neither torch nor JAX.
"""
