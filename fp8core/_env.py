"""fp8core's environment switches, parsed in one place.

Every ``FP8CORE_*`` variable is read through :func:`flag` (booleans) or
:func:`path` (directories), so the accepted spellings and the error for a bad
value are the same everywhere. :data:`VARIABLES` lists them with what they do
(``python -m fp8core`` prints their parsed values).
"""

from __future__ import annotations

import os

__all__ = ["TRUE", "FALSE", "VARIABLES", "flag", "path", "describe"]

#: Spellings of true and false (compared case-insensitively, surrounding spaces ignored).
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

#: name -> (kind, default, what it does)
VARIABLES: dict[str, tuple[str, object, str]] = {
    "FP8CORE_KERNEL": ("flag", True, "use fp8core's C kernel (torch) and its JAX FFI wrapper on CPU"),
    "FP8CORE_CACHE": ("path", None, "directory of JAX FFI wrappers built at run time "
                                    "(default $XDG_CACHE_HOME/fp8core, else ~/.cache/fp8core)"),
    "CXX": ("command", None, "C++ compiler for `python -m fp8core_jax.build` (default c++, else g++)"),
}


def flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name`` (``default`` when unset or empty).

    Accepts ``1/0``, ``true/false``, ``yes/no``, ``on/off`` in any case.

    Raises:
        ValueError: any other value, naming the variable, the value and the spellings.
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return bool(default)
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean: use one of "
                     f"{', '.join(TRUE)} (true) or {', '.join(FALSE)} (false), in any case")


def path(name: str) -> str | None:
    """The directory named by environment variable ``name``, or None when unset or empty."""
    raw = os.environ.get(name, "").strip()
    return raw or None


def describe() -> dict[str, dict[str, object]]:
    """Each variable of :data:`VARIABLES`: its raw value, its parsed value (or the
    error message for a bad one) and what it does."""
    out: dict[str, dict[str, object]] = {}
    for name, (kind, default, doc) in VARIABLES.items():
        raw = os.environ.get(name)
        try:
            parsed = flag(name, bool(default)) if kind == "flag" else (raw.strip() or None if raw else None)
        except ValueError as e:
            parsed = f"invalid: {e}"
        out[name] = {"raw": raw, "value": parsed, "default": default, "doc": doc}
    return out
