"""Weight transfer between PyTorch state dicts and NNX models — numpy only.

This module never imports torch: state dicts are mappings ``name → array``
(numpy arrays, or anything ``np.asarray`` accepts; convert torch tensors with
``{k: v.detach().float().numpy() for k, v in sd.items()}``).

Layers and their torch names (``p`` = the layer's torch prefix, below):

=====================================================  ======================================
NNX layer                                              torch keys (values)
=====================================================  ======================================
``nnx.Linear``, ``LinearFP8`` (Mixed / Global)         ``p.weight = kernel.T`` (out, in),
                                                       ``p.bias``
same, torch side a transformers ``Conv1D``             ``p.weight = kernel`` (in, out) — no
(prefix listed in ``conv1d=``)                         transpose — and ``p.bias``
``nnx.LinearGeneral`` (trailing axes, no batch_axis),  ``p.weight = kernel.reshape(K, N).T``,
``LinearGeneralFP8`` (e.g. MultiHeadAttention's        ``p.bias = bias.reshape(N)`` (an
query/key/value/out)                                   ``nn.Linear(K, N)``)
``nnx.Embed``                                          ``p.weight = embedding``
``nnx.LayerNorm``                                      ``p.weight = scale``, ``p.bias = bias``
``nnx.RMSNorm``                                        ``p.weight = scale``
=====================================================  ======================================

Naming rule (the only one): a layer at NNX attribute path ``p`` has the torch prefix
``".".join(p)`` with every ``layers`` component that is the layer list of an
``nnx.Sequential`` removed, because torch's ``nn.Sequential`` names its children
``"0"``, ``"1"``, …. Examples:

====================================  ===========================
NNX path                              torch keys
====================================  ===========================
``nnx.Sequential`` → ``layers.0``     ``0.weight``, ``0.bias``
``self.layers = nnx.List`` → ``layers.0``  ``layers.0.weight``, ...
``self.proj`` → ``proj``              ``proj.weight``, ``proj.bias``
``self.net`` (Sequential) → ``net.layers.2``  ``net.2.weight``, ...
the model itself is a layer           ``weight``, ``bias``
====================================  ===========================

Loading also accepts the raw NNX path (``layers.0.weight`` for a Sequential). Values
are cast to the parameter's dtype. An NNX parameter of any other module (``nnx.Einsum``,
``nnx.Conv``, …) has no torch name: it is reported as missing (by its NNX path).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp8core_jax.nn import LinearFP8, LinearGeneralFP8, _general_convertible

__all__ = ["LoadResult", "torch_names", "load_linear_state_dict", "load_state_dict",
           "to_state_dict"]

_LINEAR_TYPES = (nnx.Linear, LinearFP8)  # LinearFP8Mixed / LinearFP8Global are LinearFP8s


class LoadResult(NamedTuple):
    """What :func:`load_state_dict` did not load (torch's ``load_state_dict`` result).

    Attributes:
      missing_keys: torch keys the NNX model expects but the state dict lacks, then the
        NNX paths of parameters that have no torch name (their module has no mapping).
      unexpected_keys: state dict keys that no NNX parameter took.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


def _kind(module: nnx.Module) -> str | None:
    """The mapping a module follows (the table above), or None."""
    if isinstance(module, _LINEAR_TYPES):
        return "linear"
    if isinstance(module, LinearGeneralFP8) or (isinstance(module, nnx.LinearGeneral)
                                                and _general_convertible(module)):
        return "general"
    if isinstance(module, nnx.Embed):
        return "embed"
    if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)):
        return "norm"
    return None


def _layers(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module, str]]:
    if _kind(model) is not None:
        return [((), model, _kind(model))]
    return [(p, m, _kind(m)) for p, m in nnx.iter_modules(model) if p and _kind(m) is not None]


def _linears(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    return [(p, m) for p, m, k in _layers(model) if k == "linear"]


def _torch_prefix(model: nnx.Module, path: tuple[Any, ...]) -> str:
    parts, node = [], model
    for key in path:
        is_seq_layers = isinstance(node, nnx.Sequential) and key == "layers"
        node = node[key] if isinstance(key, int) else getattr(node, key)
        if not is_seq_layers:
            parts.append(str(key))
    return ".".join(parts)


def torch_names(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """``{torch prefix: NNX path}`` for every layer of ``model`` that has a torch
    equivalent (linear, LinearGeneral, embedding, norm; the rule above)."""
    return {_torch_prefix(model, p): tuple(map(str, p)) for p, _, _ in _layers(model)}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_conv1d(conv1d: Collection[str] | Callable[[str], bool], prefix: str) -> bool:
    return conv1d(prefix) if callable(conv1d) else prefix in conv1d


def _entries(layer: nnx.Module, kind: str, conv1d: bool) -> list[tuple[str, str, str]]:
    """(torch name, NNX attribute, layout) for one layer; layout says how torch stores it:
    ``"same"``, ``"t"`` (transposed) or ``"flat_t"`` (reshaped to (K, N), transposed) or
    ``"flat"`` (reshaped to (N,))."""
    if kind == "linear":
        out = [("weight", "kernel", "same" if conv1d else "t")]
        return out + ([("bias", "bias", "same")] if layer.bias is not None else [])
    if kind == "general":
        return [("weight", "kernel", "flat_t")] + (
            [("bias", "bias", "flat")] if layer.bias is not None else [])
    if kind == "embed":
        return [("weight", "embedding", "same")]
    out = [("weight", "scale", "same")] if getattr(layer, "scale", None) is not None else []
    return out + ([("bias", "bias", "same")] if getattr(layer, "bias", None) is not None else [])


def _torch_shape(shape: tuple[int, ...], layout: str, n_in: int) -> tuple[int, ...]:
    """The torch shape of an NNX parameter of ``shape`` stored with ``layout``."""
    if layout == "flat_t":
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if layout == "flat":
        return (math.prod(shape),)
    return shape[::-1] if layout == "t" else shape


def _to_torch(value: np.ndarray, layout: str, n_in: int) -> np.ndarray:
    if layout == "t":
        return np.ascontiguousarray(value.T)
    if layout == "flat_t":
        return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)
    if layout == "flat":
        return value.reshape(-1).copy()
    return value.copy()


def _check_shape(param: nnx.Param, value: Any, key: str, layout: str, n_in: int,
                 conv1d_hint: bool) -> None:
    got, shape = tuple(np.shape(value)), tuple(param[...].shape)
    expected = _torch_shape(shape, layout, n_in)
    if got != expected:
        hint = (" (a transformers Conv1D stores (in, out): list its prefix in conv1d=)"
                if conv1d_hint and layout == "t" and got == shape else "")
        raise ValueError(f"{key}: expected shape {expected}, got {got}{hint}")


def _set(param: nnx.Param, value: Any, layout: str) -> None:
    arr = np.asarray(value)
    shape = tuple(param[...].shape)
    if layout == "t":
        arr = arr.T
    elif layout == "flat_t":
        arr = arr.T.reshape(shape)
    elif layout == "flat":
        arr = arr.reshape(shape)
    param[...] = jnp.asarray(arr, dtype=param[...].dtype)


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


def _plan(model: nnx.Module, keys: Collection[str], conv1d) -> tuple[list, list[str], list[str]]:
    """(loads, missing (annotated), unmapped NNX paths)."""
    loads, missing, covered = [], [], set()
    for path, layer, kind in _layers(model):
        canonical = _torch_prefix(model, path)
        raw = ".".join(map(str, path))
        entries = _entries(layer, kind, _is_conv1d(conv1d, canonical))
        first = entries[0][0] if entries else "weight"
        prefix = next((p for p in dict.fromkeys((canonical, raw)) if _key(p, first) in keys),
                      canonical)
        n_in = len(layer.in_features) if kind == "general" else 1
        for name, attr, layout in entries:
            covered.add(path + (attr,))
            k = _key(prefix, name)
            if k in keys:
                loads.append((getattr(layer, attr), k, layout, n_in, kind == "linear"))
            else:
                missing.append(f"{k} (NNX {_key(raw, attr) if raw else '<model>.' + attr})")
    unmapped = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
                if tuple(p) not in covered]
    return loads, missing, unmapped


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True,
                    conv1d: Collection[str] | Callable[[str], bool] = ()) -> LoadResult:
    """Load a torch model's state dict into an NNX model, in place (the table and naming
    rule of this module's docstring).

    Args:
      model: the NNX model (or one layer).
      state_dict: ``{torch key: array}``.
      strict: True (default): every NNX parameter must be loaded and every key used,
        else ``ValueError`` before anything is written. False: load what matches and
        return what did not.
      conv1d: torch prefixes (or a predicate on the prefix) whose module is a
        transformers ``Conv1D`` (GPT-2 family): weight (in, out), loaded without transpose.

    Returns:
      :class:`LoadResult` ``(missing_keys, unexpected_keys)`` (both empty when strict).

    Raises:
      ValueError: with ``strict``, unmatched keys (the message lists the missing torch
        keys with the NNX parameter each would fill, NNX parameters without a torch
        name, and the unexpected keys); shape mismatches (always).
      TypeError: ``model`` is not an nnx.Module.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    keys = set(state_dict)
    loads, missing, unmapped = _plan(model, keys, conv1d)
    unexpected = sorted(keys - {k for _, k, _, _, _ in loads})
    if strict and (missing or unmapped or unexpected):
        nomap = (f"; NNX parameters with no torch name: {unmapped}" if unmapped else "")
        raise ValueError(
            "state dict does not match the NNX model: "
            f"missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}{nomap}"
        )
    for param, k, layout, n_in, is_linear in loads:  # shapes first, so nothing half-loads
        _check_shape(param, state_dict[k], k, layout, n_in, conv1d_hint=is_linear)
    for param, k, layout, _, _ in loads:
        _set(param, state_dict[k], layout)
    return LoadResult([m.split(" (NNX ")[0] for m in missing] + unmapped, unexpected)


def to_state_dict(model: nnx.Module, *, conv1d: Collection[str] | Callable[[str], bool] = ()
                  ) -> dict[str, np.ndarray]:
    """The torch-style state dict (contiguous numpy arrays) of ``model``'s layers that have
    a torch equivalent (the table above; linear weights ``kernel.T`` (out, in), or
    ``kernel`` (in, out) for the prefixes in ``conv1d``). Parameters of other modules
    are not included."""
    out: dict[str, np.ndarray] = {}
    for path, layer, kind in _layers(model):
        prefix = _torch_prefix(model, path)
        n_in = len(layer.in_features) if kind == "general" else 1
        for name, attr, layout in _entries(layer, kind, _is_conv1d(conv1d, prefix)):
            out[_key(prefix, name)] = _to_torch(np.asarray(getattr(layer, attr)[...]), layout, n_in)
    return out
