"""What both benchmark scripts share: the targets, the machine report (CPU flags, load
average, the library tree), and paired timing. Not a test; no framework imported here."""

from __future__ import annotations

import datetime
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

#: case -> target ratio (FP8 / its high-precision baseline, same run). Never lowered: a
#: missed target is printed as missed.
TARGETS = {"layer float32": 1.10, "layer bfloat16": 1.25, "small 32x64->128": 1.5,
           "small 512x256->256": 1.15, "model": 1.15}
#: the microscaling / FP4 issue's targets at the layers shape (4096 x 1024 -> 4096), by
#: preset name prefix: MXFP8 (and the other MX presets) and NVFP4 (SR + Hadamard)
FAMILY_TARGETS = {"MX": {"float32": 1.15, "bfloat16": 1.30},
                  "NVFP4": {"float32": 1.30, "bfloat16": 1.50}}


def layer_target(preset: str, dtype_name: str) -> float:
    """The layers-section target of ``preset`` in ``dtype_name`` (never lowered)."""
    for prefix, targets in FAMILY_TARGETS.items():
        if preset.startswith(prefix):
            return targets[dtype_name]
    return TARGETS[f"layer {dtype_name}"]


#: our MX presets that torchao 0.18 emulates (moe_training.mxfp8_linear, EMULATED kernels)
TORCHAO_MX_RECIPES = {"MXFP8": "rceil", "MXFP8_FLOOR": "floor"}
#: (tokens, in_features, out_features) of the small layers
SMALL_SHAPES = ((32, 64, 128), (512, 256, 256))
#: the small transformer of the model step
MODEL = dict(layers=2, d_model=256, heads=4, seq=128, batch=8, vocab=512)
#: our presets that torchao 0.18 also has (Float8LinearConfig.from_recipe_name)
TORCHAO_RECIPES = {"TENSORWISE": "tensorwise", "ROWWISE": "rowwise",
                   "ROWWISE_WITH_GW_HP": "rowwise_with_gw_hp"}
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16")
BF16_REASON = ("the CPU has neither avx512_bf16 nor amx_bf16, so bfloat16 GEMMs are emulated "
               "and the baseline is not one anybody trains with")


def cpu_flags() -> dict[str, bool]:
    """The CPU flags that decide the GEMM paths, as lscpu prints them."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return {f: f in flags for f in CPU_FLAGS}


def native_bf16(flags: dict[str, bool]) -> bool:
    """Native bfloat16 GEMMs: AVX512-BF16 dot products or AMX-BF16 tiles."""
    return flags["avx512_bf16"] or flags["amx_bf16"]


def flags_line(flags: dict[str, bool]) -> str:
    return ("CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items())
            + f" -> native bfloat16 GEMMs {'yes' if native_bf16(flags) else 'no'}")


def stamp() -> str:
    """UTC time and the 1/5/15-minute load averages (the benchmark's own threads included)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC")
    return f"{now}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def header() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} {stamp()}, library {tree()}"


def tree() -> str:
    """The library tree benchmarked: its git commit (+ whether fp8core* has uncommitted
    changes), or its directory (a snapshot named by its commit)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "fp8core",
                                "fp8core_torch", "fp8core_jax"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{root} at {head}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        return str(root)


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"≤ {target:.2f} {'✓' if ratio <= target else '✗'}"


def timed(fn, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (which must block until its result exists)."""
    return _sample(fn, inner)[0]


def _sample(fn, inner: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call over ``inner`` calls."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner, (time.process_time() - c0) / inner


def cpu_median(fn, repeats: int, warmup: int = 2) -> float:
    """Median process CPU seconds of one call (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    return statistics.median(_sample(fn, 1)[1] for _ in range(repeats))


def paired(base, cand, repeats: int, warmup: int = 2, min_sample: float = 0.0
           ) -> tuple[float, float, float, float, float]:
    """(median base s, median cand s, median of the per-pair ratios, ratio of the best
    times, median of the per-pair process-CPU-time ratios): baseline and candidate timed
    back to back ``repeats`` times after ``warmup`` pairs, so that load from other
    processes hits both sides of each ratio alike. The median wall-time ratio is the
    figure; the other two are second opinions on a loaded machine (each side's
    least-disturbed sample; CPU time, which does not count time spent descheduled). With
    ``min_sample`` each sample is a loop of calls lasting at least that long (tiny layers)."""
    for _ in range(warmup):
        base(), cand()
    inner = 1
    if min_sample:
        inner = max(1, math.ceil(min_sample / timed(base, 10)))
    b, c, r, rc = [], [], [], []
    for _ in range(repeats):
        (tb, cb), (tc, cc) = _sample(base, inner), _sample(cand, inner)
        b.append(tb), c.append(tc), r.append(tc / tb), rc.append(cc / cb if cb > 0 else math.nan)
    return (statistics.median(b), statistics.median(c), statistics.median(r), min(c) / min(b),
            statistics.median(rc))


def print_rows(rows, unit: str = "ms", scale: float = 1e3) -> None:
    """rows of (label, base s, cand s, (median ratio, best-times ratio, CPU-time ratio),
    target or None or a failure string); times are medians."""
    print(f"  {'candidate':36} {'base ' + unit:>10} {'FP8 ' + unit:>10} {'ratio':>6} {'best':>5} "
          f"{'cpu':>5}  target")
    for label, tb, tc, ratio, target in rows:
        if ratio is None:
            print(f"  {label:36} {target}", flush=True)
            continue
        print(f"  {label:36} {tb * scale:10.1f} {tc * scale:10.1f} {ratio[0]:6.2f} {ratio[1]:5.2f} "
              f"{ratio[2]:5.2f}  {verdict(ratio[0], target)}", flush=True)


def failed(label: str, e: BaseException):
    return (label, None, None, None, f"failed: {type(e).__name__}: {e}"[:200])


#: slot -> (tensor, contraction axis of the row-major tensor) for each framework's weight
#: layout: X (M, K) and dY (M, N) everywhere; W is (N, K) in torch (nn.Linear.weight), (K, N)
#: in JAX (nnx.Linear.kernel, matmul_fp8's B).
_AXES = {
    "torch": {"input": ("X", 1), "weight": ("W", 1), "grad_output": ("dY", 1),
              "weight_for_grad_input": ("W", 0), "input_for_grad_weight": ("X", 0),
              "grad_output_for_grad_weight": ("dY", 0)},
    "jax": {"input": ("X", 1), "weight": ("W", 0), "grad_output": ("dY", 1),
            "weight_for_grad_input": ("W", 1), "input_for_grad_weight": ("X", 0),
            "grad_output_for_grad_weight": ("dY", 0)},
}


def quantization_work(recipe, m: int, k: int, n: int, layout: str = "torch") -> dict:
    """What one training step of ``recipe`` quantizes at m × k → n (pure arithmetic on the
    recipe's slots): elements quantized, of which in column-wise groups (axiswise or 1×B
    blocks along the tensor's non-contiguous axis: the kernel's band sweeps), the slots
    that re-quantize a tensor, and the elements decoded from saved codes in backward."""
    from fp8core.recipe import SLOTS
    size = {"X": m * k, "W": k * n, "dY": m * n}
    quantized = column = decoded = 0
    requant = []
    for slot in SLOTS:
        rule = recipe.rule(slot)
        if rule is None:
            continue
        if slot in ("input", "weight", "grad_output") or recipe.source(slot) == "quantize":
            t, axis = _AXES[layout][slot]
            quantized += size[t]
            if axis == 0 and rule.granularity.kind in ("axiswise", "block"):
                column += size[t]
            if slot not in ("input", "weight", "grad_output"):
                requant.append(slot)
    saved = recipe.saved(True, True)
    decoded = sum(size[t] for t, form in saved.items() if form == "codes")
    return dict(quantized=quantized, column=column, decoded=decoded, requant=requant, saved=saved)


def print_work(recipes, m: int, k: int, n: int, layout: str) -> None:
    from fp8core.recipe import PRESETS
    print(f"\nquantization work per training step at {m} x {k} -> {n} ({layout} weight layout; "
          f"M elements; X {m * k / 2**20:g}M, W {k * n / 2**20:g}M, dY {m * n / 2**20:g}M)")
    print(f"  {'preset':20} {'quantized':>9} {'column-wise':>11} {'decoded':>8}  re-quantized slots")
    for name in recipes:
        w = quantization_work(PRESETS[name], m, k, n, layout)
        print(f"  {name:20} {w['quantized'] / 2**20:9g} {w['column'] / 2**20:11g} "
              f"{w['decoded'] / 2**20:8g}  {', '.join(w['requant']) or '-'}")
