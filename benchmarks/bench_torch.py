"""fp8core_torch benchmark (not a test): every recipe preset against nn.Linear, and the
quantizers against x.clone(), as ratios measured in one run.

    python benchmarks/bench_torch.py [--repeats 7] [--no-compile] [--no-torchao] [--tokens 4096]
                                     [--only layers|small|model|memory|operands|quant] [--recipes A,B]
                                     [--no-pool] [--no-kernel]

Sections (each prints its targets and whether they are met):

* ``layers``: ``LinearFP8(recipe=...)`` for every preset in ``fp8core.recipe.PRESETS``,
  forward + backward at ``tokens`` × 1024 → 4096 with bias, vs ``nn.Linear`` in the same
  mode; float32 and bfloat16, eager and ``torch.compile`` (``--no-compile`` skips the
  compiled rows). torchao's ``Float8Linear(emulate=True)`` for the three recipes it shares
  with us, when importable (``pip install --no-deps torchao``), and its emulated MXFP8
  training matmul beside MXFP8 / MXFP8_FLOOR. Targets: ≤ 1.10× (float32), ≤ 1.25×
  (bfloat16); the MX presets ≤ 1.15× / ≤ 1.30×, NVFP4 ≤ 1.30× / ≤ 1.50× (issue 13).
* ``small``: the same step at 32 × 64 → 128 (target ≤ 1.5×) and 512 × 256 → 256 (≤ 1.15×),
  float32 eager; each timing is a loop of calls long enough to time.
* ``model``: one training step (forward, cross-entropy, backward, AdamW) of a small
  pre-norm causal transformer built from nn.Linear / nn.Embedding / nn.LayerNorm (2 blocks,
  d_model 256, 4 heads, sequence 128, batch 8, vocabulary 512), converted with
  ``convert_to_fp8(model, recipe=..., module_filter_fn=...)`` (all linears but the head)
  vs its unconverted float32 twin. Target ≤ 1.15×.
* ``memory``: bytes saved for backward by each preset at the ``layers`` shape (float32),
  and what each preset quantizes per step (elements, column-wise groups, re-quantized slots).
* ``operands``: each quantization of a preset's step timed alone (``quantize_operand``)
  and all of them against the step's three GEMMs: where the overhead comes from.
* ``quant``: the quantizers on 16M elements vs ``x.clone()``.

Each figure is the median over ``repeats`` of paired measurements (baseline and
candidate timed back to back, after warm-up), so that load from other processes
affects both sides of a ratio alike; the load average is printed with each section.
bfloat16 rows are skipped, with the reason printed, on CPUs without native bfloat16
GEMMs (neither avx512_bf16 nor amx_bf16): there the baseline itself is emulated.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fp8core_torch as T  # noqa: E402
from _common import (BF16_REASON, MODEL, SMALL_SHAPES, TARGETS, TORCHAO_MX_RECIPES,  # noqa: E402
                     TORCHAO_RECIPES, layer_target,
                     cpu_flags, failed, flags_line, header, native_bf16, paired, print_rows,
                     print_work, stamp)
from fp8core import _kernel  # noqa: E402
from fp8core.recipe import PRESETS  # noqa: E402
from fp8core_torch import _pool  # noqa: E402


# ----------------------------------------------------------------------------- timing

class no_pool:
    """Context: kernel outputs are fresh torch.empty allocations (the host buffer pool off)."""

    def __enter__(self):
        self.saved, _pool.MIN_POOLED_BYTES = _pool.MIN_POOLED_BYTES, 1 << 62

    def __exit__(self, *exc):
        _pool.MIN_POOLED_BYTES = self.saved


def allow_recompiles() -> None:
    """Every compiled layer of a run is a new guard set on the same forward code; without
    this dynamo falls back to eager after its recompile limit (8) — silently."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


# ----------------------------------------------------------------------------- layers

def torchao_convert(module: nn.Module, recipe_name: str, module_filter_fn=None) -> nn.Module | None:
    """module converted in place to torchao's emulated float8 training, or None when
    torchao is not importable."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe_name), emulate=True)
    convert_to_float8_training(module, config=config, module_filter_fn=module_filter_fn)
    return module


def torchao_layer(ref: nn.Linear, recipe_name: str) -> nn.Module | None:
    wrapper = torchao_convert(nn.Sequential(copy.deepcopy(ref)), recipe_name)
    return None if wrapper is None else wrapper[0]


class TorchaoMX(nn.Module):
    """torchao 0.18's MXFP8 training matmul (moe_training.mxfp8_linear, EMULATED kernels:
    torch ops, so it runs on CPU) around ``linear``'s parameters — the peer of our MX
    presets (forward, dgrad and wgrad all MXFP8 along each GEMM's contraction axis)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.moe_training.mxfp8_linear import _to_mxfp8_then_scaled_mm
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
        self.weight, self.bias = linear.weight, linear.bias
        self._mm = _to_mxfp8_then_scaled_mm
        self._args = (KernelPreference.EMULATED, ScaleCalculationMode(mode))

    def forward(self, x):
        y = self._mm(x, self.weight, *self._args)
        return y if self.bias is None else y + self.bias


def torchao_mx_layer(ref: nn.Linear, mode: str) -> nn.Module | None:
    try:
        return TorchaoMX(copy.deepcopy(ref), mode)
    except ImportError:
        return None


def candidates(args, ref: nn.Linear):
    """(label, layer, preset name) for every selected preset, then torchao's."""
    out = [(name, T.LinearFP8.from_linear(ref, recipe=name), name) for name in args.recipes]
    if not args.no_torchao:
        for name in args.recipes:
            if name in TORCHAO_RECIPES:
                ao = torchao_layer(ref, TORCHAO_RECIPES[name])
                if ao is not None:
                    out.append((f"torchao {TORCHAO_RECIPES[name]} (emulate)", ao, None))
            if name in TORCHAO_MX_RECIPES and ref.weight.dtype == torch.float32:
                ao = torchao_mx_layer(ref, TORCHAO_MX_RECIPES[name])
                if ao is not None:
                    out.append((f"torchao mxfp8 {TORCHAO_MX_RECIPES[name]} (emulated)", ao, None))
    return out


def layer_step(fn, layer, x, g):
    def step():
        layer.weight.grad = None
        if layer.bias is not None:
            layer.bias.grad = None
        x.grad = None
        fn(x).backward(g)
    return step


def bench_layer(args, tokens, k, n, dtype, compiled: bool, target: float | None,
                min_sample: float = 0.0):
    """Rows (label, base s, cand s, ratio, target) for every candidate at one shape."""
    torch.manual_seed(0)
    ref = nn.Linear(k, n).to(dtype)
    x = torch.randn(tokens, k, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, n, dtype=dtype)
    wrap = torch.compile if compiled else (lambda m: m)
    base = layer_step(wrap(ref), ref, x, g)
    rows = []
    for label, layer, preset in candidates(args, ref):
        try:
            cand = layer_step(wrap(layer), layer, x, g)
            tb, tc, *ratio = paired(base, cand, args.repeats, min_sample=min_sample)
        except Exception as e:  # noqa: BLE001 - a failing candidate is reported, not fatal
            rows.append(failed(label, e))
            continue
        rows.append((label, tb, tc, ratio, (target(preset) if callable(target) else target)
                     if preset else None))
    return rows


def section_layers(args, bf16_ok: bool):
    print(f"\nfwd+bwd, {args.tokens} tokens x 1024 -> 4096, bias "
          f"(ratio = FP8 / nn.Linear, same mode, same run)")
    for compiled in ([False] if args.no_compile else [False, True]):
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            mode = "compile" if compiled else "eager"
            if dtype == torch.bfloat16 and not bf16_ok:
                print(f"\n[{name}, {mode}] skipped: {BF16_REASON}")
                continue
            print(f"\n[{name}, {mode}] {stamp()}")
            print_rows(bench_layer(args, args.tokens, 1024, 4096, dtype, compiled,
                                   lambda preset, name=name: layer_target(preset, name)))
    print(f"  (end {stamp()})")


def section_small(args):
    for tokens, k, n in SMALL_SHAPES:
        key = f"small {tokens}x{k}->{n}"
        print(f"\nfwd+bwd, {tokens} tokens x {k} -> {n}, bias, float32 eager "
              f"(µs per step; each sample a loop of >= 20 ms) {stamp()}")
        print_rows(bench_layer(args, tokens, k, n, torch.float32, False, TARGETS[key],
                               min_sample=0.02), unit="µs", scale=1e6)


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    """Pre-norm causal self-attention + GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Token + position embeddings, pre-norm blocks, final LayerNorm, linear head."""

    def __init__(self, vocab, d_model, heads, layers, seq, **_):
        super().__init__()
        d = d_model
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def not_head(module: nn.Module, fqn: str) -> bool:
    return fqn != "head"


def model_step(model, idx, tgt):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.head.out_features

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(idx).view(-1, vocab), tgt.view(-1))
        loss.backward()
        opt.step()
    return step


def section_model(args):
    batch, seq, vocab = MODEL["batch"], MODEL["seq"], MODEL["vocab"]
    print(f"\ntraining step (fwd, cross-entropy, bwd, AdamW) of a pre-norm causal transformer "
          f"{MODEL}, float32 eager; every nn.Linear but the head converted, vs the unconverted "
          f"twin {stamp()}")
    torch.manual_seed(0)
    ref = TinyLM(**MODEL)
    idx = torch.randint(0, vocab, (batch, seq))
    tgt = torch.randint(0, vocab, (batch, seq))
    base = model_step(ref, idx, tgt)
    rows = []
    cands = [(name, T.convert_to_fp8(copy.deepcopy(ref), recipe=name, module_filter_fn=not_head), name)
             for name in args.recipes]
    if not args.no_torchao:
        for name in args.recipes:
            if name in TORCHAO_RECIPES:
                m = torchao_convert(copy.deepcopy(ref), TORCHAO_RECIPES[name], not_head)
                if m is not None:
                    cands.append((f"torchao {TORCHAO_RECIPES[name]} (emulate)", m, None))
    for label, model, preset in cands:
        try:
            tb, tc, *ratio = paired(base, model_step(model, idx, tgt), args.repeats, warmup=3)
        except Exception as e:  # noqa: BLE001
            rows.append(failed(label, e))
            continue
        rows.append((label, tb, tc, ratio, TARGETS["model"] if preset else None))
    print_rows(rows)


# ----------------------------------------------------------------------------- memory

def saved_bytes(fn, params) -> tuple[int, int]:
    """(all saved bytes, bytes of saved tensors that are not a parameter's storage): a
    saved parameter costs no memory, the model holds it anyway."""
    sizes, own = [], []
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        if t.untyped_storage().data_ptr() not in param_ptrs:
            own.append(sizes[-1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), sum(own)


def section_memory(args):
    k, n = 1024, 4096
    ref = nn.Linear(k, n)
    x = torch.randn(args.tokens, k, requires_grad=True)
    params = list(ref.parameters())
    base_all, base_own = saved_bytes(lambda: ref(x), params)
    print(f"\nsaved for backward, float32, {args.tokens} x {k} -> {n} (MiB; 'extra' = bytes not "
          f"owned by a parameter; ratio = extra / nn.Linear's)")
    print(f"  {'layer':34} {'all':>8} {'extra':>8} {'ratio':>6}")
    print(f"  {'nn.Linear':34} {base_all / 2**20:8.2f} {base_own / 2**20:8.2f} {1:6.2f}")
    for name in args.recipes:
        layer = T.LinearFP8.from_linear(ref, recipe=name)
        a, o = saved_bytes(lambda: layer(x), params)
        print(f"  {name:34} {a / 2**20:8.2f} {o / 2**20:8.2f} {o / base_own:6.2f}")
    print_work(args.recipes, args.tokens, k, n, "torch")


# ----------------------------------------------------------------------------- operands

def section_operands(args, bf16_ok: bool):
    """Where a preset's overhead comes from: each quantization it runs per training step
    (``quantize_operand``, codes only, in the slot's orientation: axis 0 = column-wise
    groups over a row-major tensor) against the step's three GEMMs in the same dtype.
    On one thread and in process CPU time: a measure of work that load from other
    processes barely moves (with two threads on a loaded machine every parallel region
    can wait a scheduler time slice for its second thread)."""
    from _common import _AXES, cpu_median
    from fp8core.recipe import SLOTS
    m, k, n = args.tokens, 1024, 4096
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\nquantizations of one training step vs its three GEMMs, {m} x {k} -> {n}, eager, "
          f"1 thread (CPU ms, medians of {args.repeats}; ratio = all quantizations / GEMMs)")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        if dtype == torch.bfloat16 and not bf16_ok:
            print(f"\n[{name}] skipped: {BF16_REASON}")
            continue
        torch.manual_seed(0)
        t = {"X": torch.randn(m, k, dtype=dtype), "W": torch.randn(n, k, dtype=dtype),
             "dY": torch.randn(m, n, dtype=dtype)}

        def gemms():
            t["X"] @ t["W"].t(), t["dY"] @ t["W"], t["dY"].t() @ t["X"]
        tg = cpu_median(gemms, args.repeats)
        print(f"\n[{name}] {stamp()}; the three GEMMs: {tg * 1e3:.1f} ms")
        for preset in args.recipes:
            recipe = PRESETS[preset]
            per = []
            for slot in SLOTS:
                rule = recipe.rule(slot)
                if rule is None or (slot not in ("input", "weight", "grad_output")
                                    and recipe.source(slot) != "quantize"):
                    continue
                tensor, axis = _AXES["torch"][slot]
                x, a = t[tensor], (0 if axis == 0 else -1)
                tq = cpu_median(lambda: T.quantize_operand(x, rule, axis=a, seed=0), args.repeats)
                cols = axis == 0 and rule.granularity.kind in ("axiswise", "block")
                per.append((f"{tensor}{' cols' if cols else ''}", tq))
            total = sum(tq for _, tq in per)
            print(f"  {preset:20} quantize {total * 1e3:6.1f}  / GEMMs {total / tg:5.3f}   "
                  + ", ".join(f"{label} {tq * 1e3:.1f}" for label, tq in per), flush=True)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- quantizers

def section_quant(args):
    n = 16 * 1024 * 1024
    print(f"\n16M elements (ratio = op / x.clone(); GB/s = input bytes / op time) {stamp()}")
    print(f"  {'op':44} {'dtype':9} {'clone ms':>9} {'op ms':>8} {'ratio':>6} {'best':>5} {'cpu':>5} {'GB/s':>6}")
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
            tb, tc, *ratio = paired(lambda: x.clone(), fn, args.repeats)
            gbs = x.numel() * x.element_size() / tc / 1e9
            print(f"  {label:44} {str(dtype).removeprefix('torch.'):9} {tb * 1e3:9.1f} "
                  f"{tc * 1e3:8.1f} {ratio[0]:6.2f} {ratio[1]:5.2f} {ratio[2]:5.2f} {gbs:6.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao's Float8Linear rows")
    p.add_argument("--only", choices=["layers", "small", "model", "memory", "operands", "quant"],
                   action="append",
                   help="run only these sections (repeatable; default all)")
    p.add_argument("--recipes", default=",".join(PRESETS),
                   help=f"comma-separated presets (default all: {','.join(PRESETS)})")
    p.add_argument("--no-pool", action="store_true",
                   help="fresh allocations for kernel outputs (fp8core_torch._pool off)")
    p.add_argument("--no-kernel", action="store_true",
                   help="the torch-ops path (as on CUDA / without the C kernel)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; presets: {', '.join(PRESETS)}")
    if args.no_pool:
        no_pool().__enter__()
    if args.no_kernel:
        _kernel.ENABLED = False
    warnings.filterwarnings("ignore", message=".*span rows.*")  # BNB_MIXED's flat blocks (expected)
    # dynamo tracing through fp8core's lru_cache'd planners (pure functions of ints): noise here
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    torch.set_float32_matmul_precision("highest")
    allow_recompiles()
    flags = cpu_flags()
    bf16_ok = native_bf16(flags)
    sections = args.only or ["layers", "small", "model", "memory", "operands", "quant"]
    print(header())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, repeats {args.repeats}, "
          f"C kernel {'on' if _kernel.available() else 'off'}, "
          f"buffer pool {'off' if args.no_pool else 'on'}")
    print(flags_line(flags))
    if not args.no_torchao and torchao_layer(nn.Linear(2, 2), "tensorwise") is None:
        args.no_torchao = True
        print("torchao not importable: Float8Linear comparison skipped "
              "(pip install --no-deps torchao to include it)")
    if "layers" in sections:
        section_layers(args, bf16_ok)
    if "small" in sections:
        section_small(args)
    if "model" in sections:
        section_model(args)
    if "memory" in sections:
        section_memory(args)
    if "operands" in sections:
        section_operands(args, bf16_ok)
    if "quant" in sections:
        section_quant(args)
    print(f"\ndone {stamp()}")


if __name__ == "__main__":
    main()
