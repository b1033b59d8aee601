"""The JAX FFI wrapper's build, stamp, integrity check and loader (fp8core_jax/_build.py,
fp8core_jax/_ffi.py), and fp8core's environment switches (fp8core/_env.py).

Every damaged-library case runs in a subprocess with its own ``FP8CORE_CACHE`` (the
user's cache is never touched) and the installed library replaced by a path in a
temporary directory (``fp8core_jax._build.installed_path`` is patched before the
first call): the process must exit 0 (a dlopen of a truncated library used to end
in SIGBUS, rc 135), warn once, and give the bits of the numpy reference
(:mod:`fp8core.reference`) — through the XLA path when no library is usable.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fp8core import _env

pytest.importorskip("jax", reason="the FFI wrapper is fp8core_jax's")
from fp8core import _kernel  # noqa: E402
from fp8core_jax import _build  # noqa: E402

pytestmark = pytest.mark.skipif(_kernel._LIB is None, reason="fp8core's C kernel is not built")


# ----------------------------------------------------------------------------- environment switches

@pytest.mark.parametrize("raw,want", [("1", True), ("true", True), ("TRUE", True), ("Yes", True),
                                      (" on ", True), ("0", False), ("false", False), ("No", False),
                                      ("OFF", False), ("off\n", False)])
def test_flag_spellings(monkeypatch, raw, want):
    monkeypatch.setenv("FP8CORE_TEST_FLAG", raw)
    assert _env.flag("FP8CORE_TEST_FLAG", not want) is want


@pytest.mark.parametrize("raw", [None, "", "  "])
@pytest.mark.parametrize("default", [True, False])
def test_flag_unset_or_empty_is_the_default(monkeypatch, raw, default):
    if raw is None:
        monkeypatch.delenv("FP8CORE_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("FP8CORE_TEST_FLAG", raw)
    assert _env.flag("FP8CORE_TEST_FLAG", default) is default


@pytest.mark.parametrize("raw", ["2", "enable", "nein", "t"])
def test_flag_rejects_other_values_naming_variable_value_and_spellings(monkeypatch, raw):
    monkeypatch.setenv("FP8CORE_TEST_FLAG", raw)
    with pytest.raises(ValueError) as e:
        _env.flag("FP8CORE_TEST_FLAG", True)
    msg = str(e.value)
    assert f"FP8CORE_TEST_FLAG={raw!r}" in msg
    assert all(s in msg for s in _env.TRUE + _env.FALSE), msg


def _run(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=timeout)


def test_fp8core_kernel_spellings_reach_the_kernel_switch():
    cases = {"off": False, "False": False, "no": False, "0": False, "on": True, "YES": True, "": True}
    r = _run(f"""
        import importlib, os
        from fp8core import _kernel
        for raw in {list(cases)!r}:
            os.environ["FP8CORE_KERNEL"] = raw
            print(raw, importlib.reload(_kernel).ENABLED)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{raw} {want}" for raw, want in cases.items()]


def test_fp8core_kernel_bad_spelling_fails_loudly_at_import():
    r = _run("import fp8core._kernel", {"FP8CORE_KERNEL": "maybe"})
    assert r.returncode == 1
    assert "ValueError: environment variable FP8CORE_KERNEL='maybe' is not a boolean" in r.stderr


def test_conformance_adapters_read_the_same_switch(monkeypatch):
    adapters = pytest.importorskip("conformance.adapters")
    monkeypatch.setenv("FP8CORE_KERNEL", "Off")
    assert adapters._kernel_unavailable() == "the C kernel is disabled by FP8CORE_KERNEL=Off"
    monkeypatch.setenv("FP8CORE_KERNEL", "yes")
    assert adapters._kernel_unavailable() is None


# ----------------------------------------------------------------------------- compiler and stamp

def _fake_exe(d: Path, name: str) -> Path:
    p = d / name
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(0o755)
    return p


def test_cxx_is_shell_split(tmp_path, monkeypatch):
    ccache = _fake_exe(tmp_path, "ccache")
    _fake_exe(tmp_path, "g++")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _build.split_compiler("ccache g++") == [str(ccache), "g++"]
    assert _build.split_compiler("ccache 'g++' -fdiagnostics-color=never") == \
        [str(ccache), "g++", "-fdiagnostics-color=never"]
    spaced = tmp_path / "my compiler"
    spaced.mkdir()
    exe = _fake_exe(spaced, "c++")
    assert _build.split_compiler(f"'{exe}' -O1") == [str(exe), "-O1"]
    monkeypatch.setenv("CXX", "ccache g++")
    assert _build.split_compiler() == [str(ccache), "g++"]


def test_cxx_default_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(_build.BuildError, match="neither c\\+\\+ nor g\\+\\+ is on PATH"):
        _build.split_compiler()
    gxx = _fake_exe(tmp_path, "g++")
    assert _build.split_compiler() == [str(gxx)]
    with pytest.raises(_build.BuildError, match="CXX='/nonexistent' names '/nonexistent'"):
        _build.split_compiler("/nonexistent")


def test_cache_key_covers_compiler_and_abis(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8CORE_CACHE", str(tmp_path))
    a, b = _fake_exe(tmp_path, "gcc-a"), _fake_exe(tmp_path, "clang-b")
    key = _build.cache_path([str(a)], 3)
    assert key.parent == tmp_path and key.name.startswith("fp8q_xla-") and key.suffix == ".so"
    assert _build.cache_path([str(a)], 3) == key
    assert _build.cache_path([str(b)], 3) != key
    assert _build.cache_path([str(a), "-O1"], 3) != key
    assert _build.cache_path([str(a)], 4) != key
    monkeypatch.setattr(_build, "FFI_ABI_VERSION", _build.FFI_ABI_VERSION + 1)
    assert _build.cache_path([str(a)], 3) != key


def _stamped(path: Path, data: bytes, **fields) -> Path:
    """A file with a stamp of its own size and sha256 (plus ``fields``)."""
    path.write_bytes(data)
    want = _build.expected(_kernel.ABI_VERSION)
    stamp = {**want, "size": len(data), "sha256": _build._sha256(path), **fields}
    _build.stamp_path(path).write_text(json.dumps(stamp))
    return path


def test_check_accepts_only_a_matching_intact_file(tmp_path):
    want = _build.expected(_kernel.ABI_VERSION)
    lib = _stamped(tmp_path / "x.so", b"\x7fELF" + bytes(range(256)) * 8)
    assert _build.check(lib, want)["size"] == 4 + 256 * 8
    with open(lib, "r+b") as f:  # truncated
        f.truncate(100)
    with pytest.raises(_build.CheckFailed, match="is 100 bytes, its stamp says 2052") as e:
        _build.check(lib, want)
    assert e.value.integrity
    lib.write_bytes(b"G" * (4 + 256 * 8))  # same size, other bytes
    with pytest.raises(_build.CheckFailed, match="sha256 is not its stamp's") as e:
        _build.check(lib, want)
    assert e.value.integrity
    other = _stamped(tmp_path / "y.so", b"abc", jaxlib="0.0.1")
    with pytest.raises(_build.CheckFailed, match="built for jaxlib='0.0.1'") as e:
        _build.check(other, want)
    assert not e.value.integrity
    _build.stamp_path(other).write_text("{not json")
    with pytest.raises(_build.CheckFailed, match="no readable stamp"):
        _build.check(other, want)
    with pytest.raises(_build.CheckFailed, match="does not exist"):
        _build.check(tmp_path / "missing.so", want)


# ----------------------------------------------------------------------------- the loader, in subprocesses

# The scenario script: hide (or replace) the installed library, quantize eagerly and
# under jit, compare with the numpy reference, report warnings and the FFI status.
_SCENARIO = """
import json, sys, warnings
from pathlib import Path
import numpy as np
warnings.simplefilter("always")
import fp8core_jax._build as b
INSTALLED = {installed!r}
b.installed_path = lambda: Path(INSTALLED)
{prelude}
import jax, fp8core, fp8core_jax
from fp8core import reference
from fp8core_jax import _ffi
x = np.random.default_rng(0).standard_normal(3000).astype(np.float32) * 7
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
{calls}
rc, ra = reference.quantize_blockwise(x, "e4m3", 64)
out = dict(equal=bool(np.array_equal(np.asarray(codes), rc) and np.array_equal(np.asarray(absmax), ra)),
           warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
           status=_ffi.status(), available=bool(_ffi._STATE.get("ok")))
print("RESULT" + json.dumps(out, default=str))
"""
_EAGER = "    codes, absmax = fp8core_jax.quantize_blockwise(x, 'e4m3', 64)"


def _scenario(tmp_path: Path, *, installed: Path | None = None, env: dict | None = None,
              prelude: str = "", calls: str = _EAGER) -> dict:
    installed = installed or tmp_path / "not-installed" / "_fp8q_xla.so"
    env = {"FP8CORE_CACHE": str(tmp_path / "cache"), "FP8CORE_KERNEL": "1", **(env or {})}
    r = _run(_SCENARIO.format(installed=str(installed), prelude=prelude, calls=calls), env)
    assert r.returncode == 0, f"rc {r.returncode} (135 = SIGBUS)\n{r.stderr[-3000:]}"
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, r.stdout + r.stderr
    out = json.loads(line[-1][len("RESULT"):])
    assert out["equal"], out
    return out


@pytest.fixture(scope="module")
def good_lib(tmp_path_factory) -> Path:
    """An intact, stamped library for this installation: the installed one copied when it
    passes its check, else compiled once (skip without a compiler)."""
    d = tmp_path_factory.mktemp("good")
    want = _build.expected(_kernel.ABI_VERSION)
    src = _build.installed_path()
    try:
        _build.check(src, want)
    except _build.CheckFailed:
        try:
            _build.compile_library(d / "_fp8q_xla.so")
        except _build.BuildError as e:
            pytest.skip(f"no usable installed FFI library and none can be built: {e}")
        return d / "_fp8q_xla.so"
    shutil.copy(src, d / "_fp8q_xla.so")
    shutil.copy(_build.stamp_path(src), _build.stamp_path(d / "_fp8q_xla.so"))
    return d / "_fp8q_xla.so"


def _copy(lib: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(lib, dest)
    shutil.copy(_build.stamp_path(lib), _build.stamp_path(dest))
    return dest


def _cache_entry(tmp_path: Path, good_lib: Path) -> Path:
    """``good_lib`` placed in the scenario's cache under the current compiler's key."""
    key = _build.cache_path(_build.split_compiler(), _kernel.ABI_VERSION).name
    return _copy(good_lib, tmp_path / "cache" / key)


@pytest.mark.slow   # a jax subprocess (~2.5 s): kept out of the README test command
def test_installed_library_is_used_without_a_compiler(tmp_path, good_lib):
    lib = _copy(good_lib, tmp_path / "pkg" / "_fp8q_xla.so")
    out = _scenario(tmp_path, installed=lib, env={"CXX": "/nonexistent"})
    assert out["available"] and out["status"]["origin"] == "installed", out
    assert out["status"]["path"] == str(lib)
    assert out["warnings"] == [], out
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached


def test_no_compiler_and_no_installed_library(tmp_path):
    out = _scenario(tmp_path, env={"CXX": "/nonexistent"})
    assert not out["available"] and out["status"]["active"] is False
    assert len(out["warnings"]) == 1, out
    assert "using the XLA path" in out["warnings"][0]
    assert "no C++ compiler: CXX='/nonexistent'" in out["warnings"][0]


def test_truncated_cached_library_is_never_opened(tmp_path, good_lib, monkeypatch):
    monkeypatch.setenv("FP8CORE_CACHE", str(tmp_path / "cache"))
    entry = _cache_entry(tmp_path, good_lib)
    with open(entry, "r+b") as f:
        f.truncate(entry.stat().st_size // 3)
    out = _scenario(tmp_path, env={"CXX": "/nonexistent"})  # found by its stamp, no compiler
    assert not out["available"]
    assert len(out["warnings"]) == 1, out
    assert "truncated or replaced" in out["warnings"][0] and str(entry) in out["warnings"][0]


def test_garbage_installed_library_with_a_matching_stamp(tmp_path):
    # the stamp is the garbage's own: the check passes, dlopen refuses it (no crash)
    (tmp_path / "pkg").mkdir()
    lib = _stamped(tmp_path / "pkg" / "_fp8q_xla.so", b"not an ELF file at all\n" * 100)
    out = _scenario(tmp_path, installed=lib, env={"CXX": "/nonexistent"})
    assert not out["available"]
    assert len(out["warnings"]) == 1, out
    assert f"{lib} could not be loaded" in out["warnings"][0]


@pytest.mark.slow
def test_installed_library_for_another_jaxlib(tmp_path, good_lib):
    lib = _copy(good_lib, tmp_path / "pkg" / "_fp8q_xla.so")
    stamp = json.loads(_build.stamp_path(lib).read_text())
    _build.stamp_path(lib).write_text(json.dumps({**stamp, "jaxlib": "0.0.1"}))
    out = _scenario(tmp_path, installed=lib, env={"CXX": "/nonexistent"})
    assert not out["available"]
    assert len(out["warnings"]) == 1, out
    assert "built for jaxlib='0.0.1'" in out["warnings"][0]


@pytest.mark.slow   # a jax subprocess (~2.5 s): kept out of the README test command
def test_unwritable_cache(tmp_path):
    # a cache "directory" below a regular file cannot be created even by root (chmod
    # would not stop root); also read-only for everyone else
    (tmp_path / "ro").write_text("a file")
    ro = tmp_path / "ro-dir"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        for cache in (tmp_path / "ro" / "cache", ro / "cache"):
            if cache.parent == ro and os.geteuid() == 0:
                continue
            out = _scenario(tmp_path, env={"FP8CORE_CACHE": str(cache)})
            assert not out["available"]
            assert len(out["warnings"]) == 1, out
            assert f"cannot write to {cache}" in out["warnings"][0]
    finally:
        ro.chmod(stat.S_IRWXU)


@pytest.mark.slow
def test_c_kernel_not_built_is_said_once(tmp_path):
    out = _scenario(tmp_path, prelude="import fp8core._kernel as k; k._LIB = None",
                    calls=_EAGER + "\n" + _EAGER)
    assert not out["available"]
    assert len(out["warnings"]) == 1, out
    assert out["warnings"][0].startswith(
        "fp8core_jax: fp8core's C kernel (fp8core._fp8q) is not built, using the XLA path "
        "(same results, slower); reinstall fp8core with a C compiler"), out
    assert out["status"]["reason"] == "fp8core's C kernel (fp8core._fp8q) is not built"


@pytest.mark.slow
def test_disabled_kernel_is_not_a_warning(tmp_path):
    out = _scenario(tmp_path, env={"FP8CORE_KERNEL": "off"})
    assert not out["available"] and out["warnings"] == [], out


# Raises if a compiler (any subprocess) starts while a jax trace is active.
_NO_COMPILE_IN_TRACE = """
import subprocess
from fp8core_jax import _ffi
_real_run = subprocess.run
RUNS = []
def _guarded(*a, **k):
    if _ffi._tracing():
        raise AssertionError(f"subprocess started inside a jax trace: {a}")
    RUNS.append(a[0][0])
    return _real_run(*a, **k)
subprocess.run = _guarded
"""
_JIT_FIRST = ("    f = jax.jit(lambda v: fp8core_jax.quantize_blockwise(v, 'e4m3', 64))\n"
              "    codes, absmax = f(x)\n")


def test_no_compiler_runs_inside_a_trace(tmp_path):
    out = _scenario(tmp_path, prelude=_NO_COMPILE_IN_TRACE, calls=_JIT_FIRST)
    assert len(out["warnings"]) == 1, out
    assert "never runs a compiler inside a jax trace" in out["warnings"][0]
    # the first decision is made by status() below, which never builds either
    assert not list((tmp_path / "cache").glob("*.so"))


@pytest.mark.slow
def test_build_happens_at_the_next_call_outside_the_trace(tmp_path):
    calls = _JIT_FIRST + _EAGER
    out = _scenario(tmp_path, prelude=_NO_COMPILE_IN_TRACE, calls=calls)
    assert out["available"] and out["status"]["origin"] == "cache (built now)", out
    assert len(out["warnings"]) == 1 and "inside a jax trace" in out["warnings"][0], out
    built = list((tmp_path / "cache").glob("fp8q_xla-*.so"))
    assert len(built) == 1 and _build.check(built[0], _build.expected(_kernel.ABI_VERSION))


@pytest.mark.slow
def test_truncated_cached_library_is_rebuilt(tmp_path, good_lib, monkeypatch):
    monkeypatch.setenv("FP8CORE_CACHE", str(tmp_path / "cache"))
    entry = _cache_entry(tmp_path, good_lib)
    with open(entry, "r+b") as f:
        f.truncate(1000)
    out = _scenario(tmp_path)
    assert out["available"] and out["status"]["path"] == str(entry), out
    assert len(out["warnings"]) == 1 and "rebuilt as" in out["warnings"][0], out
    assert _build.check(entry, _build.expected(_kernel.ABI_VERSION))["size"] > 1000


@pytest.mark.slow
def test_build_command(tmp_path):
    env = {"FP8CORE_CACHE": str(tmp_path / "cache")}
    r = _run("from fp8core_jax.build import main; raise SystemExit(main(['--check']))", env)
    assert r.returncode in (0, 1), r.stderr
    assert "would load:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fp8core_jax.build"], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "built " in r.stdout and str(tmp_path / "cache") in r.stdout
    entry = next((tmp_path / "cache").glob("fp8q_xla-*.so"))
    stamp = _build.check(entry, _build.expected(_kernel.ABI_VERSION))
    assert stamp["ffi_abi"] == _build.FFI_ABI_VERSION and stamp["kernel_abi"] == _kernel.ABI_VERSION
    r = _run("from fp8core_jax.build import main; raise SystemExit(main(['--check']))", env)
    assert f"usable:   {entry}" in r.stdout, r.stdout
