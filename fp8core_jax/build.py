"""``python -m fp8core_jax.build``: rebuild or check fp8core's JAX FFI wrapper.

``python -m fp8core_jax.build`` rebuilds the wrapper of the C kernel
(``fp8core/csrc/fp8q_xla.cc``) for the running jaxlib into the cache directory
(``$FP8CORE_CACHE``, else ``$XDG_CACHE_HOME/fp8core``, else ``~/.cache/fp8core``)
and prints what it did; ``--in-place`` rebuilds the installed copy instead
(``fp8core_jax/_fp8q_xla.so``, what ``pip install`` builds when jaxlib's FFI headers
are available); ``--check`` only reports which library :mod:`fp8core_jax._ffi`
would load and why (exit 1 when none). Run it after changing jaxlib (the installed
copy is then stale and skipped) if you do not reinstall fp8core, or to build ahead
of a run whose first call is inside ``jax.jit`` (no compiler runs in a trace).
The compiler is ``$CXX`` split like a shell word list (``CXX="ccache g++"``), else
``c++``, else ``g++``. The build and check logic is in :mod:`fp8core_jax._build`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from fp8core_jax._build import (FFI_ABI_VERSION, SOURCE, BuildError, CheckFailed, cache_path,
                                cached_candidates, check, compile_library, expected, installed_path,
                                split_compiler, stamp_path)

__all__ = ["main"]


def _kernel_abi() -> int:
    from fp8core import _kernel  # numpy only

    return _kernel.ABI_VERSION


def main(argv: list[str] | None = None) -> int:
    """``python -m fp8core_jax.build [--check] [--in-place]``; returns the exit code
    (0 built / usable, 1 failed / unusable)."""
    parser = argparse.ArgumentParser(prog="python -m fp8core_jax.build", description=(
        "Rebuild fp8core's JAX FFI wrapper for the running jaxlib (into the cache, or "
        "--in-place into the installed package), or --check which library would be loaded."))
    parser.add_argument("--check", action="store_true", help="report only, build nothing")
    parser.add_argument("--in-place", action="store_true",
                        help=f"rebuild the installed copy ({installed_path()}) instead of the cache")
    args = parser.parse_args(argv)
    kernel_abi = _kernel_abi()
    want = expected(kernel_abi)
    print(f"fp8core_jax FFI wrapper: jaxlib {want['jaxlib']}, C kernel ABI {kernel_abi}, "
          f"FFI ABI {FFI_ABI_VERSION}, source {SOURCE}")
    if args.check:
        usable = None
        for lib in [installed_path(), *cached_candidates(kernel_abi)]:
            try:
                stamp = check(lib, want)
            except CheckFailed as e:
                print(f"  unusable: {e}")
            else:
                print(f"  usable:   {lib} (built {stamp.get('built')} by {stamp.get('compiler')})")
                usable = usable or lib
        print(f"would load: {usable}" if usable else
              "would load: nothing — the XLA path runs (same bits, slower); run "
              "`python -m fp8core_jax.build` to build")
        return 0 if usable else 1
    try:
        cmd = split_compiler()
        out = installed_path() if args.in_place else cache_path(cmd, kernel_abi)
        print(f"compiling with {shlex.join(cmd)} ...")
        t0 = time.perf_counter()
        stamp = compile_library(out, cmd)
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    print(f"built {out} ({stamp['size']} bytes, sha256 {stamp['sha256'][:16]}…, "
          f"{time.perf_counter() - t0:.1f} s) with {stamp['compiler']}; stamp {stamp_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
