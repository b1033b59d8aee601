"""The digits experiment end to end (a few steps, into a tmp dir) and its data plumbing."""

import csv
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from fp8core_experiments.data import batch_schedule, load_digits_split

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_BACKENDS = all(importlib.util.find_spec(m) is not None
                    for m in ("torch", "jax", "flax", "fp8core_torch", "fp8core_jax"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
needs_backends = pytest.mark.skipif(
    not HAVE_BACKENDS, reason="needs torch, jax, flax, fp8core_torch and fp8core_jax")

COLUMNS = ["framework", "mode", "format", "step", "loss", "train_acc", "test_acc"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_png(path, width, height):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    size = path.stat().st_size
    assert size > 20_000, f"{path} is only {size} bytes"
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (height, width), img.shape
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_split_and_batches_are_deterministic():
    a, b = load_digits_split(3), load_digits_split(3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert len(a.y_train) + len(a.y_test) == 1797 and a.n_features == 64 and a.n_classes == 10
    # standardized with training statistics
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0, atol=1e-5)
    assert not np.array_equal(load_digits_split(4).y_test, a.y_test)
    s = batch_schedule(100, 32, 7, seed=0)
    assert s.shape == (7, 32)
    np.testing.assert_array_equal(s, batch_schedule(100, 32, 7, seed=0))
    # one epoch = 3 batches of distinct indices (the remainder is dropped)
    assert len(set(s[:3].ravel())) == 96
    with pytest.raises(ValueError):
        batch_schedule(10, 11, 1, seed=0)


def test_cli_help_and_format_errors():
    ok = subprocess.run([sys.executable, "-m", "fp8core_experiments.train_digits", "--help"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "--formats" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fp8core_experiments.train_digits",
                          "--formats", "e4m3:e9m9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown format" in bad.stderr


@needs_torch
def test_torch_fp32_baseline(tmp_path):
    import torch

    from fp8core_experiments import train_digits

    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    out = train_digits.run(["--steps", "10", "--eval-every", "5", "--modes", "fp32",
                            "--backends", "torch", "--out-dir", str(tmp_path), "--no-progress"])
    rows = read_csv(tmp_path / "train_digits.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 10
    assert [r["test_acc"] != "" for r in rows].count(True) == 2
    assert out["agreement"] == [] and out["passed"]
    # the run's numerics settings did not leak
    assert (torch.get_num_threads(), torch.get_float32_matmul_precision()) == (threads, precision)


@needs_backends
def test_six_runs_end_to_end(tmp_path):
    import jax

    from fp8core_experiments import train_digits

    steps = 20
    out = train_digits.run(["--steps", str(steps), "--eval-every", "10", "--stats-every", "10",
                            "--out-dir", str(tmp_path), "--no-progress"])
    assert jax.config.jax_default_matmul_precision is None  # the context did not leak
    rows = read_csv(tmp_path / "train_digits.csv")
    assert list(rows[0]) == COLUMNS
    runs = {(r["framework"], r["mode"], r["format"]) for r in rows}
    assert runs == {(fw, m, f) for fw in ("torch", "jax")
                    for m, f in (("fp32", "fp32"), ("mixed", "e4m3:e5m2"),
                                 ("global", "e4m3:e5m2"))}
    for run in runs:
        mine = [r for r in rows if (r["framework"], r["mode"], r["format"]) == run]
        assert [int(r["step"]) for r in mine] == list(range(1, steps + 1))
        assert all(math.isfinite(float(r["loss"])) for r in mine)
        accs = [float(r["test_acc"]) for r in mine if r["test_acc"]]
        assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    # 20 steps already learn something: the loss falls in every run
    for run in runs:
        mine = [float(r["loss"]) for r in rows if (r["framework"], r["mode"], r["format"]) == run]
        assert np.mean(mine[-5:]) < np.mean(mine[:5]), run

    assert out["passed"], out["agreement"]
    assert {a["mode"] for a in out["agreement"]} == {"fp32", "mixed", "global"}

    stats_rows = read_csv(tmp_path / "train_digits_stats.csv")
    # 4 FP8 runs x 2 layers x 3 operands, pooled over steps 1, 10, 20
    assert len(stats_rows) == 24
    assert {r["n_records"] for r in stats_rows} == {"3"}
    for r in stats_rows:
        assert float(r["sqnr_db"]) > 10, r
    check_png(tmp_path / "train_digits.png", width=1300, height=800)
