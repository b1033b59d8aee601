"""CSV files, the torch-vs-JAX agreement check and the plot of a set of runs."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fp8core import stats as _stats
from fp8core_experiments.runs import LOG_COLUMNS, RunResult

__all__ = ["write_log_csv", "write_stats_csv", "agreement", "plot_runs", "STATS_COLUMNS"]

STATS_COLUMNS: tuple[str, ...] = ("framework", "mode", "format", "layer", "operand", "codebook",
                                  "blocksize", "n_records", "sqnr_db", "underflow_pct",
                                  "saturated_pct", "absmax_min", "absmax_max")


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # shortest round-tripping form
    return v


def write_log_csv(path: str, results: Sequence[RunResult]) -> None:
    """One row per run and step, columns :data:`LOG_COLUMNS`; empty cells where not evaluated."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOG_COLUMNS)
        for res in results:
            for row in res.rows:
                w.writerow([_cell(row[c]) for c in LOG_COLUMNS])


def write_stats_csv(path: str, results: Sequence[RunResult]) -> None:
    """:func:`fp8core.stats.summary_rows` of every FP8 run, prefixed by the run's identity."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STATS_COLUMNS)
        for res in results:
            for row in _stats.summary_rows(res.records):
                full = {"framework": res.framework, "mode": res.spec.mode,
                        "format": res.spec.format_label, **row}
                w.writerow([_cell(full[c]) for c in STATS_COLUMNS])


def agreement(results: Sequence[RunResult], noise: float = 1e-5) -> list[dict[str, Any]]:
    """For each configuration run in both frameworks: the largest per-step |loss difference|
    (``max_abs_diff``) and its step (``at_step``), the difference at step 1
    (``step1_diff``), how many leading steps agree within ``noise`` (``steps_within_noise``:
    float32 accumulation-order noise, before any FP8 rounding decision flips), and the
    final test accuracies."""
    by_key: dict[tuple[str, str], dict[str, RunResult]] = {}
    for res in results:
        by_key.setdefault((res.spec.mode, res.spec.format_label), {})[res.framework] = res
    out = []
    for (mode, fmt), runs in by_key.items():
        if "torch" not in runs or "jax" not in runs:
            continue
        lt, lj = np.asarray(runs["torch"].losses), np.asarray(runs["jax"].losses)
        diff = np.abs(lt - lj)
        i = int(np.argmax(diff)) if diff.size else 0
        above = np.flatnonzero(diff > noise)
        out.append({"mode": mode, "format": fmt, "max_abs_diff": float(diff.max()) if diff.size
                    else 0.0, "at_step": i + 1,
                    "step1_diff": float(diff[0]) if diff.size else 0.0,
                    "steps_within_noise": int(above[0]) if above.size else int(diff.size),
                    "torch_test_acc": runs["torch"].final["test_acc"],
                    "jax_test_acc": runs["jax"].final["test_acc"]})
    return out


_COLORS = {"fp32": "tab:blue", "mixed": "tab:orange", "global": "tab:green"}
_STYLES = {"torch": dict(ls="-", lw=2.2, alpha=0.55), "jax": dict(ls="--", lw=1.0, alpha=1.0)}


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    if y.size < window or window <= 1:
        return y
    return np.convolve(y, np.ones(window) / window, mode="valid")


def _by_config(results: Sequence[RunResult]) -> dict[tuple[str, str], dict[str, RunResult]]:
    out: dict[tuple[str, str], dict[str, RunResult]] = {}
    for res in results:
        out.setdefault((res.spec.mode, res.spec.format_label), {})[res.framework] = res
    return out


def _label(res: RunResult) -> str:
    fmt = "" if res.spec.mode == "fp32" else f" {res.spec.format_label}"
    return f"{res.framework} {res.spec.mode}{fmt}"


def plot_runs(path: str, results: Sequence[RunResult], title: str = "", smooth: int = 15) -> None:
    """Four panels (2×2): training loss of every run (torch thick, JAX thin dashed on top);
    FP8 − fp32 loss per framework (moving average over ``smooth`` steps); test accuracy;
    |torch − JAX| loss difference per step for each configuration (log scale; exact
    agreement is drawn at the panel's floor)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op if already Agg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), dpi=100)
    (ax_loss, ax_gap), (ax_acc, ax_diff) = axes
    for res in results:
        steps = [r["step"] for r in res.rows]
        kw = dict(color=_COLORS.get(res.spec.mode), **_STYLES.get(res.framework, {}))
        ax_loss.plot(steps, res.losses, label=_label(res), **kw)
        ev = [(r["step"], r["test_acc"]) for r in res.rows if r["test_acc"] is not None]
        if ev:
            ax_acc.plot(*zip(*ev), marker=".", label=_label(res), **kw)
    ax_loss.set(xlabel="step", ylabel="training loss (batch cross-entropy)", yscale="log",
                title="training loss, all runs")
    ax_loss.legend(fontsize=7)
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="test accuracy (after the step)")
    ax_acc.legend(fontsize=7, loc="lower right")

    base = {res.framework: res for res in results if res.spec.mode == "fp32"}
    for res in results:
        if res.spec.mode != "fp32" and res.framework in base:
            gap = np.asarray(res.losses) - np.asarray(base[res.framework].losses)
            g = _moving_average(gap, smooth)
            steps = np.arange(1, gap.size + 1)[len(gap) - len(g):]
            ax_gap.plot(steps, g, label=_label(res), color=_COLORS.get(res.spec.mode),
                        **{k: v for k, v in _STYLES.get(res.framework, {}).items()})
    ax_gap.axhline(0, color="0.5", lw=0.8)
    ax_gap.set(xlabel="step", ylabel="loss − fp32 loss (same framework)",
               title=f"FP8 effect on the loss (moving average, {smooth} steps)")
    if ax_gap.lines[1:]:
        ax_gap.legend(fontsize=7)

    floor = 1e-9
    for (mode, fmt), runs in _by_config(results).items():
        if "torch" in runs and "jax" in runs:
            d = np.abs(np.asarray(runs["torch"].losses) - np.asarray(runs["jax"].losses))
            steps = [r["step"] for r in runs["torch"].rows]
            lab = mode if mode == "fp32" else f"{mode} {fmt}"
            ax_diff.plot(steps, np.maximum(d, floor), color=_COLORS.get(mode), lw=1,
                         label=f"{lab} (max {d.max():.1e})")
    ax_diff.set(xlabel="step", ylabel="|loss_torch − loss_jax|", yscale="log",
                title=f"torch vs JAX, same configuration (exact drawn at {floor:g})")
    if ax_diff.lines:
        ax_diff.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"
