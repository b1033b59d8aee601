"""fp8core_torch benchmark (not a test): FP8-simulated layers vs nn.Linear, and the
quantizers vs x.clone(), as ratios measured in one run.

    python benchmarks/bench_torch.py [--repeats 9] [--no-compile] [--tokens 4096]
                                     [--only layers|quant|memory] [--no-pool] [--no-kernel]

Each figure is the median over ``repeats`` of paired measurements (baseline and
candidate timed back to back, after warm-up), so that load from other processes
on the machine affects both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fp8core_torch as T  # noqa: E402
from fp8core import _kernel  # noqa: E402
from fp8core_torch import _pool  # noqa: E402


class no_pool:
    """Context: kernel outputs are fresh torch.empty allocations (the host buffer pool off)."""

    def __enter__(self):
        self.saved, _pool.MIN_POOLED_BYTES = _pool.MIN_POOLED_BYTES, 1 << 62

    def __exit__(self, *exc):
        _pool.MIN_POOLED_BYTES = self.saved


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(base, cand, repeats: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median base s, median cand s, median of per-pair ratios)."""
    for _ in range(warmup):
        base(), cand()
    b, c, r = [], [], []
    for _ in range(repeats):
        tb, tc = timed(base), timed(cand)
        b.append(tb), c.append(tc), r.append(tc / tb)
    return statistics.median(b), statistics.median(c), statistics.median(r)


def bench_layers(args, dtype, compiled: bool):
    torch.manual_seed(0)
    k, n = 1024, 4096
    ref = nn.Linear(k, n).to(dtype)
    x = torch.randn(args.tokens, k, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, n, dtype=dtype)
    rows = []
    base_layer = torch.compile(ref) if compiled else ref
    base = train_step_wrapped(base_layer, ref, x, g)
    layers = [(cls.__name__, cls.from_linear(ref)) for cls in (T.LinearFP8Mixed, T.LinearFP8Global)]
    ao = torchao_layer(ref)
    if ao is not None:
        layers.append(("torchao Float8Linear(emulate)", ao))
    for name, layer in layers:
        cand = train_step_wrapped(torch.compile(layer) if compiled else layer, layer, x, g)
        tb, tc, ratio = paired(base, cand, args.repeats)
        rows.append((name, str(dtype).removeprefix("torch."),
                     "compile" if compiled else "eager", tb * 1e3, tc * 1e3, ratio))
    return rows


def torchao_layer(ref):
    """torchao's emulated float8 training layer with ref's weights, or None when torchao
    is not importable (``pip install --no-deps torchao``)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    wrapper = nn.Sequential(copy.deepcopy(ref))
    convert_to_float8_training(wrapper, config=Float8LinearConfig(emulate=True))
    return wrapper[0]


def train_step_wrapped(fn, layer, x, g):
    def step():
        layer.weight.grad = None
        layer.bias.grad = None
        x.grad = None
        fn(x).backward(g)
    return step


def bench_quant(args):
    rows = []
    n = 16 * 1024 * 1024
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n).to(dtype)
        def fresh(fn):
            def run():
                with no_pool():
                    return fn()
            return run

        cases = [("fake_quantize e4m3 bs=1024", lambda: T.fake_quantize(x, "e4m3", 1024)),
                 ("fake_quantize e4m3 bs=1024 (fresh output)",
                  fresh(lambda: T.fake_quantize(x, "e4m3", 1024))),
                 ("fake_quantize e5m2 global", lambda: T.fake_quantize(x, "e5m2")),
                 ("quantize_blockwise e4m3 bs=1024 (codes)",
                  lambda: T.quantize_blockwise(x, "e4m3", 1024))]
        if not args.no_compile:
            fq_c = torch.compile(lambda t: T.fake_quantize(t, "e4m3", 1024))
            cases.append(("fake_quantize e4m3 bs=1024, compiled", lambda: fq_c(x)))
        for label, fn in cases:
            tb, tc, ratio = paired(lambda: x.clone(), fn, args.repeats)
            gbs = x.numel() * x.element_size() / tc / 1e9
            rows.append((label, str(dtype).removeprefix("torch."), tb * 1e3, tc * 1e3, ratio, gbs))
    return rows


def saved_bytes(fn, params) -> int:
    """Bytes of saved tensors that are not views of a parameter (a saved parameter
    costs no memory: the model holds it anyway)."""
    sizes = []
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def bench_memory(args):
    k, n = 1024, 4096
    ref = nn.Linear(k, n)
    x = torch.randn(args.tokens, k, requires_grad=True)
    params = list(ref.parameters())
    out = [("nn.Linear", saved_bytes(lambda: ref(x), params))]
    for cls in (T.LinearFP8Mixed, T.LinearFP8Global):
        layer = cls.from_linear(ref)
        out.append((cls.__name__, saved_bytes(lambda: layer(x), params)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--only", choices=["layers", "quant", "memory"], default=None)
    p.add_argument("--no-pool", action="store_true",
                   help="fresh allocations for kernel outputs (fp8core_torch._pool off)")
    p.add_argument("--no-kernel", action="store_true",
                   help="the torch-ops path (as on CUDA / without the C kernel)")
    args = p.parse_args()
    if args.no_pool:
        no_pool().__enter__()
    if args.no_kernel:
        _kernel.ENABLED = False
    torch.set_float32_matmul_precision("highest")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, repeats {args.repeats}, "
          f"C kernel {'on' if _kernel.available() else 'off'}, "
          f"buffer pool {'off' if args.no_pool else 'on'}")
    if args.only in (None, "layers"):
        print(f"\nfwd+bwd, {args.tokens} tokens x 1024 -> 4096 (ratio = FP8 / nn.Linear, same mode)")
        print(f"{'layer':29} {'dtype':9} {'mode':8} {'nn.Linear ms':>13} {'FP8 ms':>9} {'ratio':>6}")
        for compiled in ([False] if args.no_compile else [False, True]):
            for dtype in (torch.float32, torch.bfloat16):
                for r in bench_layers(args, dtype, compiled):
                    print(f"{r[0]:29} {r[1]:9} {r[2]:8} {r[3]:13.1f} {r[4]:9.1f} {r[5]:6.2f}")
    if args.only in (None, "quant"):
        print("\n16M elements (ratio = op / x.clone(); GB/s = input bytes / op time)")
        print(f"{'op':44} {'dtype':9} {'clone ms':>9} {'op ms':>8} {'ratio':>6} {'GB/s':>6}")
        for r in bench_quant(args):
            print(f"{r[0]:44} {r[1]:9} {r[2]:9.1f} {r[3]:8.1f} {r[4]:6.2f} {r[5]:6.2f}")
    if args.only in (None, "memory"):
        print(f"\nsaved for backward (bytes not owned by parameters), fp32, "
              f"{args.tokens} x 1024 -> 4096")
        for name, b in bench_memory(args):
            print(f"{name:16} {b / 2**20:8.2f} MiB")
    if torchao_layer(nn.Linear(2, 2)) is None:
        print("\ntorchao not importable: Float8Linear comparison skipped "
              "(pip install --no-deps torchao to include it)")


if __name__ == "__main__":
    main()
