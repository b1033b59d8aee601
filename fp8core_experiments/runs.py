"""What one training run is (mode, formats) and what it produces, framework-neutral."""

from __future__ import annotations

import dataclasses
from typing import Any

from fp8core.stats import StatsRecord

__all__ = ["MODES", "RunSpec", "TrainConfig", "RunResult", "LOG_COLUMNS"]

#: Linear-layer modes: ``nn.Linear`` baseline, ``LinearFP8Mixed``, ``LinearFP8Global``.
MODES: tuple[str, ...] = ("fp32", "mixed", "global")

#: Columns of the per-step log (the run CSV).
LOG_COLUMNS: tuple[str, ...] = ("framework", "mode", "format", "step", "loss", "train_acc",
                                "test_acc")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One configuration: ``mode`` in :data:`MODES`; formats only for FP8 modes."""

    mode: str
    fw_format: str | None = None
    bw_format: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "fp32") != (self.fw_format is None and self.bw_format is None):
            raise ValueError("formats are given exactly for the FP8 modes")

    @property
    def format_label(self) -> str:
        """``"fp32"`` or ``"<fw>:<bw>"`` as given on the command line."""
        return "fp32" if self.mode == "fp32" else f"{self.fw_format}:{self.bw_format}"

    @property
    def label(self) -> str:
        return "fp32" if self.mode == "fp32" else f"{self.mode} {self.format_label}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters shared by every run (and both frameworks)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 0.1
    hidden: int = 128
    eval_every: int = 25
    stats_every: int = 25
    seed: int = 0
    progress: bool = True

    def is_eval_step(self, step: int) -> bool:
        """Steps count from 1; evaluate every ``eval_every`` steps and at the last."""
        return step % self.eval_every == 0 or step == self.steps

    def is_stats_step(self, step: int) -> bool:
        return self.stats_every > 0 and (step % self.stats_every == 0 or step == 1)


@dataclasses.dataclass
class RunResult:
    """The per-step log rows (dicts keyed by :data:`LOG_COLUMNS`), statistics records
    of the FP8 layers, and the wall time of the run in seconds."""

    framework: str
    spec: RunSpec
    rows: list[dict[str, Any]]
    records: list[StatsRecord]
    seconds: float

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1]
