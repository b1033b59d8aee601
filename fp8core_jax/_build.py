"""Build, stamp and check fp8core's JAX FFI wrapper (``fp8core/csrc/fp8q_xla.cc``).

The code behind ``setup.py``'s second extension (the installed copy,
``fp8core_jax/_fp8q_xla.so``), :mod:`fp8core_jax._ffi`'s loader (the cache:
``$FP8CORE_CACHE``, else ``$XDG_CACHE_HOME/fp8core``, else ``~/.cache/fp8core``) and
the command ``python -m fp8core_jax.build`` (:mod:`fp8core_jax.build`).

Every library is stamped with a JSON file next to it (``<library>.json``): the
jaxlib version and XLA FFI API version it was compiled against, the compiler, the
C kernel ABI its declarations were copied from, the wrapper's own ABI, the sha256 of
its source, and the size and sha256 of the library itself. :func:`check` compares a
stamp with the running installation and the file on disk; the loader never opens a
library that fails it (a truncated or garbage file would crash the process).

The compiler is ``$CXX`` split like a shell word list (``CXX="ccache g++"`` works),
else ``c++``, else ``g++``. This module imports only the standard library at import
time (``setup.py`` loads it by path to build the installed copy).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["FFI_ABI_VERSION", "split_compiler", "compile_library", "check", "expected", "cache_dir",
           "cache_path", "installed_path"]

#: The ABI of fp8q_xla.cc's exports that fp8core_jax/_ffi.py is written for
#: (``FP8Q_XLA_ABI_VERSION`` in the C++ file, returned by ``fp8q_xla_abi()``).
FFI_ABI_VERSION = 3
#: The installed library's name (in this package's directory) and a stamp's suffix.
INSTALLED_NAME = "_fp8q_xla.so"
STAMP_SUFFIX = ".json"
#: Seconds a compile may take before it is abandoned.
TIMEOUT = 300

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE.parent / "fp8core" / "csrc"
SOURCE = _CSRC / "fp8q_xla.cc"
KERNEL_SOURCE = _CSRC / "fp8q.c"


class BuildError(RuntimeError):
    """The wrapper could not be built (no compiler, no headers, a failed compile, a
    read-only directory); the message says which."""


# --------------------------------------------------------------------------- inputs

def split_compiler(value: str | None = None) -> list[str]:
    """The C++ compiler command: ``value`` (default ``$CXX``) split with :func:`shlex.split`
    (``"ccache g++"`` -> ``["/usr/bin/ccache", "g++"]``; the first word resolved on
    ``PATH``), else ``c++``, else ``g++``.

    Raises:
        BuildError: no compiler (``$CXX`` names a program that does not exist, or
            neither ``c++`` nor ``g++`` is on ``PATH``).
    """
    if value is None:
        value = os.environ.get("CXX", "")
    words = shlex.split(value)
    if words:
        exe = shutil.which(words[0])
        if exe is None:
            raise BuildError(f"no C++ compiler: CXX={value!r} names {words[0]!r}, which is not an "
                             f"executable on PATH")
        return [exe, *words[1:]]
    for name in ("c++", "g++"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise BuildError("no C++ compiler: $CXX is unset and neither c++ nor g++ is on PATH")


def _compiler_identity(cmd: list[str]) -> str:
    """What the cache key knows of a compiler without running it: each word that is
    a program, by real path, size and modification time (so an upgrade is a new key)."""
    parts = []
    for w in cmd:
        exe = shutil.which(w) if not w.startswith("-") else None
        if exe:
            real = os.path.realpath(exe)
            st = os.stat(real)
            parts.append(f"{real}:{st.st_size}:{st.st_mtime_ns}")
        else:
            parts.append(w)
    return " ".join(parts)


def _compiler_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _define(path: Path, name: str) -> int | None:
    """The integer value of ``#define name N`` in a C source, or None."""
    try:
        m = re.search(rf"^#define\s+{name}\s+(\d+)\s*$", path.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def jaxlib_version() -> str | None:
    """The installed jaxlib's version (read from its metadata: jax is not imported)."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def include_dir() -> Path:
    """jaxlib's header directory (``jax.ffi.include_dir()``, found without importing jax).

    Raises:
        BuildError: jaxlib is not installed or has no XLA FFI headers.
    """
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("jaxlib is not installed (its XLA FFI headers are needed)")
    inc = Path(list(spec.submodule_search_locations)[0]) / "include"
    if not (inc / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise BuildError(f"jaxlib {jaxlib_version()} has no XLA FFI headers under {inc}")
    return inc


def _ffi_api_version(inc: Path) -> str:
    c_api = inc / "xla" / "ffi" / "api" / "c_api.h"
    major, minor = _define(c_api, "XLA_FFI_API_MAJOR"), _define(c_api, "XLA_FFI_API_MINOR")
    return f"{major}.{minor}"


def expected(kernel_abi: int) -> dict[str, object]:
    """The stamp fields a library must have to be loaded into this installation:
    the running jaxlib, ``kernel_abi`` (the loaded C kernel's), this module's
    :data:`FFI_ABI_VERSION` and (when the source is present) the source's sha256."""
    out: dict[str, object] = {"jaxlib": jaxlib_version(), "kernel_abi": int(kernel_abi),
                              "ffi_abi": FFI_ABI_VERSION}
    if SOURCE.is_file():
        out["source_sha256"] = _sha256(SOURCE)
    return out


# --------------------------------------------------------------------------- places

def installed_path() -> Path:
    """Where ``pip install`` puts the wrapper (``fp8core_jax/_fp8q_xla.so``)."""
    return _HERE / INSTALLED_NAME


def cache_dir() -> Path:
    """``$FP8CORE_CACHE``, else ``$XDG_CACHE_HOME/fp8core``, else ``~/.cache/fp8core``."""
    if os.environ.get("FP8CORE_CACHE", "").strip():
        return Path(os.environ["FP8CORE_CACHE"].strip())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fp8core"


def cache_path(cmd: list[str], kernel_abi: int) -> Path:
    """The cache entry for a build by compiler ``cmd``: keyed by the source, the jaxlib
    version, the compiler (:func:`_compiler_identity`), both ABIs and the platform."""
    src = SOURCE.read_bytes() if SOURCE.is_file() else b""
    key = "\0".join([hashlib.sha256(src).hexdigest(), str(jaxlib_version()), _compiler_identity(cmd),
                     str(kernel_abi), str(FFI_ABI_VERSION), sys.platform, platform.machine()])
    return cache_dir() / f"fp8q_xla-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def stamp_path(lib: Path) -> Path:
    return lib.with_name(lib.name + STAMP_SUFFIX)


def read_stamp(lib: Path) -> dict | None:
    """The stamp of ``lib``, or None when it is missing or unreadable."""
    try:
        stamp = json.loads(stamp_path(lib).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


# --------------------------------------------------------------------------- build and check

def compile_library(out: Path, cmd: list[str] | None = None, *, timeout: float = TIMEOUT) -> dict:
    """Compile fp8q_xla.cc into ``out`` and write its stamp; return the stamp.

    The library is written to a temporary file in ``out``'s directory and moved into
    place atomically (a concurrent reader sees the old or the new file, never half a
    file). ``cmd``: the compiler (default :func:`split_compiler`).

    Raises:
        BuildError: no compiler, no headers, a kernel/wrapper ABI disagreement, the
            compile failed or timed out, or ``out``'s directory is not writable.
    """
    cmd = split_compiler() if cmd is None else cmd
    inc = include_dir()
    kernel_abi = _define(SOURCE, "FP8Q_XLA_KERNEL_ABI")
    ffi_abi = _define(SOURCE, "FP8Q_XLA_ABI_VERSION")
    c_abi = _define(KERNEL_SOURCE, "FP8Q_ABI_VERSION")
    if ffi_abi != FFI_ABI_VERSION:
        raise BuildError(f"{SOURCE} has FP8Q_XLA_ABI_VERSION {ffi_abi}, fp8core_jax expects "
                         f"{FFI_ABI_VERSION}")
    if c_abi is not None and kernel_abi != c_abi:
        raise BuildError(f"{SOURCE} declares the C kernel ABI {kernel_abi} but {KERNEL_SOURCE} is "
                         f"ABI {c_abi}: update fp8q_xla.cc's copy of fp8q_format and the signatures")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write to {out.parent}: {e}") from None
    argv = [*cmd, "-O2", "-std=c++17", "-fPIC", "-shared", "-w", f"-I{inc}", str(SOURCE), "-o", tmp]
    try:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BuildError(f"{shlex.join(argv)} took more than {timeout} s") from None
        except OSError as e:
            raise BuildError(f"{shlex.join(argv)} could not run: {e}") from None
        if proc.returncode != 0:
            raise BuildError(f"{shlex.join(argv)} failed:\n{proc.stderr[-2000:]}")
        lib = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(lib, 0o755 & ~umask)  # mkstemp made it 0600: readable by every user, like a module
        stamp = {"ffi_abi": ffi_abi, "kernel_abi": kernel_abi, "jaxlib": jaxlib_version(),
                 "xla_ffi_api": _ffi_api_version(inc), "compiler": _compiler_version(cmd),
                 "compiler_cmd": cmd, "source_sha256": _sha256(SOURCE),
                 "platform": f"{sys.platform}-{platform.machine()}",
                 "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "size": lib.stat().st_size, "sha256": _sha256(lib)}
        stamp_tmp = Path(tmp + STAMP_SUFFIX)
        stamp_tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.chmod(stamp_tmp, 0o644 & ~umask)
        os.replace(stamp_tmp, stamp_path(out))
        os.replace(tmp, out)
        return stamp
    except OSError as e:
        raise BuildError(f"cannot write {out}: {e}") from None
    finally:
        for leftover in (tmp, tmp + STAMP_SUFFIX):
            if os.path.exists(leftover):
                os.unlink(leftover)


class CheckFailed(Exception):
    """A library that must not be loaded. ``integrity``: the file itself is damaged
    (size or sha256 differ from its stamp), not merely built for something else."""

    def __init__(self, message: str, *, integrity: bool = False):
        super().__init__(message)
        self.integrity = integrity


def check(lib: Path, want: dict[str, object]) -> dict:
    """The stamp of ``lib`` if it may be loaded here; ``want``: :func:`expected`.

    Raises:
        CheckFailed: the library or its stamp is missing, the stamp disagrees with
            ``want``, or the file's size or sha256 is not the stamp's.
    """
    if not lib.is_file():
        raise CheckFailed(f"{lib} does not exist")
    stamp = read_stamp(lib)
    if stamp is None:
        raise CheckFailed(f"{lib} has no readable stamp {stamp_path(lib).name}")
    for field, value in want.items():
        if stamp.get(field) != value:
            raise CheckFailed(f"{lib} was built for {field}={stamp.get(field)!r}, this installation "
                              f"has {value!r}")
    try:
        size = lib.stat().st_size
        digest = _sha256(lib) if size == stamp.get("size") else None
    except OSError as e:
        raise CheckFailed(f"{lib} cannot be read: {e}") from None
    if size != stamp.get("size"):
        raise CheckFailed(f"{lib} is {size} bytes, its stamp says {stamp.get('size')} (truncated or "
                          f"replaced)", integrity=True)
    if digest != stamp.get("sha256"):
        raise CheckFailed(f"{lib}'s sha256 is not its stamp's (damaged or replaced)", integrity=True)
    return stamp


def cached_candidates(kernel_abi: int) -> list[Path]:
    """Cache entries, the one for the current compiler first (when there is one), then
    any other entry whose stamp names the running jaxlib (usable without a compiler)."""
    out = []
    try:
        out.append(cache_path(split_compiler(), kernel_abi))
    except (BuildError, OSError):
        pass
    want_jaxlib = jaxlib_version()
    try:
        others = sorted(cache_dir().glob("fp8q_xla-*.so"))
    except OSError:
        others = []
    for p in others:
        if p not in out and (read_stamp(p) or {}).get("jaxlib") == want_jaxlib:
            out.append(p)
    return out
