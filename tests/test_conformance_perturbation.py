"""A deliberately broken backend makes the suite fail, naming the cases.

Each test breaks one backend the way an implementation could plausibly go wrong
— unscaling by dividing by ``qscale`` (``v / fl(M/a)``, here as ``v · fl(1/qscale)``)
instead of the contract's ``v · fl(a · fl(1/M))`` — runs a slice of the quick suite through the same runner as
``python -m conformance``, and checks that the failures name the case ids, the
broken backend's pairs, and the first differing element.
"""

import pytest

from conformance import runner
from conformance.cases import all_cases, select

# one codebook per rounding path: a native cast and a table search
SLICE = [c for c in all_cases(0, quick=True)
         if c.op == "fake_quantize_blockwise" and c.dtype == "float32" and c.distribution == "normal"]


def _failures(backend_names=("numpy", "torch[kernel]", "torch[ops]", "jax[ffi]", "jax[xla]")):
    results = [r for case in SLICE for r in runner.run_case(case, backend_names)]
    return results, [r for r in results if r.status == "failed"]


def test_slice_passes_unperturbed():
    pytest.importorskip("fp8core_torch")
    pytest.importorskip("fp8core_jax")
    assert SLICE
    results, failed = _failures()
    assert not failed, [r.message for r in failed]


def test_torch_dividing_instead_of_multiplying_is_caught(monkeypatch):
    """The torch-ops path (CUDA, tables, no C kernel) with the division."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("fp8core_torch")
    from fp8core import _kernel
    from fp8core_torch import quantize as tq

    original = tq._scales

    def divided(absmax, spec, *args):
        finite, qscale, dscale = original(absmax, spec, *args)
        return finite, qscale, torch.where(finite, torch.reciprocal(qscale), dscale)

    monkeypatch.setattr(tq, "_scales", divided)
    _assert_torch_caught("torch[ops]")


def test_torch_kernel_off_by_one_ulp_is_caught(monkeypatch):
    """The C kernel path with its ``fl(1/M)`` constant one ulp low."""
    pytest.importorskip("fp8core_torch")
    from fp8core import _kernel

    if _kernel._LIB is None:
        pytest.skip("fp8core's C kernel is not built")
    _break_kernel_constant(monkeypatch)
    _assert_torch_caught("torch[kernel]")


def test_jax_kernel_off_by_one_ulp_is_caught(monkeypatch):
    """The C kernel as JAX's custom call, with its ``fl(1/M)`` constant one ulp low."""
    pytest.importorskip("jax")
    from fp8core import _kernel
    from fp8core_jax import _ffi

    monkeypatch.setattr(_kernel, "ENABLED", True)
    if not _ffi.available():
        pytest.skip("fp8core's C kernel is not available to JAX")
    failed = _jax_failures(monkeypatch, lambda: _break_kernel_constant(monkeypatch), "jax[ffi]")
    assert failed, "a broken JAX kernel path went unnoticed"
    assert {r.pair for r in failed} == {"numpy~jax[ffi]"}
    assert "first at index" in failed[0].message


def _jax_failures(monkeypatch, perturb, path):
    """Failed numpy~<path> results of the slice with ``perturb()`` applied; the jitted
    quantizers are retraced with it (constants and helpers are read at trace time)
    and again after it is undone."""
    import jax

    jax.clear_caches()
    perturb()
    try:
        return _failures(("numpy", path))[1]
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def _break_kernel_constant(monkeypatch):
    import numpy as np
    from fp8core import _kernel

    original = _kernel._format

    def off(codebook):
        f = _kernel._Format.from_buffer_copy(original(codebook))
        f.inv_m = float(np.nextafter(np.float32(f.inv_m), np.float32(0)))
        return f

    monkeypatch.setattr(_kernel, "ENABLED", True)
    monkeypatch.setattr(_kernel, "_format", off)


def _assert_torch_caught(path):
    results, failed = _failures(("numpy", path))
    assert failed, f"a broken {path} went unnoticed"
    assert {r.pair for r in failed} == {f"numpy~{path}"}
    assert {r.case_id for r in failed} <= {c.id for c in SLICE}
    assert all(r.case_id.startswith("fake_quantize_blockwise[") for r in failed)
    assert "first at index" in failed[0].message and "expected" in failed[0].message


def test_jax_dividing_instead_of_multiplying_is_caught(monkeypatch):
    """The XLA path (GPU/TPU, or without the C kernel) with the division."""
    pytest.importorskip("jax")
    pytest.importorskip("fp8core_jax")
    import jax.numpy as jnp
    from fp8core import _kernel
    from fp8core_jax import quantize as jq

    original = jq._group_scales

    def divided(absmax, c, *args):
        finite, qscale, dscale = original(absmax, c, *args)
        return finite, qscale, jnp.where(finite, jnp.float32(1) / qscale, dscale)

    failed = _jax_failures(monkeypatch, lambda: monkeypatch.setattr(jq, "_group_scales", divided), "jax[xla]")
    assert failed, "a JAX backend that divides went unnoticed"
    assert {r.pair for r in failed} == {"numpy~jax[xla]"}
    assert "first at index" in failed[0].message
    # and the failure names the case as the report would
    assert failed[0].case_id in {c.id for c in select(SLICE, "fake_quantize_blockwise")}
