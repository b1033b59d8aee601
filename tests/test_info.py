"""``fp8core.info()`` and ``python -m fp8core``: versions, the C kernel, the environment
switches and the active path per framework, checked against the modules' own state."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fp8core
from fp8core import _kernel


def _run(args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_info_versions_and_kernel_match_the_installation():
    d = fp8core.info()
    assert d["fp8core"] == fp8core.__version__
    assert d["versions"]["numpy"] == np.__version__
    assert d["versions"]["ml_dtypes"] == importlib.metadata.version("ml_dtypes")
    k = d["kernel"]
    assert k["built"] is (_kernel._LIB is not None)
    assert k["expected_abi"] == _kernel.ABI_VERSION
    if k["built"]:
        assert k["abi"] == _kernel._LIB.fp8q_abi_version() and os.path.isfile(k["path"])
        assert k["threads"] in ("OpenMP (libgomp) when the caller asks (torch), else POSIX threads",
                                "POSIX threads only")
    else:
        assert k["reason"]


def test_info_torch_path_follows_the_kernel_switch(monkeypatch):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    want = "kernel" if _kernel.available() else "torch-ops"
    assert fp8core.info()["paths"]["torch"]["cpu"] == want
    monkeypatch.setattr(_kernel, "ENABLED", False)
    p = fp8core.info()["paths"]["torch"]
    assert p["cpu"] == "torch-ops"
    if _kernel._LIB is not None:
        assert p["reason"] == "disabled by FP8CORE_KERNEL / _kernel.ENABLED"


def test_info_jax_path_is_the_ffi_modules_decision():
    pytest.importorskip("jax")
    from fp8core_jax import _ffi

    p = fp8core.info()["paths"]["jax"]
    assert p["cpu"] == ("ffi" if _ffi.available() else "xla")
    if p["cpu"] == "ffi":
        assert p["library"] == str(_ffi._STATE["path"]) and p["origin"] in ("installed", "cache",
                                                                               "cache (built now)")


@pytest.mark.parametrize("raw,value", [("Off", False), ("yes", True), (None, True)])
def test_info_reports_parsed_switches(monkeypatch, raw, value):
    if raw is None:
        monkeypatch.delenv("FP8CORE_KERNEL", raising=False)
    else:
        monkeypatch.setenv("FP8CORE_KERNEL", raw)
    e = fp8core.info()["env"]["FP8CORE_KERNEL"]
    assert (e["raw"], e["value"]) == (raw, value)


def test_info_reports_a_bad_switch_instead_of_failing(monkeypatch):
    monkeypatch.setenv("FP8CORE_KERNEL", "maybe")
    assert fp8core.info()["env"]["FP8CORE_KERNEL"]["value"].startswith(
        "invalid: environment variable FP8CORE_KERNEL='maybe' is not a boolean")


def test_info_without_torch_or_jax():
    code = textwrap.dedent("""
        import sys
        for name in ("torch", "jax", "jaxlib", "flax"):
            sys.modules[name] = None
        import fp8core
        d = fp8core.info()
        assert d["kernel"]["built"] in (True, False)
        assert d["paths"]["jax"]["cpu"] in (None, "xla"), d["paths"]["jax"]
        loaded = [m for m in ("torch", "jax", "flax") if sys.modules.get(m) is not None]
        assert not loaded, loaded
        print("ok")
        """)
    r = _run(["-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_python_m_fp8core_reports_the_active_paths(tmp_path):
    pytest.importorskip("jax")
    env = {"FP8CORE_CACHE": str(tmp_path)}
    r = _run(["-m", "fp8core", "--json"], env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    r = _run(["-m", "fp8core"], {**env, "FP8CORE_KERNEL": "off"})
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert f"fp8core {fp8core.__version__}" in text
    assert "FP8CORE_KERNEL = 'off' -> False" in text
    if d["kernel"]["built"]:
        assert d["paths"]["torch"]["cpu"] in ("kernel", None)
        assert "C kernel: built, ABI" in text and "DISABLED" in text
    if importlib.util.find_spec("torch") is not None:
        assert "torch: torch-ops" in text
    assert "jax: xla" in text
    if d["paths"]["jax"]["cpu"] == "ffi":  # the default run: the library and where it came from
        assert d["paths"]["jax"]["origin"] in ("installed", "cache")
        assert os.path.isfile(d["paths"]["jax"]["library"])
