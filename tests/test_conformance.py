"""The conformance --quick set through the same runner as ``python -m conformance``."""

import json

import numpy as np
import pytest

from conformance import golden, runner
from conformance.__main__ import main
from conformance.adapters import BACKENDS
from conformance.cases import all_cases, select

QUICK = all_cases(0, quick=True)


@pytest.mark.parametrize("case", QUICK, ids=lambda c: c.id)
def test_quick_case(case):
    results = runner.run_case(case)
    failures = [f"{r.case_id} ({r.pair}): {r.message}" for r in results if r.status == "failed"]
    assert not failures, "\n".join(failures)
    if all(r.status == "skipped" for r in results):
        pytest.skip("; ".join(sorted({r.message for r in results})))


def test_golden_vectors_match_the_reference():
    results = golden.check()
    assert len(results) == sum(len(c) for c in golden.golden_cases().values())
    failures = [f"{r.case_id}: {r.message}" for r in results if r.status != "passed"]
    assert not failures, "\n".join(failures)


def test_golden_check_catches_a_moved_reference(monkeypatch):
    import fp8core.reference as ref
    original = ref.group_scales

    def shifted(absmax, codebook):  # dscale one ulp too large: every backend could "agree", golden does not
        finite, q, d = original(absmax, codebook)
        return finite, q, np.nextafter(d, np.float32(np.inf))

    monkeypatch.setattr(ref, "group_scales", shifted)
    results = golden.check(pattern="float8_e4m3fn, 3x100, float32, bs=64, normal")
    assert results and all(r.status == "failed" for r in results)
    assert results[0].message.startswith("dequantized: ")
    assert "first at index (0, 0)" in results[0].message


def test_cli_writes_reports_and_lists(tmp_path, capsys):
    assert main(["--quick", "--filter", "quantize_global[float8_e5m2", "--report-dir", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "operation" in out and "quantize_global" in out
    report = json.loads((tmp_path / "conformance-report.json").read_text())
    assert report["meta"]["quick"] is True and report["results"]
    assert all("quantize_global[float8_e5m2" in r["case_id"] or r["op"] == "golden"
               for r in report["results"])
    assert "# fp8core conformance report" in (tmp_path / "conformance-report.md").read_text()
    assert main(["--quick", "--list", "--filter", "train_*"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [c.id for c in select(QUICK, "train_*")]


def test_cli_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        main(["--backends", "numpy,tensorflow"])
    assert "unknown backend(s) tensorflow" in capsys.readouterr().err


def test_filter_substring_and_glob():
    cases = all_cases(0)
    assert all("bnb_e5m2" in c.id for c in select(cases, "bnb_e5m2"))
    glob = select(cases, "matmul_fp8_global[*float16*")
    assert glob and all(c.op == "matmul_fp8_global" and "float16" in c.id for c in glob)


def test_case_ids_are_unique_and_readable():
    cases = all_cases(0)
    assert len({c.id for c in cases}) == len(cases)
    ids = {c.id for c in cases}
    assert "matmul_fp8_mixed[float8_e4m3fn/float8_e5m2, 2x64x768 @ 768x3072, float16, bsz=auto]" in ids
    assert "quantize_blockwise[bnb_e4m3, 3x100, bfloat16, bs=64, nan_block]" in ids


def test_inputs_are_numpy_generated_and_stable():
    case = select(QUICK, "quantize_blockwise[float8_e4m3fn, 3x100, float32, bs=64, normal]")[0]
    x1 = runner.case_inputs(case)["x"]
    runner.case_inputs.cache_clear()
    x2 = runner.case_inputs(case)["x"]
    np.testing.assert_array_equal(x1, x2)
    assert x1.dtype == np.float32 and x1.shape == (3, 100)


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_missing_backend_is_skipped_not_failed(monkeypatch, name):
    monkeypatch.setattr(BACKENDS[name], "unavailable", lambda: f"{name} is not installed")
    case = QUICK[0]
    results = runner.run_case(case)
    assert {r.status for r in results if name in r.pair} == {"skipped"}
    assert all(r.status != "failed" for r in results)
