"""The digits MLP in PyTorch: initial weights (the source for both frameworks) and training."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fp8core_experiments.data import DigitsData
from fp8core_experiments.numerics import pinned_torch_numerics
from fp8core_experiments.runs import RunResult, RunSpec, TrainConfig

__all__ = ["MLP", "initial_state_dict", "build_model", "train"]


def _linear(spec: RunSpec, n_in: int, n_out: int) -> nn.Module:
    if spec.mode == "fp32":
        return nn.Linear(n_in, n_out)
    import fp8core_torch

    cls = fp8core_torch.LinearFP8Mixed if spec.mode == "mixed" else fp8core_torch.LinearFP8Global
    return cls(n_in, n_out, fw_format=spec.fw_format, bw_format=spec.bw_format)


class MLP(nn.Module):
    """``fc1 → ReLU → fc2``; state_dict keys ``fc{1,2}.{weight,bias}`` in every mode."""

    def __init__(self, spec: RunSpec, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.fc1 = _linear(spec, n_in, hidden)
        self.fc2 = _linear(spec, hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def initial_state_dict(n_in: int, hidden: int, n_out: int, seed: int) -> dict[str, np.ndarray]:
    """float32 numpy weights of a freshly initialised fp32 :class:`MLP` (torch's default
    ``nn.Linear`` init) under ``torch.manual_seed(seed)``.

    The global torch RNG is forked, so the caller's RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(RunSpec("fp32"), n_in, hidden, n_out)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def build_model(spec: RunSpec, init: dict[str, np.ndarray], n_in: int, hidden: int,
                n_out: int) -> MLP:
    """An :class:`MLP` for ``spec`` holding exactly the weights ``init``."""
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the RNG untouched
        model = MLP(spec, n_in, hidden, n_out)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in init.items()})
    return model


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(spec: RunSpec, cfg: TrainConfig, data: DigitsData, init: dict[str, np.ndarray],
          batches: np.ndarray) -> RunResult:
    """Plain SGD, ``p ← p − lr·grad``, on the given batches; mean cross-entropy loss.

    Step ``s`` (from 1) logs the loss of its batch (before its update) and, on
    evaluation steps, train/test accuracy after its update. FP8 layers' operands
    are recorded on ``cfg.is_stats_step`` steps.
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    # One intra-op thread: these matmuls are tiny (threading costs more than it
    # gives, badly so on a busy 2-core machine) and the CPU reduction order no
    # longer depends on the machine's core count.
    torch.set_num_threads(1)
    try:
        return _train(spec, cfg, data, init, batches, start)
    finally:
        torch.set_num_threads(threads)


def _train(spec: RunSpec, cfg: TrainConfig, data: DigitsData, init: dict[str, np.ndarray],
           batches: np.ndarray, start: float) -> RunResult:
    from fp8core_torch.stats import collect_stats

    with pinned_torch_numerics():
        model = build_model(spec, init, data.n_features, cfg.hidden, data.n_classes)
        params = list(model.parameters())
        x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
        rows, records = [], []
        bar = tqdm(range(1, cfg.steps + 1), desc=f"torch {spec.label}", disable=not cfg.progress,
                   leave=False)
        for step in bar:
            idx = torch.from_numpy(batches[step - 1])
            xb, yb = x_train[idx], y_train[idx]
            want_stats = spec.mode != "fp32" and cfg.is_stats_step(step)
            with collect_stats(model, step=step, enabled=want_stats) as step_records:
                loss = F.cross_entropy(model(xb), yb)
                for p in params:
                    p.grad = None
                loss.backward()
            records.extend(step_records)
            with torch.no_grad():
                for p in params:
                    p.sub_(cfg.lr * p.grad)
            row = {"framework": "torch", "mode": spec.mode, "format": spec.format_label,
                   "step": step, "loss": float(loss.detach()), "train_acc": None, "test_acc": None}
            if cfg.is_eval_step(step):
                row["train_acc"] = _accuracy(model, x_train, y_train)
                row["test_acc"] = _accuracy(model, x_test, y_test)
                bar.set_postfix(loss=f"{row['loss']:.4f}", test_acc=f"{row['test_acc']:.3f}")
            rows.append(row)
    return RunResult("torch", spec, rows, records, time.perf_counter() - start)
