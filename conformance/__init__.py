"""The cross-framework conformance suite: one set of cases, run on the numpy
reference, on PyTorch and on JAX, compared bit for bit where the contract says
bits (docs/numerics.md) and against a float64 oracle where results go through
a matmul. ``python -m conformance --help`` for the runner."""

from conformance.cases import Case, all_cases, select
from conformance.runner import Result, format_table, run, run_case

__all__ = ["Case", "Result", "all_cases", "format_table", "run", "run_case", "select"]
