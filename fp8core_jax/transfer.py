"""Weight transfer between PyTorch state dicts and NNX models — numpy only.

This module never imports torch: state dicts are mappings ``name → array``
(numpy arrays, or anything ``np.asarray`` accepts; convert torch tensors with
``{k: v.detach().float().numpy() for k, v in sd.items()}``).

Naming rule (the only one): a linear layer (``nnx.Linear``,
``LinearFP8Mixed``, ``LinearFP8Global``) at NNX attribute path ``p`` has the
torch prefix ``".".join(p)`` with every ``layers`` component that is the layer
list of an ``nnx.Sequential`` removed, because torch's ``nn.Sequential`` names
its children ``"0"``, ``"1"``, …. Examples:

====================================  ===========================
NNX path                              torch keys
====================================  ===========================
``nnx.Sequential`` → ``layers.0``     ``0.weight``, ``0.bias``
``self.layers = nnx.List`` → ``layers.0``  ``layers.0.weight``, ...
``self.proj`` → ``proj``              ``proj.weight``, ``proj.bias``
``self.net`` (Sequential) → ``net.layers.2``  ``net.2.weight``, ...
the model itself is a linear layer    ``weight``, ``bias``
====================================  ===========================

Loading also accepts the raw NNX path (``layers.0.weight`` for a Sequential).
Values: ``kernel = weight.T`` (torch stores ``(out, in)``, NNX ``(in, out)``),
``bias = bias``, cast to the parameter's dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp8core_jax.nn import LinearFP8

__all__ = ["torch_names", "load_linear_state_dict", "load_state_dict", "to_state_dict"]

_LINEAR_TYPES = (nnx.Linear, LinearFP8)  # LinearFP8Mixed / LinearFP8Global are LinearFP8s


def _linears(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    if isinstance(model, _LINEAR_TYPES):
        return [((), model)]
    return [(p, m) for p, m in nnx.iter_modules(model) if p and isinstance(m, _LINEAR_TYPES)]


def _torch_prefix(model: nnx.Module, path: tuple[Any, ...]) -> str:
    parts, node = [], model
    for key in path:
        is_seq_layers = isinstance(node, nnx.Sequential) and key == "layers"
        node = node[key] if isinstance(key, int) else getattr(node, key)
        if not is_seq_layers:
            parts.append(str(key))
    return ".".join(parts)


def torch_names(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """``{torch prefix: NNX path}`` for every linear layer of ``model`` (the rule above)."""
    return {_torch_prefix(model, p): tuple(map(str, p)) for p, _ in _linears(model)}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set(param: nnx.Param, value: Any, key: str, transpose: bool = False) -> None:
    arr = np.asarray(value)
    shape = tuple(param[...].shape)
    expected = shape[::-1] if transpose else shape  # torch's (out, in) for weights
    if arr.shape != expected:
        raise ValueError(f"{key}: expected shape {expected}, got {arr.shape}")
    param[...] = jnp.asarray(arr.T if transpose else arr, dtype=param[...].dtype)


def load_linear_state_dict(module: nnx.Module, state_dict: Mapping[str, Any]) -> None:
    """Load a torch ``nn.Linear`` / ``LinearFP8*`` state dict (``weight`` (out, in),
    ``bias``) into one NNX linear layer, in place: ``kernel = weight.T``.

    Raises:
      TypeError: ``module`` is not a linear layer.
      ValueError: missing/unexpected keys or wrong shapes (the message lists them).
    """
    if not isinstance(module, _LINEAR_TYPES):
        raise TypeError(f"module must be nnx.Linear or LinearFP8*, got {type(module).__name__}")
    load_state_dict(module, state_dict)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
    """Load a torch model's state dict into the linear layers of an NNX model, in place.

    Keys are matched by the naming rule of this module's docstring. With
    ``strict=True`` (default) every linear layer must be found and every key used.

    Raises:
      ValueError: unmatched keys (listing the state dict's unused keys and the
        NNX layers left without weights, with the keys they expected) or shape
        mismatches.
    """
    keys = set(state_dict)
    used: set[str] = set()
    missing: list[str] = []
    plan = []
    for path, layer in _linears(model):
        canonical = _torch_prefix(model, path)
        raw = ".".join(map(str, path))
        prefix = next((p for p in dict.fromkeys((canonical, raw)) if _key(p, "weight") in keys), None)
        if prefix is None:
            missing.append(f"{_key(canonical, 'weight')} (NNX {raw or '<model>'}.kernel)")
            continue
        names = ["weight"] + (["bias"] if layer.bias is not None else [])
        for n in names:
            if _key(prefix, n) not in keys:
                missing.append(f"{_key(prefix, n)} (NNX {raw or '<model>'}.{'kernel' if n == 'weight' else n})")
        plan.append((layer, prefix))
        used.update(_key(prefix, n) for n in names)
    unexpected = sorted(keys - used)
    if strict and (missing or unexpected):
        raise ValueError(
            "state dict does not match the NNX model: "
            f"missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}"
        )
    for layer, prefix in plan:
        w_key, b_key = _key(prefix, "weight"), _key(prefix, "bias")
        if w_key in keys:
            _set(layer.kernel, state_dict[w_key], w_key, transpose=True)
        if layer.bias is not None and b_key in keys:
            _set(layer.bias, state_dict[b_key], b_key)


def to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The torch-style state dict (numpy arrays) of ``model``'s linear layers:
    ``weight = kernel.T`` (contiguous, ``(out, in)``) and ``bias``."""
    out: dict[str, np.ndarray] = {}
    for path, layer in _linears(model):
        prefix = _torch_prefix(model, path)
        out[_key(prefix, "weight")] = np.ascontiguousarray(np.asarray(layer.kernel[...]).T)
        if layer.bias is not None:
            out[_key(prefix, "bias")] = np.asarray(layer.bias[...]).copy()
    return out
