"""Build of fp8core's C kernel; all metadata is in pyproject.toml.

``fp8core._fp8q`` is the fused CPU quantizer (plain C; ``fp8core/_kernel.py`` calls
it through ctypes). It is optional: without a C compiler the install still
succeeds and every quantizer takes its framework path (same bits, slower).
OpenMP is used when the compiler has it (torch's thread pool is libgomp, and the
kernel's OpenMP team then shares it); otherwise the kernel is built with POSIX
threads only. Never build it with -ffast-math: the contract's float32 operation
sequence must be compiled as written (no reassociation, no FMA contraction;
docs/numerics.md §8).

``fp8core_jax/_fp8q_xla.so`` is the JAX FFI wrapper of that kernel
(``fp8core/csrc/fp8q_xla.cc``), compiled with the C++ compiler (``$CXX``, shell-split,
else ``c++``/``g++``) against jaxlib's XLA FFI headers when jaxlib is importable in
the build environment (pyproject.toml lists it as a build requirement on the
platforms jaxlib has wheels for; with ``--no-build-isolation`` the environment's
own jaxlib is used). It is stamped (``_fp8q_xla.so.json``: jaxlib version, compiler,
both ABI versions, size and sha256) by ``fp8core_jax/_build.py``, the same code that
``python -m fp8core_jax.build`` and the run-time loader use; also optional: without
jaxlib or a C++ compiler the install succeeds and the wrapper is built on demand
(or the XLA path runs).
"""

import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

UNIX = sys.platform != "win32"
CFLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-pthread"]
OPENMP = ["-fopenmp"]


FFI_EXT = "fp8core_jax._fp8q_xla"


def _ffi_build_module():
    """fp8core_jax/_build.py, loaded by path (importing fp8core_jax would import jax)."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_fp8core_ffi_build",
                                                  os.path.join(here, "fp8core_jax", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildExt(build_ext):
    """fp8core._fp8q: try with OpenMP first, then without (a compiler without an OpenMP
    runtime). fp8core_jax._fp8q_xla: compiled and stamped by fp8core_jax/_build.py."""

    def get_ext_filename(self, fullname):
        name = super().get_ext_filename(fullname)
        if fullname.split(".")[-1] == FFI_EXT.split(".")[-1]:  # a plain library (ctypes), no module
            return os.path.join(os.path.dirname(name), "_fp8q_xla.so")
        return name

    def get_outputs(self):
        outs = super().get_outputs()
        return outs + [o + ".json" for o in outs if o.endswith("_fp8q_xla.so")]

    def copy_extensions_to_source(self):  # editable installs: the stamp goes with the library
        super().copy_extensions_to_source()
        for ext in self.extensions:
            if ext.name == FFI_EXT:
                inplace, built = self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)
                if os.path.exists(built + ".json"):
                    self.copy_file(built + ".json", inplace + ".json", level=self.verbose)

    def build_extension(self, ext):
        if ext.name == FFI_EXT:
            return self._build_ffi(ext)
        if not UNIX:
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compile/link failure: retry without OpenMP
            print(f"fp8core: building {ext.name} with OpenMP failed ({e}); retrying without")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
            return super().build_extension(ext)

    def _build_ffi(self, ext):
        from pathlib import Path

        out = Path(self.get_ext_fullpath(ext.name))
        try:
            build = _ffi_build_module()
            stamp = build.compile_library(out)
        except Exception as e:  # noqa: BLE001 - optional: no jaxlib, no compiler, a failed compile
            print(f"fp8core: not building the JAX FFI wrapper {ext.name} ({e}); fp8core_jax will "
                  f"build it on first use outside a trace or use its XLA path "
                  f"(`python -m fp8core_jax.build` builds it)")
            return
        print(f"fp8core: built {out} for jaxlib {stamp['jaxlib']} with {stamp['compiler']}")


setup(
    ext_modules=[
        Extension(
            "fp8core._fp8q",
            sources=["fp8core/csrc/fp8q.c", "fp8core/csrc/module.c"],
            extra_compile_args=CFLAGS + OPENMP if UNIX else ["/O2", "/fp:precise"],
            extra_link_args=["-pthread"] + OPENMP if UNIX else [],
            optional=True,
        )
    ] + ([Extension(FFI_EXT, sources=["fp8core/csrc/fp8q_xla.cc"], optional=True)] if UNIX else []),
    cmdclass={"build_ext": BuildExt},
)
