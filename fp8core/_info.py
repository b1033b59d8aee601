"""``fp8core.info()`` / ``python -m fp8core``: versions, the C kernel, the environment
switches and which path each framework takes for CPU tensors, and why.

numpy only: versions come from package metadata, and a framework's state is read
only when it is installed (JAX: ``fp8core_jax._ffi`` is imported to see whether its
FFI wrapper loads — never built from here; torch is not imported at all, its path
is decided by the C kernel alone).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

from fp8core import _env, _kernel

__all__ = ["info", "format_info"]

_PACKAGES = ("numpy", "ml_dtypes", "torch", "jax", "jaxlib", "flax")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _x86_level(flags: set[str]) -> str | None:
    """The x86-64 micro-architecture level of this CPU (what the kernel's
    ``target_clones`` resolver picks), from /proc/cpuinfo; None when unknown."""
    if not flags:
        return None
    v2 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}
    v3 = v2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    for name, need in (("x86-64-v4", v4), ("x86-64-v3", v3), ("x86-64-v2", v2)):
        if need <= flags:
            return name
    return "x86-64"


def _kernel_info() -> dict[str, object]:
    spec = importlib.util.find_spec("fp8core._fp8q")
    path = spec.origin if spec is not None else None
    out: dict[str, object] = {"built": _kernel._LIB is not None, "path": path,
                              "abi": int(_kernel._LIB.fp8q_abi_version()) if _kernel._LIB else None,
                              "expected_abi": _kernel.ABI_VERSION, "enabled": bool(_kernel.ENABLED),
                              "threads": None, "isa": None}
    if path is None:
        out["reason"] = "fp8core._fp8q is not built (no C compiler at install time): reinstall with one"
        return out
    if _kernel._LIB is None:
        out["reason"] = (f"{path} is a stale build (another ABI than {_kernel.ABI_VERSION}): "
                         f"reinstall fp8core")
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return out
    # knowable from the binary: a libgomp dependency, and gcc's target_clones variants
    out["threads"] = ("OpenMP (libgomp) when the caller asks (torch), else POSIX threads"
                      if b"libgomp" in blob or b"GOMP_parallel" in blob else "POSIX threads only")
    clones = [lv for lv in ("x86-64-v4", "x86-64-v3") if lv.replace("-", "_").encode() in blob]
    machine = platform.machine()
    if clones:
        level = _x86_level(_cpu_flags())
        picked = next((c for c in clones if level and level >= c), "default") if level else "unknown"
        out["isa"] = f"target_clones {'/'.join(clones + ['default'])}; this CPU runs {picked}"
    else:
        out["isa"] = f"single {machine} build (no target_clones)"
    return out


def _torch_path(kernel: dict) -> dict[str, object]:
    if _version("torch") is None:
        return {"installed": False, "cpu": None, "reason": "torch is not installed"}
    if _kernel.available():
        return {"installed": True, "cpu": "kernel",
                "reason": "fp8core's C kernel (native codebooks, f32/f16/bf16; table codebooks "
                          "take torch ops)"}
    why = kernel.get("reason") if not kernel["built"] else "disabled by FP8CORE_KERNEL / _kernel.ENABLED"
    return {"installed": True, "cpu": "torch-ops", "reason": why}


def _jax_path() -> dict[str, object]:
    if _version("jax") is None or importlib.util.find_spec("jax") is None:
        return {"installed": False, "cpu": None, "reason": "jax is not installed"}
    try:
        from fp8core_jax import _ffi  # imports jax: only here, only when installed
        st = _ffi.status()
    except Exception as e:  # noqa: BLE001 - report, never fail
        return {"installed": True, "cpu": "xla", "library": None, "origin": None,
                "reason": f"fp8core_jax could not be imported: {type(e).__name__}: {e}"}
    return {"installed": True, "cpu": "ffi" if st["active"] else "xla", "library": st["path"],
            "origin": st["origin"], "reason": st["reason"]}


def info() -> dict[str, object]:
    """What fp8core will run here, as a dict (``python -m fp8core`` prints it).

    Keys: ``fp8core`` (version), ``python``, ``platform``, ``versions`` (numpy,
    ml_dtypes, torch, jax, jaxlib, flax: None when not installed), ``kernel`` (the
    C kernel: ``built``, ``path``, ``abi``, ``expected_abi``, ``enabled``,
    ``threads``, ``isa``, ``reason`` when not usable), ``env`` (each ``FP8CORE_*``
    switch: raw and parsed value, what it does) and ``paths``: per framework the
    path for CPU tensors — torch ``"kernel"`` or ``"torch-ops"``, JAX ``"ffi"`` (with
    the FFI ``library`` and its ``origin``: installed / cache) or ``"xla"`` — with
    the ``reason``; ``stochastic_rounding``: the path of ``rounding="stochastic"``
    operands per framework (the ``paths`` entry: the kernel rounds stochastically too).
    Importing torch or jax is never needed; JAX's FFI wrapper is
    loaded if usable but never compiled here.
    """
    from fp8core import __version__

    kernel = _kernel_info()
    paths = {"torch": _torch_path(kernel), "jax": _jax_path()}
    return {
        "fp8core": __version__,
        "python": sys.version.split()[0],
        "platform": f"{sys.platform} {platform.machine()}",
        "versions": {name: _version(name) for name in _PACKAGES},
        "kernel": kernel,
        "env": _env.describe(),
        "paths": paths,
        "stochastic_rounding": _stochastic_paths(paths),
    }


def _stochastic_paths(paths: dict) -> dict[str, object]:
    """Where ``rounding="stochastic"`` (docs/numerics.md §14) runs on CPU: the path of
    ``paths`` — the C kernel computes the generator in its loop (fp8q_quantize_sr & co.,
    the FFI wrapper's stochastic custom calls) — except a JAX operand with a given absmax
    (§10.2), which takes XLA ops."""
    return {"torch": paths["torch"]["cpu"], "jax": paths["jax"]["cpu"],
            "reason": "same path as nearest rounding (the kernel computes the generator in its "
                      "loop; JAX with a given absmax: XLA ops); every path gives the same bits"}


def format_info(d: dict[str, object]) -> str:
    """:func:`info` as readable text."""
    v = d["versions"]
    k = d["kernel"]
    lines = [f"fp8core {d['fp8core']} (python {d['python']}, {d['platform']})",
             "versions: " + " | ".join(f"{n} {v[n] or '-'}" for n in _PACKAGES)]
    if k["built"]:
        lines.append(f"C kernel: built, ABI {k['abi']}, {'enabled' if k['enabled'] else 'DISABLED'}"
                     f" — {k['path']}")
        lines.append(f"  threads: {k['threads']}; ISA: {k['isa']}")
    else:
        lines.append(f"C kernel: NOT usable — {k.get('reason')}")
    lines.append("environment:")
    for name, e in d["env"].items():
        raw = "(unset)" if e["raw"] is None else repr(e["raw"])
        lines.append(f"  {name} = {raw} -> {e['value']!r}   ({e['doc']})")
    lines.append("active path for CPU tensors:")
    for fw, p in d["paths"].items():
        if not p["installed"]:
            lines.append(f"  {fw}: not installed")
            continue
        line = f"  {fw}: {p['cpu']}"
        if p.get("library"):
            line += f" — {p['library']} ({p['origin']})"
        if p.get("reason"):
            line += f" — {p['reason']}"
        lines.append(line)
    sr = d.get("stochastic_rounding")
    if sr:
        lines.append(f"rounding='stochastic': torch: {sr['torch']}, jax: {sr['jax']} — {sr['reason']}")
    return "\n".join(lines)
