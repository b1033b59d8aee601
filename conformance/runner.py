"""Run cases on backends, compare, summarise and write reports.

One code path serves both entry points: ``python -m conformance`` and the
pytest integration (tests/test_conformance.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
import warnings

import numpy as np

import fp8core
from fp8core import _kernel
from fp8core.recipe import PRESETS, SLOTS
from conformance import compare
from conformance.adapters import BACKENDS, CROSS_PAIRS, NumpyBackend, forget_oracle
from conformance.cases import (
    MATMUL_OPS,
    MODULE_OPS,
    OPERAND_OPS,
    QUANTIZER_OPS,
    RECIPE_MATMUL_OPS,
    RECIPE_MODULE_OPS,
    RECIPE_TRAIN_OPS,
    TRAIN_OPS,
    Case,
)
from conformance.inputs import NP_DTYPES, draw, rng_for

#: every backend path, reference first (the default of :func:`run_case` and :func:`run`)
DEFAULT_BACKENDS = tuple(BACKENDS)

#: Loss trajectories of the same training run may differ by this much (absolute, per step).
TRAIN_LOSS_TOLERANCE = 2e-3
TRAIN_LR = 0.1


@dataclasses.dataclass(frozen=True)
class Result:
    case_id: str
    op: str
    pair: str
    status: str  # "passed" | "failed" | "skipped"
    worst_ulps: float = 0.0
    worst_rel: float = 0.0
    message: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("worst_ulps", "worst_rel"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


# ------------------------------------------------------------------ inputs

@functools.lru_cache(maxsize=64)
def case_inputs(case: Case) -> dict[str, np.ndarray]:
    """The case's inputs (cached: every backend gets the same arrays)."""
    if case.op in QUANTIZER_OPS + OPERAND_OPS:
        return {"x": draw(case.distribution, case.shape, case.dtype, case.seed, case.codebook, case.blocksize)}
    if case.op in MATMUL_OPS + RECIPE_MATMUL_OPS:
        k, n = case.b_shape
        return {
            "a": draw(case.distribution, case.shape, case.dtype, case.seed, label="A"),
            "b": (draw("normal", case.b_shape, "float32", case.seed, label="B") / np.float32(math.sqrt(k))),
            "g": draw("normal", case.shape[:-1] + (n,), case.dtype, case.seed, label="grad"),
        }
    if case.op in MODULE_OPS + RECIPE_MODULE_OPS:
        k, n = case.b_shape
        return {
            "x": draw(case.distribution, case.shape, case.dtype, case.seed, label="x"),
            "weight": draw("uniform", (n, k), "float32", case.seed, label="W") / np.float32(3 * math.sqrt(k)),
            "bias": draw("uniform", (n,), "float32", case.seed, label="bias") / np.float32(3 * math.sqrt(k)),
        }
    if case.op in TRAIN_OPS + RECIPE_TRAIN_OPS:
        batch, features = case.shape
        hidden, classes = 32, case.b_shape[1]
        rng = rng_for(case.seed, "train", case.id)
        centers = rng.standard_normal((classes, features)).astype(np.float32)
        labels = rng.integers(0, classes, (case.steps, batch))
        batches = (centers[labels] + rng.standard_normal((case.steps, batch, features))).astype(np.float32)
        lim1, lim2 = 1 / math.sqrt(features), 1 / math.sqrt(hidden)
        return {
            "w1": rng.uniform(-lim1, lim1, (hidden, features)).astype(np.float32),
            "b1": rng.uniform(-lim1, lim1, hidden).astype(np.float32),
            "w2": rng.uniform(-lim2, lim2, (classes, hidden)).astype(np.float32),
            "b2": rng.uniform(-lim2, lim2, classes).astype(np.float32),
            "batches": batches,
            "labels": labels.astype(np.int64),
        }
    raise ValueError(f"unknown op {case.op!r}")


# --------------------------------------------------------------- execution

def _mode(op: str) -> str:
    return "mixed" if "mixed" in op else "global"


def _layer(case: Case):
    """What a module/training case's layers are: ``"mixed"``, ``"global"`` or a LinearRecipe."""
    return PRESETS[case.recipe] if case.recipe else _mode(case.op)


def execute(case: Case, backend) -> dict[str, np.ndarray]:
    """Run ``case`` on one backend; returns named numpy outputs."""
    inp = case_inputs(case)
    cb = case.codebook
    if case.op == "quantize_blockwise":
        codes, absmax = backend.quantize_blockwise(inp["x"], cb, case.blocksize)
        deq = backend.dequantize_blockwise(codes, absmax, cb, case.blocksize, case.dtype)
        return {"codes": codes, "absmax": absmax, "dequantized": deq}
    if case.op == "quantize_global":
        codes, absmax = backend.quantize_global(inp["x"], cb)
        return {"codes": codes, "absmax": absmax, "dequantized": backend.dequantize_global(codes, absmax, cb, case.dtype)}
    if case.op == "fake_quantize_blockwise":
        return {"values": backend.fake_quantize(inp["x"], cb, case.blocksize)}
    if case.op == "fake_quantize_global":
        return {"values": backend.fake_quantize(inp["x"], cb, None)}
    if case.op == "quantize_operand":
        codes, absmax = backend.quantize_operand(inp["x"], case.rule, case.axis)
        deq = backend.dequantize_operand(codes, absmax, case.rule, case.axis, case.dtype)
        return {"codes": codes, "absmax": absmax, "dequantized": deq}
    if case.op == "fake_quantize_operand":
        return {"values": backend.fake_quantize_operand(inp["x"], case.rule, case.axis)}
    if case.op in MATMUL_OPS:
        return backend.matmul(_mode(case.op), inp["a"], inp["b"], inp["g"], cb, case.bw_codebook,
                              case.blocksize, case.blocksize2)
    if case.op in RECIPE_MATMUL_OPS:
        return backend.matmul_recipe(inp["a"], inp["b"], inp["g"], PRESETS[case.recipe])
    if case.op in MODULE_OPS + RECIPE_MODULE_OPS:
        return {"out": backend.linear(_layer(case), inp["x"], inp["weight"], inp["bias"], cb, case.bw_codebook)}
    if case.op in TRAIN_OPS + RECIPE_TRAIN_OPS:
        params = {k: inp[k] for k in ("w1", "b1", "w2", "b2")}
        return {"loss": backend.train(_layer(case), params, inp["batches"], inp["labels"], cb,
                                      case.bw_codebook, TRAIN_LR)}
    raise ValueError(f"unknown op {case.op!r}")


def _codebooks(case: Case):
    """The codebooks a case quantizes with."""
    if case.rule is not None:
        return (case.rule.format,)
    if case.recipe:
        recipe = PRESETS[case.recipe]
        return tuple(recipe.rule(s).format for s in ("input", "weight", "grad_output") if recipe.rule(s))
    return tuple(fp8core.resolve_codebook(c) for c in (case.codebook, case.bw_codebook) if c)


def _kernel_scale_rules(case: Case) -> bool:
    """Whether the kernel executes a scale rule of the case (``fp8core._kernel.SCALE_RULE_CODES``;
    the MX and NVFP4 rules run on the framework's ops on every path, so a forced-on path
    does not reach the kernel — JAX still records its XLA decision for them)."""
    if case.rule is not None:
        return case.rule.scale in _kernel.SCALE_RULE_CODES
    if case.recipe:
        recipe = PRESETS[case.recipe]
        return any(recipe.rule(s).scale in _kernel.SCALE_RULE_CODES for s in SLOTS if recipe.rule(s))
    return True


def path_problem(case: Case, name: str, probe) -> str | None:
    """Why ``probe`` shows that backend ``name`` did not run the path it was forced to, or None.

    A forced-off path must never reach the C kernel; a forced-on path must reach it at
    least once when the case has a codebook the kernel takes (tables are rounded by the
    framework on every path) and a scale rule it executes (:func:`_kernel_scale_rules`). torch counts kernel calls, JAX records each kernel/XLA
    decision (none at all would mean a trace cached across the flag: the path is unknown).
    """
    if probe.kernel is None:
        return None
    native = (any(_kernel.supports(cb) for cb in _codebooks(case))
              and _kernel_scale_rules(case))
    if name.startswith("torch"):
        if not probe.kernel and probe.kernel_calls:
            return f"{name} was forced off the C kernel but called it {probe.kernel_calls} times"
        if probe.kernel and native and not probe.kernel_calls:
            return f"{name} was forced onto the C kernel but never called it"
        return None
    if not probe.decisions and (probe.kernel or native):
        return f"{name}: fp8core_jax made no kernel/XLA decision (a trace cached across the flag?)"
    if not probe.kernel and any(probe.decisions):
        return f"{name} was forced onto XLA but chose the kernel {sum(probe.decisions)} times"
    if probe.kernel and native and not any(probe.decisions):
        return f"{name} was forced onto the kernel but chose XLA every time"
    return None


def _bounds(case: Case, oracle: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inp = case_inputs(case)
    if case.op in MATMUL_OPS + RECIPE_MATMUL_OPS:
        if case.recipe:
            ops = NumpyBackend.recipe_operands(inp["a"], inp["b"], inp["g"], PRESETS[case.recipe])
        else:
            ops = NumpyBackend.operands(_mode(case.op), inp["a"], inp["b"], inp["g"], case.codebook,
                                        case.bw_codebook, case.blocksize, case.blocksize2)
        out_dtype = {"out": case.dtype, "grad_a": case.dtype, "grad_b": "float32"}
        return {k: compare.accumulation_bound(x.reshape(-1, x.shape[-1]), y, oracle[k].reshape(-1, y.shape[-1]),
                                              case.dtype, out_dtype[k]).reshape(oracle[k].shape)
                for k, (x, y) in ops.items()}
    if case.op in MODULE_OPS + RECIPE_MODULE_OPS:
        x, w = inp["x"], inp["weight"]
        k = w.shape[1]
        qx, qw = NumpyBackend.linear_operands(_layer(case), x, w, case.codebook)
        acc = compare.accumulation_bound(qx.reshape(-1, k), qw.T, oracle["out"].reshape(-1, w.shape[0]),
                                         case.dtype, case.dtype).reshape(oracle["out"].shape)
        u = compare._UNIT_ROUNDOFF[case.dtype]
        return {"out": acc + 2 * u * (np.abs(oracle["out"]) + np.abs(inp["bias"]))}
    return {}


def _compare(case: Case, name_a: str, out_a: dict, name_b: str, out_b: dict, bounds: dict) -> compare.Outcome:
    outcomes = []
    for key in out_a:
        if case.tier == "bitwise":
            outcomes.append(compare.compare_bits(key, out_a[key], out_b[key]))
        elif case.op in TRAIN_OPS + RECIPE_TRAIN_OPS:
            bound = np.full(out_a[key].shape, TRAIN_LOSS_TOLERANCE)
            outcomes.append(compare.compare_tolerance(key, np.asarray(out_a[key], np.float64), out_b[key], bound))
        else:
            # vs the oracle: the bound; between two backends: the sum of both bounds
            factor = 1.0 if name_a == "numpy" else 2.0  # ulps in the compute dtype (A's dtype)
            outcomes.append(compare.compare_tolerance(key, np.asarray(out_a[key], np.float64), out_b[key],
                                                      factor * bounds[key], NP_DTYPES[case.dtype]))
    return compare.Outcome(
        passed=all(o.passed for o in outcomes),
        worst_ulps=max((o.worst_ulps for o in outcomes), default=0.0),
        worst_rel=max((o.worst_rel for o in outcomes), default=0.0),
        message="; ".join(o.message for o in outcomes if o.message),
    )


def pairs_for(backend_names) -> list[tuple[str, str]]:
    """The comparisons of a run: numpy with every other backend, then the
    :data:`~conformance.adapters.CROSS_PAIRS` whose backends are both in the run."""
    names = tuple(backend_names)
    pairs = [(names[0], b) for b in names[1:]]
    return pairs + [p for p in CROSS_PAIRS if p[0] in names and p[1] in names]


def run_case(case: Case, backend_names=DEFAULT_BACKENDS) -> list[Result]:
    """Run one case on every named backend (the first is the reference, numpy) with each
    backend's path forced, check that the path ran, and compare the :func:`pairs_for`."""
    backend_names = tuple(n for n in backend_names if n not in case.not_on)  # by design (Case.not_on)
    forget_oracle()
    try:
        return _run_case(case, backend_names)
    finally:
        forget_oracle()


def _run_case(case: Case, backend_names) -> list[Result]:
    outputs, skipped = {}, {}
    for name in backend_names:
        backend = BACKENDS[name]
        reason = backend.unavailable()
        if reason:
            skipped[name] = reason
            continue
        try:
            with backend.forced() as probe, warnings.catch_warnings(), np.errstate(all="ignore"):
                # bitsandbytes' flat blocks spanning rows: the layers' documented warning
                warnings.filterwarnings("ignore", message=r".*which span rows of the", category=UserWarning)
                outputs[name] = execute(case, backend)
            problem = path_problem(case, name, probe)
            if problem:
                raise RuntimeError(problem)
        except Exception as err:  # a crash is a failure of that backend, reported with the case
            outputs[name] = err
    bounds = _bounds(case, outputs["numpy"]) if isinstance(outputs.get("numpy"), dict) else {}
    results = []
    for a, b in pairs_for(backend_names):
        pair = f"{a}~{b}"
        if skipped.get(a) or skipped.get(b):
            results.append(Result(case.id, case.op, pair, "skipped", message=skipped.get(a) or skipped.get(b)))
            continue
        errors = [f"{n} raised {type(outputs[n]).__name__}: {outputs[n]}" for n in (a, b)
                  if isinstance(outputs[n], Exception)]
        if errors:
            results.append(Result(case.id, case.op, pair, "failed", math.inf, math.inf, "; ".join(errors)))
            continue
        o = _compare(case, a, outputs[a], b, outputs[b], bounds)
        results.append(Result(case.id, case.op, pair, "passed" if o.passed else "failed",
                              o.worst_ulps, o.worst_rel, o.message))
    return results


def run(cases, backend_names=DEFAULT_BACKENDS, progress: bool = True) -> list[Result]:
    """Run every case; a tqdm progress bar on stderr when ``progress``."""
    iterator = cases
    if progress:
        try:
            from tqdm import tqdm
            # disable=None: a bar on a terminal, nothing in a CI log
            iterator = tqdm(cases, desc="conformance", unit="case", leave=False, disable=None)
        except ImportError:
            pass
    results = []
    for case in iterator:
        results.extend(run_case(case, backend_names))
    return results


# ------------------------------------------------------------------ reports

def summarize(results) -> dict:
    """{op: {pair: {"passed", "failed", "skipped", "worst_ulps", "worst_rel"}}}."""
    table: dict = {}
    for r in results:
        cell = table.setdefault(r.op, {}).setdefault(
            r.pair, {"passed": 0, "failed": 0, "skipped": 0, "worst_ulps": 0.0, "worst_rel": 0.0})
        cell[r.status] += 1
        if r.status != "skipped":
            cell["worst_ulps"] = max(cell["worst_ulps"], r.worst_ulps)
            cell["worst_rel"] = max(cell["worst_rel"], r.worst_rel)
    return table


def _cell(c: dict) -> str:
    if c["passed"] + c["failed"] == 0:
        return f"skipped {c['skipped']}"
    text = f"{c['passed']}/{c['passed'] + c['failed']}"
    if c["failed"]:
        text += f" ({c['failed']} FAILED)"
    if c["skipped"]:
        text += f" +{c['skipped']} skipped"
    if c["worst_ulps"]:
        text += f" ≤{c['worst_ulps']:.3g} ulp" if math.isfinite(c["worst_ulps"]) else " inf ulp"
    return text


def format_table(results) -> str:
    """The summary table: one row per operation, one column per backend pair."""
    table = summarize(results)
    # pairs in the order they were run (backend order), the golden column last
    pairs = sorted(dict.fromkeys(r.pair for r in results), key=lambda p: "golden" in p)
    rows = [["operation"] + pairs]
    for op in table:
        rows.append([op] + [_cell(table[op][p]) if p in table[op] else "—" for p in pairs])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_reports(results, report_dir, meta: dict) -> tuple[pathlib.Path, pathlib.Path]:
    """Write conformance-report.json and conformance-report.md to ``report_dir``."""
    report_dir = pathlib.Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    failed = [r for r in results if r.status == "failed"]
    js = report_dir / "conformance-report.json"
    summary = {op: {pair: {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                           for k, v in cell.items()} for pair, cell in row.items()}
               for op, row in summarize(results).items()}
    js.write_text(json.dumps({"meta": meta, "summary": summary,
                              "results": [r.to_json() for r in results]}, indent=1, allow_nan=False))
    md = report_dir / "conformance-report.md"
    lines = ["# fp8core conformance report", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Cells: passed/run per backend pair, worst difference in ulps (0 = bit-identical).",
              "", "```", format_table(results), "```", ""]
    if failed:
        lines += ["## Failures", ""] + [f"- `{r.case_id}` ({r.pair}): {r.message}" for r in failed]
    else:
        lines += ["All cases passed."]
    md.write_text("\n".join(lines) + "\n")
    return js, md


def environment() -> dict:
    import platform
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for mod in ("numpy", "ml_dtypes", "torch", "jax", "flax"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            meta[mod] = "not installed"
    return meta
