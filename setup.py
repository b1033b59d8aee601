"""Build of fp8core's C kernel; all metadata is in pyproject.toml.

``fp8core._fp8q`` is the fused CPU quantizer (plain C; ``fp8core/_kernel.py`` calls
it through ctypes). It is optional: without a C compiler the install still
succeeds and every quantizer takes its framework path (same bits, slower).
OpenMP is used when the compiler has it (torch's thread pool is libgomp, and the
kernel's OpenMP team then shares it); otherwise the kernel is built with POSIX
threads only. Never build it with -ffast-math: the contract's float32 operation
sequence must be compiled as written (no reassociation, no FMA contraction;
docs/numerics.md §8).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

UNIX = sys.platform != "win32"
CFLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-pthread"]
OPENMP = ["-fopenmp"]


class BuildExt(build_ext):
    """Try with OpenMP first, then without (a compiler without an OpenMP runtime)."""

    def build_extension(self, ext):
        if not UNIX:
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compile/link failure: retry without OpenMP
            print(f"fp8core: building {ext.name} with OpenMP failed ({e}); retrying without")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
            return super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "fp8core._fp8q",
            sources=["fp8core/csrc/fp8q.c", "fp8core/csrc/module.c"],
            extra_compile_args=CFLAGS + OPENMP if UNIX else ["/O2", "/fp:precise"],
            extra_link_args=["-pthread"] + OPENMP if UNIX else [],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
