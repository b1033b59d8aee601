"""The conformance --quick set through the same runner as ``python -m conformance``."""

import contextlib
import json

import numpy as np
import pytest

from conformance import adapters, golden, runner
from conformance.__main__ import main
from conformance.adapters import BACKENDS, PathProbe, resolve_backends
from conformance.cases import all_cases, operand_rules, preset_rules, select

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

    def shifted(absmax, codebook, *args):  # dscale one ulp too large: every backend could "agree", golden does not
        finite, q, d = original(absmax, codebook, *args)
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
    assert main(["--quick", "--list", "--filter", "linear_*"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed and listed == [c.id for c in select(QUICK, "linear_*")]


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
    assert "quantize_operand[float8_e4m3fn/axiswise, pow2_torchao, 130x200, axis=0, float32, midpoints]" in ids
    assert "matmul_fp8[BLOCKWISE_1x128, 3x10x72 @ 72x130, bfloat16]" in ids
    assert "linear_fp8[ROWWISE, 4x16x96 @ 96x160, float32]" in ids
    assert "train_mlp[TENSORWISE, batch 32x64, 20 steps]" in ids


def test_recipe_cases_cover_every_rule_and_preset():
    """Every distinct OperandRule of every preset runs on every (shape, axis) in float32 and in
    both half dtypes; every rule of the cross product runs, and together they cover every
    (shape, axis, dtype); every preset has its matmul, layer and training rows."""
    from fp8core.recipe import PRESETS
    cases = all_cases(0)
    operand = [c for c in cases if c.op in ("quantize_operand", "fake_quantize_operand")]
    assert {c.rule for c in operand} == set(operand_rules())
    for rule in preset_rules():
        mine = [c for c in operand if c.rule == rule]
        assert {(c.shape, c.axis) for c in mine if c.dtype == "float32"} == {
            ((256, 256), -1), ((256, 256), 0), ((130, 200), -1), ((130, 200), 0), ((3, 50, 72), -1)}
        assert {c.dtype for c in mine} == {"float32", "bfloat16", "float16"}, rule
    others = {(c.shape, c.axis, c.dtype) for c in operand if c.rule not in preset_rules()}
    assert len(others) == 15
    assert {c.axis for c in operand} == {-1, 0} and {len(c.shape) for c in operand} == {2, 3}
    for op in ("matmul_fp8", "linear_fp8", "train_mlp"):
        assert {c.recipe for c in cases if c.op == op} == set(PRESETS), op


def test_inputs_are_numpy_generated_and_stable():
    case = select(QUICK, "quantize_blockwise[float8_e4m3fn, 3x100, float32, bs=64, normal]")[0]
    x1 = runner.case_inputs(case)["x"]
    runner.case_inputs.cache_clear()
    x2 = runner.case_inputs(case)["x"]
    np.testing.assert_array_equal(x1, x2)
    assert x1.dtype == np.float32 and x1.shape == (3, 100)


@pytest.mark.parametrize("name", ["torch[kernel]", "torch[ops]", "jax[ffi]", "jax[xla]"])
def test_missing_backend_is_skipped_not_failed(monkeypatch, name):
    monkeypatch.setattr(BACKENDS[name], "unavailable", lambda: f"{name} is not installed")
    case = QUICK[0]
    results = runner.run_case(case)
    assert {r.status for r in results if name in r.pair} == {"skipped"}
    assert all(r.status != "failed" for r in results)


def test_backend_names_and_aliases():
    assert tuple(BACKENDS) == ("numpy", "torch[kernel]", "torch[ops]", "jax[ffi]", "jax[xla]")
    assert resolve_backends(["torch"]) == ("numpy", "torch[kernel]", "torch[ops]")
    assert resolve_backends(["jax[xla]", "numpy", "jax"]) == ("numpy", "jax[xla]", "jax[ffi]")
    with pytest.raises(ValueError, match=r"unknown backend\(s\) torch\[cuda\]; valid: numpy, torch\[kernel\]"):
        resolve_backends(["torch[cuda]"])
    # every path against numpy, and the two framework paths against each other
    assert runner.pairs_for(BACKENDS) == [("numpy", n) for n in list(BACKENDS)[1:]] + [("torch[ops]", "jax[xla]")]
    assert runner.pairs_for(("numpy", "torch[ops]")) == [("numpy", "torch[ops]")]


def test_path_problem_names_what_ran():
    native = select(QUICK, "fake_quantize_blockwise[float8_e4m3fn")[0]
    table = select(QUICK, "fake_quantize_blockwise[bnb_e4m3")[0]
    assert runner.path_problem(native, "torch[ops]", PathProbe(kernel=False, kernel_calls=2)) == (
        "torch[ops] was forced off the C kernel but called it 2 times")
    assert "never called it" in runner.path_problem(native, "torch[kernel]", PathProbe(kernel=True))
    assert runner.path_problem(table, "torch[kernel]", PathProbe(kernel=True)) is None  # tables: torch ops
    assert "chose the kernel 1 times" in runner.path_problem(native, "jax[xla]",
                                                             PathProbe(kernel=False, decisions=[False, True]))
    assert "chose XLA every time" in runner.path_problem(native, "jax[ffi]", PathProbe(kernel=True, decisions=[False]))
    assert "no kernel/XLA decision" in runner.path_problem(native, "jax[xla]", PathProbe(kernel=False))
    assert runner.path_problem(native, "numpy", PathProbe()) is None


@pytest.mark.parametrize("name", ["torch[ops]", "jax[xla]"])
def test_a_path_that_ignores_the_flag_is_caught(monkeypatch, name):
    """If forcing the framework path had no effect (the kernel still ran), the case fails for
    that path with the reason, instead of silently testing the kernel twice."""
    from fp8core import _kernel
    backend = BACKENDS[name]
    if backend.unavailable() or BACKENDS[name.split("[")[0] + ("[kernel]" if "torch" in name else "[ffi]")].unavailable():
        pytest.skip(f"{name} or its kernel path is unavailable here")
    monkeypatch.setattr(_kernel, "ENABLED", True)
    monkeypatch.setattr(adapters, "_kernel_flag", lambda enabled: contextlib.nullcontext())
    case = select(QUICK, "fake_quantize_blockwise[float8_e4m3fn")[0]
    results = runner.run_case(case, ("numpy", name))
    assert [r.status for r in results] == ["failed"]
    assert f"{name} raised RuntimeError: {name} was forced onto XLA" in results[0].message or (
        f"{name} was forced off the C kernel" in results[0].message), results[0].message


def test_forcing_restores_the_kernel_flag():
    from fp8core import _kernel
    before = _kernel.ENABLED
    runner.run_case(select(QUICK, "fake_quantize_global[float8_e5m2")[0])
    assert _kernel.ENABLED == before


@pytest.mark.parametrize("how", ["no compiler", "FP8CORE_KERNEL=0"])
def test_kernel_paths_are_skipped_with_the_reason_when_the_kernel_is_missing(monkeypatch, how):
    """Without the compiled kernel (or with it disabled) torch[kernel] and jax[ffi] are skipped
    with the reason; the framework paths still run and pass."""
    from fp8core import _kernel
    if how == "no compiler":
        monkeypatch.setattr(_kernel, "_LIB", None)
        expected = "fp8core's C kernel is not built"
    else:
        monkeypatch.setenv("FP8CORE_KERNEL", "0")
        expected = "disabled by FP8CORE_KERNEL=0"
    case = select(QUICK, "fake_quantize_blockwise[float8_e4m3fn, 3x100, float32, bs=64, normal]")[0]
    results = {r.pair: r for r in runner.run_case(case)}
    for name in ("torch[kernel]", "jax[ffi]"):
        r = results[f"numpy~{name}"]
        assert r.status == "skipped" and expected in r.message, (name, r)
    for name in ("torch[ops]", "jax[xla]"):
        if BACKENDS[name].unavailable() is None:
            assert results[f"numpy~{name}"].status == "passed", results[f"numpy~{name}"]
