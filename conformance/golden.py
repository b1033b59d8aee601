"""Golden vectors: reference outputs checked into the repository.

A regression that moved every backend at once (including the reference) would
pass the cross-backend comparisons; the golden vectors catch it. They are only
ever rewritten by ``python -m conformance --regenerate-golden``.
Stored as plain ``.npz`` (no pickle): raw bits for every float array.
"""

from __future__ import annotations

import pathlib

import numpy as np

from conformance import compare
from conformance.cases import Case
from conformance.runner import Result, case_inputs, execute
from conformance.adapters import NumpyBackend

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
_SEED = 0  # golden vectors are for seed 0 whatever --seed says

_SHAPE, _BS = (3, 100), 64


def golden_cases() -> dict[str, list[Case]]:
    """file stem -> cases: every native 8-bit format and the legacy tables, all
    distributions, fp32 and bf16, blockwise quantize+dequantize."""
    from conformance.cases import DISTRIBUTIONS, QUANTIZER_CODEBOOKS
    out = {}
    for cb in QUANTIZER_CODEBOOKS:
        out[cb] = [Case("quantize_blockwise", cb, _SHAPE, dtype, dist, _SEED, _BS)
                   for dtype in ("float32", "bfloat16") for dist in DISTRIBUTIONS if dist != "fp16_max"]
    return out


def _as_bits(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.kind == "u" else a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def regenerate(directory: pathlib.Path = GOLDEN_DIR) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, cases in golden_cases().items():
        arrays = {"ids": np.array([c.id for c in cases])}
        for i, case in enumerate(cases):
            arrays[f"c{i}_x"] = _as_bits(case_inputs(case)["x"])
            for key, value in execute(case, NumpyBackend()).items():
                arrays[f"c{i}_{key}"] = _as_bits(np.asarray(value))
        path = directory / f"{stem}.npz"
        np.savez_compressed(path, **arrays)
        written.append(path)
    return written


def check(directory: pathlib.Path = GOLDEN_DIR, pattern: str | None = None) -> list[Result]:
    """Compare the reference (and the input generator) with the stored vectors."""
    from conformance.cases import select
    results = []
    for stem, cases in golden_cases().items():
        path = directory / f"{stem}.npz"
        chosen = {c.id for c in select(cases, pattern)}
        if not chosen:
            continue
        if not path.exists():
            results.append(Result(f"golden[{stem}]", "golden", "numpy~golden", "failed",
                                  message=f"missing {path}; run python -m conformance --regenerate-golden"))
            continue
        with np.load(path, allow_pickle=False) as data:
            ids = list(data["ids"])
            for i, case in enumerate(cases):
                if case.id not in chosen:
                    continue
                if i >= len(ids) or ids[i] != case.id:
                    results.append(Result(case.id, "golden", "numpy~golden", "failed",
                                          message=f"{path.name} does not hold this case (stale golden file)"))
                    continue
                outputs = {"x": case_inputs(case)["x"], **execute(case, NumpyBackend())}
                outcomes = [compare.compare_bits(k, data[f"c{i}_{k}"], _as_bits(np.asarray(v)))
                            for k, v in outputs.items()]
                ok = all(o.passed for o in outcomes)
                results.append(Result(case.id, "golden", "numpy~golden", "passed" if ok else "failed",
                                      message="; ".join(o.message for o in outcomes if o.message)))
    return results
