"""fp8core's fused C kernel on 2-D tiles (not a test): each tile shape class against the
existing blockwise kernel (flat blocks of 1024) and against a plain copy, as ratios
measured in one run.

    python benchmarks/bench_kernel.py [--repeats 15] [--threads N] [--shapes 4096x1024,512x256]
                                      [--outputs both|codes|values] [--scale fp32|pow2|pow2_torchao]
                                      [--dequantize] [--clock wall|thread]

Every kernel call writes the same outputs (uint8 codes and/or values in the input's
dtype, plus its absmax) into preallocated buffers, so the figures are the kernel's
own time. ``copy`` copies the input into a preallocated array (``np.copyto`` for
one thread; torch's ``dst.copy_(src)`` on the same number of threads as the kernel
otherwise, when torch is importable) — one read and one write of the input, the
floor for any elementwise pass. Each figure is the median over
``repeats`` of paired measurements (baseline and candidate back to back after a
warm-up), so load from other processes affects both sides of a ratio alike.
``--clock thread`` (with ``--threads 1``) times the calling thread's CPU time
instead of wall time: steadier on a loaded machine (time spent descheduled is not
counted; cache and memory contention still is).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fp8core  # noqa: E402
from fp8core import _kernel as K  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
#: (name, tile_rows, tile_cols); None = the whole axis
TILE_CLASSES = [
    ("rows (1,C)", 1, None),
    ("block (1,128)", 1, 128),
    ("tile (128,128)", 128, 128),
    ("cols (R,1)", None, 1),
    ("colblock (128,1)", 128, 1),
    ("global (R,C)", None, None),
]


CLOCK = time.perf_counter


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def paired(base, cand, repeats: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median base s, median cand s, median of per-pair ratios cand / base)."""
    for _ in range(warmup):
        base(), cand()
    b, c, r = [], [], []
    for _ in range(repeats):
        tb, tc = timed(base), timed(cand)
        b.append(tb), c.append(tc), r.append(tc / tb)
    return statistics.median(b), statistics.median(c), statistics.median(r)


def _nthreads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _copy_fn(x: np.ndarray, threads: int):
    """A plain copy on as many threads as the kernel gets: ``np.copyto`` for one
    thread, else torch's ``copy_`` on ``threads`` threads when torch is importable."""
    dst = np.empty_like(x)
    if threads > 1:
        try:
            import torch
        except ImportError:
            pass
        else:
            torch.set_num_threads(threads)
            src = torch.from_numpy(x.view(np.uint16) if x.dtype == BF16 else x)
            out = torch.empty_like(src)
            return f"torch copy_/{threads}", lambda: out.copy_(src)
    return "np.copyto", lambda: np.copyto(dst, x)


def bench_quantize(args, cb, shape, dtype, copy_rows: list) -> list[tuple]:
    rows, cols = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    n = x.size
    want_codes, want_vals = args.outputs in ("both", "codes"), args.outputs in ("both", "values")
    codes = np.empty(n, np.uint8)
    vals = np.empty(n, x.dtype)
    cptr = codes.ctypes.data if want_codes else None
    vptr = vals.ctypes.data if want_vals else None
    nt = args.threads
    am_flat = np.empty(-(-n // 1024), np.float32)

    def flat1024():
        K.quantize(x.ctypes.data, x.dtype.name, n, 1024, cb, codes_ptr=cptr, vals_ptr=vptr,
                   out_dtype=x.dtype.name, absmax_ptr=am_flat.ctypes.data, nthreads=nt)

    copy_name, copy = _copy_fn(x, nt)
    b, c, r = paired(copy, flat1024, args.repeats)
    copy_rows.append((f"{rows}x{cols}", x.dtype.name, copy_name, b * 1e3, c * 1e3, r))
    out = []
    for name, tr, tc in TILE_CLASSES:
        tr, tc = tr or rows, tc or cols
        grid = (-(-rows // tr), -(-cols // tc))
        am = np.empty(grid, np.float32)

        def tiles(tr=tr, tc=tc, am=am):
            K.quantize_tiles(x.ctypes.data, x.dtype.name, rows, cols, tr, tc, cb, scale=args.scale,
                             codes_ptr=cptr, vals_ptr=vptr, out_dtype=x.dtype.name,
                             absmax_ptr=am.ctypes.data, nthreads=nt)

        _, tb, r_flat = paired(flat1024, tiles, args.repeats)
        _, _, r_copy = paired(copy, tiles, args.repeats)
        out.append((f"{rows}x{cols}", x.dtype.name, name, tb * 1e3, r_flat, r_copy))
    return out


def bench_dequantize(args, cb, shape, dtype) -> list[tuple]:
    rows, cols = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    n = x.size
    vals = np.empty(n, dtype)
    nt = args.threads
    out = []
    codes_flat, am_flat = fp8core.reference.quantize_blockwise(x.reshape(-1), cb, 1024)

    def flat1024():
        K.dequantize(codes_flat.ctypes.data, n, 1024, am_flat.ctypes.data, cb,
                     vals_ptr=vals.ctypes.data, out_dtype=vals.dtype.name, nthreads=nt)

    for name, tr, tc in TILE_CLASSES:
        tr, tc = tr or rows, tc or cols
        codes, am = fp8core.reference.quantize_tiles(x, cb, tr, tc)
        codes, am = np.ascontiguousarray(codes), np.ascontiguousarray(am)

        def tiles(tr=tr, tc=tc, codes=codes, am=am):
            K.dequantize_tiles(codes.ctypes.data, rows, cols, tr, tc, am.ctypes.data, cb,
                               vals_ptr=vals.ctypes.data, out_dtype=vals.dtype.name, nthreads=nt)

        _, tb, r_flat = paired(flat1024, tiles, args.repeats)
        out.append((f"{rows}x{cols}", vals.dtype.name, name, tb * 1e3, r_flat, float("nan")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=_nthreads())
    p.add_argument("--shapes", default="4096x1024,512x256")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--outputs", choices=("both", "codes", "values"), default="both")
    p.add_argument("--scale", choices=tuple(K.SCALE_RULE_CODES), default="fp32")
    p.add_argument("--dequantize", action="store_true", help="also time dequantize_tiles")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: the calling thread's CPU time (only with --threads 1)")
    args = p.parse_args()
    if args.clock == "thread":
        if args.threads != 1:
            sys.exit("--clock thread measures the calling thread only: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    if not K.available():
        sys.exit("fp8core's C kernel is not built (pip install -e .) or FP8CORE_KERNEL=0")
    cb = fp8core.resolve_codebook("e4m3")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [BF16 if d == "bfloat16" else np.dtype(d) for d in args.dtypes.split(",")]
    print(f"fp8core kernel, e4m3, scale={args.scale}, outputs={args.outputs}, "
          f"{args.threads} thread(s), {args.clock} clock, median of {args.repeats} paired runs")
    rows, copies = [], []
    for shape in shapes:
        for dt in dtypes:
            rows += bench_quantize(args, cb, shape, dt, copies)
    print("\nbaselines: blockwise kernel (flat blocks of 1024) vs a plain copy")
    print(f"{'shape':>10} {'dtype':>9} {'copy':>12} {'copy ms':>8} {'flat1024 ms':>11} {'flat/copy':>9}")
    for s, d, name, b, c, r in copies:
        print(f"{s:>10} {d:>9} {name:>12} {b:8.3f} {c:11.3f} {r:9.2f}")
    print("\nquantize_tiles (codes + values as --outputs), ratios of paired medians")
    print(f"{'shape':>10} {'dtype':>9} {'tiles':>17} {'ms':>8} {'vs flat1024':>11} {'vs copy':>8}")
    for s, d, name, t, rf, rc in rows:
        print(f"{s:>10} {d:>9} {name:>17} {t:8.3f} {rf:11.2f} {rc:8.2f}")
    if args.dequantize:
        print("\ndequantize_tiles (values in dtype) vs dequantize of flat blocks of 1024")
        print(f"{'shape':>10} {'dtype':>9} {'tiles':>17} {'ms':>8} {'vs flat1024':>11}")
        for shape in shapes:
            for dt in dtypes:
                for s, d, name, t, rf, _ in bench_dequantize(args, cb, shape, dt):
                    print(f"{s:>10} {d:>9} {name:>17} {t:8.3f} {rf:11.2f}")


if __name__ == "__main__":
    main()
