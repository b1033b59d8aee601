"""One rank of the 2-process gloo runs of tests/test_torch_distributed.py (not a test file).

Run as ``python tests/_dist_worker.py RANK WORLD INIT_METHOD OUT_DIR CASE[,CASE...]``. For each
case (a preset name, ``mixed``, or a preset name + :data:`REDUCED`: with ``amax_reduction``) the rank trains the same converted model three SGD steps on
its half of a fixed global batch under DDP and under FSDP2 ``fully_shard``; rank 0 also trains
one process on the whole batch, and the last rank one process accumulating the gradients of
the ranks' micro-batches (same thread count as the ranks, so the same GEMM kernels). It writes
``OUT_DIR/rank{RANK}.pt``: per case and mode the step-0 gradients and the parameters after
training (both ranks' copies, all-gathered), the step-0 local loss, and whether the converted
model holds any buffer. ``OUT_DIR/imported{RANK}`` is written once the imports succeeded and
``OUT_DIR/started{RANK}`` once the gloo process group is up, so the test can tell "gloo cannot
start here" (skip) from a failure of the project's code (fail).
The test sets ``OMP_NUM_THREADS=1``; ``torch.set_num_threads(1)`` here as well (2 ranks, 2 cores).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fp8core.recipe
from fp8core_torch import LinearFP8, convert_to_fp8, quantize_operand

D, HIDDEN, BATCH, SEQ, STEPS, LR = 64, 128, 4, 64, 3, 0.1


class Block(nn.Module):
    """Pre-norm transformer block of nn.Linear / nn.LayerNorm (one attention head)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        # no bias on k: its gradient is exactly zero (softmax ignores a per-query constant)
        self.q, self.v, self.proj = (nn.Linear(D, D) for _ in range(3))
        self.k = nn.Linear(D, D, bias=False)
        self.fc1, self.fc2 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / D ** 0.5, dim=-1)
        x = x + self.proj(att @ self.v(h))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


#: a case ending in this suffix runs its preset with ``amax_reduction=dist.group.WORLD`` on the
#: ranks (the one-process oracles run the preset itself: one process's amax is the global one)
REDUCED = "+amax"


def make_model(case: str, ranks: bool = False) -> nn.Module:
    """The converted model of ``case``; ``ranks``: built for the DDP / FSDP2 ranks (a
    :data:`REDUCED` case then all-reduces its per-tensor amax over the world)."""
    torch.manual_seed(0)                      # same initial weights on every rank
    model = Model()
    if case == "mixed":
        return convert_to_fp8(model, "mixed")
    if case.endswith(REDUCED):
        recipe = fp8core.recipe.get_recipe(case[:-len(REDUCED)])
        if ranks:
            recipe = recipe.replace(amax_reduction=dist.group.WORLD)
        return convert_to_fp8(model, recipe=recipe)
    return convert_to_fp8(model, recipe=case)


def capture_inputs(model: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Forward pre-hooks keeping each FP8 layer's first input (2-D), and the handles."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, LinearFP8):
            def hook(mod, args, name=name):
                seen.setdefault(name, args[0].detach().reshape(-1, args[0].shape[-1]).clone())
            handles.append(m.register_forward_pre_hook(hook))
    return seen, handles


def reduced_codes(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's input codes as its ``input`` slot quantizes them with the all-reduced
    amax (the layers' own reduction and quantizer, called directly)."""
    from fp8core_torch.matmul import _reduced_absmax
    mods = dict(model.named_modules())
    out = {}
    for name, x in inputs.items():
        recipe = mods[name].recipe
        codes, _ = quantize_operand(x, recipe.input,
                                    absmax=_reduced_absmax(x, recipe.amax_reduction))
        out[name] = codes
    return out


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(BATCH, SEQ, D, generator=g), torch.randn(BATCH, SEQ, D, generator=g))


def _flat(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model: nn.Module, wrapped: nn.Module, x: torch.Tensor, y: torch.Tensor,
          micro: int = 1) -> dict:
    """STEPS SGD steps on (x, y); ``micro`` > 1: gradient accumulation over that many equal
    consecutive slices of the batch, each loss divided by ``micro``."""
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    out = {"init": _flat({n: _full(p.detach()) for n, p in model.named_parameters()})}
    share = x.shape[0] // micro
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for i in range(micro):
            xs, ys = x[i * share:(i + 1) * share], y[i * share:(i + 1) * share]
            loss = torch.nn.functional.mse_loss(wrapped(xs), ys) / micro
            loss.backward()
        if step == 0:
            out["loss0"] = loss.detach().clone()
            out["grads0"] = _flat({n: _full(p.grad) for n, p in model.named_parameters()})
        opt.step()
    out["params"] = _flat({n: _full(p.detach()) for n, p in model.named_parameters()})
    return out


def gathered(params: dict[str, torch.Tensor], world: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's parameters (all_gather of the flattened vector)."""
    names = list(params)
    vec = torch.cat([params[n].reshape(-1) for n in names])
    bufs = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(bufs, vec)
    res = []
    for b in bufs:
        d, i = {}, 0
        for n in names:
            k = params[n].numel()
            d[n] = b[i:i + k].reshape(params[n].shape).clone()
            i += k
        res.append(d)
    return res


def main(rank: int, world: int, init_method: str, out_dir: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    open(os.path.join(out_dir, f"imported{rank}"), "w").close()  # the worker itself runs
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    open(os.path.join(out_dir, f"started{rank}"), "w").close()
    no_fsdp = None
    try:
        from torch.distributed.fsdp import fully_shard  # FSDP2, torch >= 2.6
    except ImportError as e:
        fully_shard = None
        no_fsdp = f"FSDP2 fully_shard unavailable in torch {torch.__version__}: {e}"

    x, y = global_batch()
    share = BATCH // world
    xl, yl = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    results = {"_no_fsdp": no_fsdp}
    for case in cases:
        res = {}
        model = make_model(case, ranks=True)
        res["buffers"] = [n for n, _ in model.named_buffers()]
        res["fp8_layers"] = len(model.fp8_conversion_report.converted)
        if case.endswith(REDUCED):
            seen, handles = capture_inputs(model)
        ddp = DistributedDataParallel(model)  # broadcast_buffers=True (the default)
        res["ddp"] = train(model, ddp, xl, yl)
        res["ddp"]["all_params"] = gathered(res["ddp"]["params"], world)
        if case.endswith(REDUCED):
            for h in handles:
                h.remove()
            res["ddp"]["inputs0"] = seen
            res["ddp"]["reduced_codes0"] = reduced_codes(model, seen)

        if fully_shard is not None:
            model = make_model(case, ranks=True)
            for b in model.blocks:
                fully_shard(b)
            fully_shard(model)
            res["fsdp"] = train(model, model, xl, yl)
            res["fsdp"]["all_params"] = gathered(res["fsdp"]["params"], world)

        # one process (same thread count as a rank): the whole batch on rank 0, gradient
        # accumulation over the ranks' micro-batches on the last rank (in parallel)
        if rank == 0:
            model = make_model(case)
            res["single"] = train(model, model, x, y)
        if rank == world - 1:
            model = make_model(case)
            res["accum"] = train(model, model, x, y, micro=world)
        results[case] = res
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split(","))
