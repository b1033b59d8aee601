"""Build of fp8core's C kernel; all metadata is in pyproject.toml.

``fp8core._fp8q`` is the fused CPU quantizer (plain C; ``fp8core/_kernel.py`` calls
it through ctypes). It is optional: without a C compiler the install still
succeeds and every quantizer takes its framework path (same bits, slower).
Never build it with -ffast-math: the contract's float32 operation sequence must be
compiled as written (no reassociation, no FMA contraction; docs/numerics.md).
"""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
setup(
    ext_modules=[
        Extension(
            "fp8core._fp8q",
            sources=["fp8core/csrc/fp8q.c", "fp8core/csrc/module.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math",
                                "-fno-trapping-math", "-pthread"] if unix else ["/O2", "/fp:precise"],
            extra_link_args=["-pthread"] if unix else [],
            optional=True,
        )
    ]
)
