"""Recipes: what a linear layer quantizes, GEMM by GEMM (docs/numerics.md §9).

A linear layer ``Y = X·Wᵀ`` (``matmul_fp8(A, B)`` with ``B = Wᵀ``) runs three GEMMs:

===========  ===================  =========================================
GEMM         product              operand slots (contraction axis)
===========  ===================  =========================================
fprop        ``Y  = X · Wᵀ``      ``input`` (X along K), ``weight`` (W along K)
dgrad        ``dX = dY · W``      ``grad_output`` (dY along N), ``weight_for_grad_input`` (W along N)
wgrad        ``dW = dYᵀ · X``     ``grad_output_for_grad_weight`` (dY along M), ``input_for_grad_weight`` (X along M)
===========  ===================  =========================================

Each slot holds an :class:`OperandRule` (element format, :class:`Granularity`,
scale rule), ``None`` (the operand stays in high precision) or :data:`REUSE` (a
backward slot uses the quantized value another slot already computed for the same
tensor — bitsandbytes' Mixed reuses the forward's Q(W) in dgrad). Granularities are
relative to the operand *as it enters its GEMM*: the operand is viewed as a 2-D
matrix whose last axis is the contraction axis (``rows × contraction``), so
``axiswise`` is one scale per token for X in fprop and one per output channel for W.

Everything here is numpy-free plain data: frozen, hashable, validated at
construction (errors name the field, the value and what is allowed), usable as
``ctx`` data in torch and as a static argument under ``jax.jit``. Backends execute
recipes; they never hard-code one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Union

import numpy as np

from fp8core import _validation
from fp8core import hadamard as _hadamard
from fp8core import mx as _mx
from fp8core import random as _random
from fp8core import nvfp4 as _nvfp4
from fp8core.codebooks import Codebook, resolve_codebook

__all__ = [
    "Granularity",
    "tensor",
    "axiswise",
    "block",
    "tile",
    "flat",
    "SCALE_RULES",
    "ROUNDING_MODES",
    "OperandRule",
    "check_rule",
    "with_rounding",
    "nearest_rule",
    "REUSE",
    "LinearRecipe",
    "SLOTS",
    "PRESETS",
    "BNB_MIXED",
    "BNB_GLOBAL",
    "TENSORWISE",
    "ROWWISE",
    "ROWWISE_WITH_GW_HP",
    "BLOCKWISE_1x128",
    "MXFP8",
    "MXFP8_FLOOR",
    "MXFP4",
    "NVFP4",
    "get_recipe",
    "bnb_recipe",
    "conversion",
    "pow2_torchao_thresholds",
]

GRANULARITY_KINDS: tuple[str, ...] = ("tensor", "axiswise", "block", "tile", "flat")


@dataclasses.dataclass(frozen=True)
class Granularity:
    """Which elements of an operand share one scale.

    The operand is the 2-D matrix ``(rows, contraction)`` it is in its GEMM:

    * ``tensor``: one scale for the whole operand;
    * ``axiswise``: one scale per row (a slice along the contraction axis);
    * ``block(B)``: 1×B blocks along the contraction axis; the last block of a row
      may be partial (it is never padded into the next row);
    * ``tile(B)``: B×B 2-D tiles (for weights: the same tiles in both orientations);
    * ``flat(B)``: blocks of B consecutive elements of the row-major flattening
      (bitsandbytes' layers; a block may span rows). ``flat()`` (size ``None``)
      takes bitsandbytes' ``select_block_size(contraction size)``.

    Build with :func:`tensor`, :func:`axiswise`, :func:`block`, :func:`tile`, :func:`flat`.
    """

    __hash__ = _validation.cached_hash
    __getstate__ = _validation.state_without_hash

    kind: str
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRANULARITY_KINDS:
            raise ValueError(
                f"Granularity.kind must be one of {', '.join(GRANULARITY_KINDS)}, got {self.kind!r}"
            )
        if self.kind in ("tensor", "axiswise"):
            if self.size is not None:
                raise ValueError(f"Granularity {self.kind!r} takes no size, got size={self.size!r}")
        elif self.kind in ("block", "tile") or self.size is not None:
            _validation.check_blocksize(self.size, argname=f"{self.kind} size")

    @property
    def orientation_free(self) -> bool:
        """Whether the groups are the same in both orientations of a matrix (so an
        operand quantized along one axis equals it quantized along the other)."""
        return self.kind in ("tensor", "tile")

    def __str__(self) -> str:
        if self.kind in ("tensor", "axiswise"):
            return self.kind
        return f"{self.kind}({'' if self.size is None else self.size})"


def tensor() -> Granularity:
    """One scale for the whole operand."""
    return Granularity("tensor")


def axiswise() -> Granularity:
    """One scale per row of the operand as it enters its GEMM (per slice along K)."""
    return Granularity("axiswise")


def block(size: int) -> Granularity:
    """1×``size`` blocks along the contraction axis (the last block of a row may be partial)."""
    return Granularity("block", size)


def tile(size: int) -> Granularity:
    """``size``×``size`` 2-D tiles (partial at the bottom and right edges)."""
    return Granularity("tile", size)


def flat(size: int | None = None) -> Granularity:
    """Blocks of the row-major flattening (bitsandbytes); ``None``: ``select_block_size(K)``."""
    return Granularity("flat", size)


#: Scale rules (docs/numerics.md §3.3 and §9.2):
#: ``"fp32"``: ``qscale = fl(M / a)``, ``dscale = fl(a · fl(1/M))`` (the original contract);
#: ``"pow2"``: the largest power of two ≤ ``fl(M / a)``, exact (its exponent bits, as
#: TransformerEngine's block scaling); ``"pow2_torchao"``: ``2**floor(fl32(log2(fl(M / a))))``
#: as torchao 0.18's ``round_scales_to_power_of_2`` computes it (rounds *up* to the next
#: power of two for a scale within a few ulps below one). For both power-of-two rules
#: ``dscale = 1 / qscale`` exactly.
#: ``"mx_floor"``, ``"mx_ceil"``, ``"mx_even"``, ``"mx_rceil"``: OCP MX e8m0 block scales
#: under torchao 0.18's four ``ScaleCalculationMode`` rules (§11, :mod:`fp8core.mx`); MX
#: element formats and block / tile granularity only.
#: ``"nvfp4"``, ``"nvfp4_te"``: NVFP4 (§13.5, :mod:`fp8core.nvfp4`) — an e4m3 scale per
#: block from the block max and the tensor amax, torchao 0.18's and TransformerEngine's
#: chain; float4_e2m1fn elements, block(16) or tile(16) only.
SCALE_RULES: tuple[str, ...] = ("fp32", "pow2", "pow2_torchao", *_mx.MX_SCALE_RULES,
                                *_nvfp4.ENGINE_RULES)

#: Element rounding modes (§3.5 nearest, §14 stochastic).
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic")


@dataclasses.dataclass(frozen=True)
class OperandRule:
    """How one operand of one GEMM is quantized.

    Attributes:
      format: the element codebook (any name :func:`fp8core.resolve_codebook` takes —
        ``"e4m3"``, ``"e5m2"``, ``"bnb_e4m3"``, … — or a :class:`Codebook`); stored resolved.
      granularity: a :class:`Granularity` (default one scale per tensor).
      scale: one of :data:`SCALE_RULES` (default ``"fp32"``).
      rounding: ``"nearest"`` (default: §3.5, ties to even / to the lower table entry) or
        ``"stochastic"`` (§14: up with probability the distance to the lower neighbour in
        quanta, from ``sr_bits`` random bits of :mod:`fp8core.random`; native formats
        only; the quantizers then need a ``seed``).
      sr_bits: random bits per element for stochastic rounding, 1..23 (default 8, as
        Blackwell's ``cvt.rs``); ignored by ``"nearest"``.
    """

    __hash__ = _validation.cached_hash
    __getstate__ = _validation.state_without_hash

    format: Any
    granularity: Granularity = dataclasses.field(default_factory=tensor)
    scale: str = "fp32"
    rounding: str = "nearest"
    sr_bits: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.format, (OperandRule, LinearRecipe)):
            raise TypeError(
                f"OperandRule.format must be a codebook (format name or Codebook), "
                f"got a {type(self.format).__name__}"
            )
        cb = resolve_codebook(self.format, argname="OperandRule.format")
        object.__setattr__(self, "format", cb)
        if not isinstance(self.granularity, Granularity):
            raise TypeError(
                f"OperandRule.granularity must be a Granularity (fp8core.recipe.tensor(), "
                f"axiswise(), block(B), tile(B), flat(B)), got {type(self.granularity).__name__}: "
                f"{self.granularity!r}"
            )
        if self.scale not in SCALE_RULES:
            raise ValueError(
                f"OperandRule.scale must be one of {', '.join(SCALE_RULES)}, got {self.scale!r}"
            )
        if self.scale != "fp32" and not cb.is_native:
            raise ValueError(
                f"OperandRule.scale={self.scale!r} needs a native format, got the table "
                f"codebook {cb.name}; use scale='fp32' for tables"
            )
        if self.scale in _mx.MX_SCALE_RULES:
            _check_mx(cb, self.granularity, self.scale)
        if self.scale in _nvfp4.ENGINE_RULES:
            _nvfp4.check_engine_rule(cb.format.name, self.granularity, self.scale)
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"OperandRule.rounding must be one of {', '.join(ROUNDING_MODES)}, "
                             f"got {self.rounding!r}")
        object.__setattr__(self, "sr_bits", _random.check_sr_bits(self.sr_bits,
                                                                  "OperandRule.sr_bits"))
        if self.rounding == "stochastic" and not cb.is_native:
            raise ValueError(
                f"OperandRule.rounding='stochastic' needs a native format (its neighbours are "
                f"a quantum apart), got the table codebook {cb.name}")

    @property
    def is_stochastic(self) -> bool:
        """Whether elements are rounded stochastically (§14)."""
        return self.rounding == "stochastic"

    @property
    def is_mx(self) -> bool:
        """Whether the scale is an MX e8m0 block scale (§11)."""
        return self.scale in _mx.MX_SCALE_RULES

    @property
    def is_nvfp4(self) -> bool:
        """Whether the scale is an NVFP4 e4m3 block scale with a tensor scale (§13.5)."""
        return self.scale in _nvfp4.ENGINE_RULES

    @property
    def codebook(self) -> Codebook:
        return self.format

    def __str__(self) -> str:
        scale = "" if self.scale == "fp32" else f", {self.scale}"
        if self.rounding == "stochastic":
            scale += f", stochastic/{self.sr_bits}b"
        return f"{self.format.name}/{self.granularity}{scale}"


def _check_mx(cb: Codebook, granularity: Granularity, scale: str) -> None:
    if cb.format.name not in _mx.MX_ELEMENT_FORMATS:
        raise ValueError(
            f"OperandRule.scale={scale!r} is an MX block scale, but OperandRule.format is "
            f"{cb.name}; MX element formats: {', '.join(_mx.MX_ELEMENT_FORMATS)}")
    if granularity.kind not in ("block", "tile"):
        raise ValueError(
            f"OperandRule.scale={scale!r} is an MX block scale: granularity must be block(B) "
            f"(1×B along the contraction axis) or tile(B) (B×B, for weights), got {granularity}")
    unit = _mx.pack_unit(cb)
    if granularity.size % unit:
        raise ValueError(
            f"OperandRule.granularity={granularity}: an MX block of {cb.name} must hold a "
            f"positive multiple of {unit} elements (they pack {unit} to a whole number of "
            f"bytes), got {granularity.size}")


def with_rounding(rule: OperandRule, rounding: Any, sr_bits: Any = 8) -> OperandRule:
    """``rule`` with a quantizer's ``rounding=`` / ``sr_bits=`` keywords (§14), errors
    naming the keyword."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}")
    sr_bits = _random.check_sr_bits(sr_bits)
    if rounding == "nearest":
        return rule
    return dataclasses.replace(rule, rounding=rounding, sr_bits=sr_bits)


def nearest_rule(rule: OperandRule) -> OperandRule:
    """``rule`` with round-to-nearest (the absmax and scales of a stochastic rule are
    those of its nearest twin: rounding only moves codes)."""
    return rule if rule.rounding == "nearest" else dataclasses.replace(rule, rounding="nearest")


def check_rule(rule: Any, *, argname: str = "rule") -> OperandRule:
    """``rule`` itself if it is an :class:`OperandRule`; TypeError otherwise (every
    backend's operand quantizers raise this one message)."""
    if not isinstance(rule, OperandRule):
        raise TypeError(f"{argname} must be an fp8core.recipe.OperandRule, got "
                        f"{type(rule).__name__}: {rule!r}")
    return rule


#: A backward slot that reuses the quantized value another slot computed for the same
#: tensor: ``weight_for_grad_input`` ← ``weight``, ``input_for_grad_weight`` ← ``input``,
#: ``grad_output_for_grad_weight`` ← ``grad_output``.
REUSE = "reuse"

Slot = Union[OperandRule, None, str]

#: The six slots in GEMM order: fprop (X, W), dgrad (dY, W), wgrad (X, dY).
SLOTS: tuple[str, ...] = (
    "input", "weight",
    "grad_output", "weight_for_grad_input",
    "input_for_grad_weight", "grad_output_for_grad_weight",
)
#: Where a :data:`REUSE` slot takes its value from.
REUSE_SOURCE: dict[str, str] = {
    "weight_for_grad_input": "weight",
    "input_for_grad_weight": "input",
    "grad_output_for_grad_weight": "grad_output",
}
#: The operand each slot quantizes ("X", "W" or "dY") and the GEMM it belongs to.
SLOT_TENSOR: dict[str, str] = {
    "input": "X", "weight": "W", "grad_output": "dY", "weight_for_grad_input": "W",
    "input_for_grad_weight": "X", "grad_output_for_grad_weight": "dY",
}
SLOT_GEMM: dict[str, str] = {
    "input": "fprop", "weight": "fprop", "grad_output": "dgrad",
    "weight_for_grad_input": "dgrad", "input_for_grad_weight": "wgrad",
    "grad_output_for_grad_weight": "wgrad",
}


@dataclasses.dataclass(frozen=True)
class LinearRecipe:
    """The quantization of a linear layer's three GEMMs, slot by slot (see the module doc).

    Slots are :class:`OperandRule`, ``None`` (high precision) or :data:`REUSE`
    (backward slots only). ``name`` is for display.

    ``amax_reduction`` (docs/numerics.md §10.2): where the amax of every per-tensor
    (``tensor()``) slot is all-reduced (max) before its scale is formed, so the quantized
    operands do not depend on how the batch is split — a mesh axis name or a tuple of them
    in JAX (inside ``shard_map``), a ``torch.distributed`` process group in torch
    (e.g. ``torch.distributed.group.WORLD``). ``None`` (default): each process, device and
    micro-batch takes its own amax. The backend checks the kind it takes; here: a recipe
    with no per-tensor slot cannot reduce an amax (ValueError).

    ``wgrad_transform`` (docs/numerics.md §12): ``"rht16"`` rotates both wgrad operands
    (X and dY) along the tokens with TransformerEngine's 16-point random Hadamard
    transform before they are quantized (or used in high precision) — the product is
    unchanged, the quantization sees outliers spread over 16 tokens. Both wgrad slots are
    then computed from high precision (a :data:`REUSE` wgrad slot is a ValueError: the
    forward's value is not rotated). ``None`` (default): no transform.
    """

    __hash__ = _validation.cached_hash
    __getstate__ = _validation.state_without_hash

    input: Slot
    weight: Slot
    grad_output: Slot
    weight_for_grad_input: Slot = REUSE
    input_for_grad_weight: Slot = None
    grad_output_for_grad_weight: Slot = None
    name: str = "custom"
    amax_reduction: Any = None
    wgrad_transform: str | None = None

    def __post_init__(self) -> None:
        for slot in SLOTS:
            value = getattr(self, slot)
            if isinstance(value, LinearRecipe):
                raise TypeError(
                    f"LinearRecipe.{slot} must be an OperandRule, None or {REUSE!r}, got a LinearRecipe"
                )
            if isinstance(value, str) and value == REUSE:
                if slot not in REUSE_SOURCE:
                    raise ValueError(
                        f"LinearRecipe.{slot}={REUSE!r}: only the backward slots "
                        f"{', '.join(REUSE_SOURCE)} can reuse a quantized value"
                    )
                src = REUSE_SOURCE[slot]
                if not isinstance(getattr(self, src), OperandRule):
                    raise ValueError(
                        f"LinearRecipe.{slot}={REUSE!r} needs LinearRecipe.{src} to be an "
                        f"OperandRule, got {getattr(self, src)!r}"
                    )
            elif value is not None and not isinstance(value, OperandRule):
                raise TypeError(
                    f"LinearRecipe.{slot} must be an OperandRule, None or {REUSE!r}, "
                    f"got {type(value).__name__}: {value!r}"
                )
        for a, b, gemm in (("input", "weight", "fprop"),
                           ("grad_output", "weight_for_grad_input", "dgrad"),
                           ("input_for_grad_weight", "grad_output_for_grad_weight", "wgrad")):
            qa, qb = getattr(self, a) is not None, getattr(self, b) is not None
            if qa != qb:
                raise ValueError(
                    f"LinearRecipe: the {gemm} GEMM quantizes one operand and not the other "
                    f"({a}={getattr(self, a)!r}, {b}={getattr(self, b)!r}); quantize both or neither"
                )
        if not isinstance(self.name, str):
            raise TypeError(f"LinearRecipe.name must be a str, got {type(self.name).__name__}")
        if self.amax_reduction is not None:
            _check_amax_reduction(self)
        if self.wgrad_transform is not None:
            _check_wgrad_transform(self)

    def __copy__(self) -> "LinearRecipe":
        return self     # immutable; a process group in amax_reduction cannot be copied

    def __deepcopy__(self, memo: dict) -> "LinearRecipe":
        return self

    @property
    def stochastic_slots(self) -> tuple[str, ...]:
        """The slots that round stochastically (§14; a :data:`REUSE` slot takes its
        source's value and draws nothing)."""
        return tuple(s for s in SLOTS if isinstance(getattr(self, s), OperandRule)
                     and getattr(self, s).is_stochastic)

    def check_seed(self, seed: Any, stream: Any = 0, *, where: str = "matmul_fp8") -> None:
        """§14.3: a recipe with a stochastic slot needs ``seed`` (ValueError naming it);
        ints are validated here, framework integer scalars by the backend."""
        if self.stochastic_slots and seed is None:
            raise ValueError(
                f"{where}: recipe {self.name} rounds {', '.join(self.stochastic_slots)} "
                f"stochastically, so seed is required (an int in [0, 2**32)); got None")
        if seed is not None and isinstance(seed, (int, np.integer, bool, float, str)):
            _random.check_seed(seed)
        if isinstance(stream, (int, np.integer, bool, float, str)):
            _random.check_stream(stream)

    @property
    def reduced_slots(self) -> tuple[str, ...]:
        """The slots whose amax ``amax_reduction`` all-reduces: those quantizing with one
        scale per tensor (a :data:`REUSE` slot takes its source's reduced value)."""
        if self.amax_reduction is None:
            return ()
        return _per_tensor_slots(self)

    def rule(self, slot: str) -> OperandRule | None:
        """The rule a slot executes (a :data:`REUSE` slot: its source's rule)."""
        value = getattr(self, slot)
        if isinstance(value, str):
            return getattr(self, REUSE_SOURCE[slot])
        return value

    def source(self, slot: str) -> str:
        """How a backward slot gets its operand: ``"hp"`` (high precision),
        ``"reuse"`` (the source slot's quantized value, as written or because requantizing
        would give the same bits: same rule, orientation-free granularity) or ``"quantize"``."""
        return _source(self, slot)

    def saved(self, need_grad_input: bool, need_grad_weight: bool) -> dict[str, str | None]:
        """What the forward keeps for the backward, per tensor ``"X"`` and ``"W"``:
        ``"codes"`` (the forward's uint8 codes + absmax: backward reuses that quantized
        value), ``"hp"`` (the tensor itself: backward uses it in high precision or
        re-quantizes it in its own orientation) or ``None`` (not needed)."""
        return _saved(self, bool(need_grad_input), bool(need_grad_weight))

    def check_input(self, a_ndim: int, *, argname: str = "A") -> None:
        """Raise ValueError when a slot's granularity cannot apply to an input of
        ``a_ndim`` dims: a 1-D input is one row, so no 2-D tiles over X or dY."""
        if a_ndim >= 2:
            return
        for slot in ("input", "grad_output", "input_for_grad_weight", "grad_output_for_grad_weight"):
            rule = self.rule(slot)
            if rule is not None and rule.granularity.kind == "tile":
                raise ValueError(
                    f"recipe {self.name}: {slot}={rule} uses 2-D tiles, but {argname} is "
                    f"{a_ndim}-D (a single row); use tile granularity for weights, or block/axiswise"
                )

    def rows_warning(self, rows: int, in_features: int, out_features: int,
                     layer: str = "layer") -> str | None:
        """The warning a layer gives (once) when a flat block spans rows of its input or
        output gradient (one scale shared between tokens), else None."""
        from fp8core.blocks import plan_operand
        for slot, cols in (("input", in_features), ("grad_output", out_features)):
            rule = self.rule(slot)
            if rule is None or rule.granularity.kind != "flat":
                continue
            plan = plan_operand(rows, cols, rule.granularity)
            if plan.spans_rows:
                return (
                    f"{layer}: recipe {self.name} quantizes {slot} in flat blocks of "
                    f"{plan.flat.blocksize} elements, which span rows of the {rows}x{cols} "
                    f"{slot} ({cols} is not a multiple of {plan.flat.blocksize}), so tokens share "
                    f"scales and one token's values move another's (bitsandbytes' behaviour); "
                    f"recipes with axiswise or block granularity keep tokens independent"
                )
        return None

    def replace(self, **changes: Any) -> "LinearRecipe":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line per slot, for reprs and the README table."""
        def fmt(slot):
            v = getattr(self, slot)
            return "high precision" if v is None else v if isinstance(v, str) else str(v)
        text = "; ".join(f"{s}={fmt(s)}" for s in SLOTS)
        if self.amax_reduction is not None:
            text += f"; amax_reduction={self.amax_reduction!r}"
        if self.wgrad_transform is not None:
            text += f"; wgrad_transform={self.wgrad_transform}"
        return text

    def __str__(self) -> str:
        return self.name


def _per_tensor_slots(recipe: LinearRecipe) -> tuple[str, ...]:
    return tuple(s for s in SLOTS
                 if isinstance(getattr(recipe, s), OperandRule)
                 and getattr(recipe, s).granularity.kind == "tensor"
                 and (s not in REUSE_SOURCE or recipe.source(s) != "reuse"))


def _check_amax_reduction(recipe: LinearRecipe) -> None:
    """fp8core's part of the ``amax_reduction`` rules (the backends check the kind)."""
    v = recipe.amax_reduction
    if isinstance(v, (bool, int, float, bytes, list, dict, set)) or (
            isinstance(v, tuple) and (not v or not all(isinstance(n, str) and n for n in v))) or (
            isinstance(v, str) and not v):
        raise TypeError(
            f"LinearRecipe.amax_reduction must be None, a mesh axis name or a tuple of them "
            f"(JAX), or a torch.distributed process group (torch), got "
            f"{type(v).__name__}: {v!r}")
    nvfp4 = [s for s in SLOTS if isinstance(getattr(recipe, s), OperandRule)
             and getattr(recipe, s).is_nvfp4]
    if nvfp4:
        raise ValueError(
            f"LinearRecipe.amax_reduction={v!r}: the NVFP4 slots {', '.join(nvfp4)} have a "
            f"tensor amax that is not all-reduced yet (only tensor() slots are); use "
            f"amax_reduction=None with NVFP4 rules")
    if not _per_tensor_slots(recipe):
        raise ValueError(
            f"LinearRecipe.amax_reduction={v!r}: recipe {recipe.name} has no per-tensor "
            f"(tensor()) slot, so there is no amax to reduce (its groups: "
            f"{', '.join(sorted({str(recipe.rule(s).granularity) for s in SLOTS if recipe.rule(s)}))})")


#: The wgrad GEMM's slots (what ``wgrad_transform`` rotates).
WGRAD_SLOTS: tuple[str, ...] = ("input_for_grad_weight", "grad_output_for_grad_weight")


def _check_wgrad_transform(recipe: LinearRecipe) -> None:
    _hadamard.check_transform(recipe.wgrad_transform)
    for slot in WGRAD_SLOTS:
        if getattr(recipe, slot) == REUSE:
            raise ValueError(
                f"LinearRecipe.{slot}={REUSE!r} cannot be combined with "
                f"wgrad_transform={recipe.wgrad_transform!r}: the forward's quantized "
                f"{SLOT_TENSOR[slot]} is not rotated; give the slot its own OperandRule "
                f"(or None for high precision)")


@functools.lru_cache(maxsize=None)
def _source(recipe: LinearRecipe, slot: str) -> str:
    if slot not in REUSE_SOURCE:
        raise ValueError(f"slot must be one of {', '.join(REUSE_SOURCE)}, got {slot!r}")
    value = getattr(recipe, slot)
    if value is None:
        return "hp"
    if isinstance(value, str):
        return "reuse"
    if recipe.wgrad_transform is not None and slot in WGRAD_SLOTS:
        return "quantize"                  # the rotated operand, never the forward's value
    src = getattr(recipe, REUSE_SOURCE[slot])
    if src == value and value.granularity.orientation_free:
        return "reuse"
    return "quantize"


@functools.lru_cache(maxsize=None)
def _saved(recipe: LinearRecipe, need_grad_input: bool, need_grad_weight: bool):
    def form(slot):
        return "codes" if recipe.source(slot) == "reuse" else "hp"
    return {"X": form("input_for_grad_weight") if need_grad_weight else None,
            "W": form("weight_for_grad_input") if need_grad_input else None}


def bnb_recipe(mode: str, fw_format: Any = "e4m3", bw_format: Any = "e5m2",
               bsz: int | None = None, bsz2: int | None = None) -> LinearRecipe:
    """bitsandbytes' removed research layers as a recipe (docs/numerics.md §6).

    ``"mixed"``: X in flat blocks of ``bsz`` (default ``select_block_size(K)``), W one
    scale, dY in flat blocks of ``bsz2`` (default ``select_block_size(N)``), dgrad reuses
    Q(W), wgrad in high precision. ``"global"``: every operand one scale, and the
    backward reuses Q(W), Q(X) and Q(dY).
    """
    if mode not in ("mixed", "global"):
        raise ValueError(f"mode must be 'mixed' or 'global', got {mode!r}")
    for arg, v in (("bsz", bsz), ("bsz2", bsz2)):
        if v is not None:
            _validation.check_blocksize(v, argname=arg)
    fw = resolve_codebook(fw_format, argname="fw_format")
    bw = resolve_codebook(bw_format, argname="bw_format")
    return _bnb_recipe(mode, fw, bw, bsz, bsz2)


@functools.lru_cache(maxsize=256)
def _bnb_recipe(mode: str, fw: Codebook, bw: Codebook, bsz: int | None, bsz2: int | None
                ) -> LinearRecipe:
    if mode == "mixed":
        return LinearRecipe(
            input=OperandRule(fw, flat(bsz)), weight=OperandRule(fw, tensor()),
            grad_output=OperandRule(bw, flat(bsz2)), weight_for_grad_input=REUSE,
            input_for_grad_weight=None, grad_output_for_grad_weight=None,
            name="BNB_MIXED" if (fw.name, bw.name, bsz, bsz2) == _BNB_DEFAULTS else "bnb_mixed")
    return LinearRecipe(
        input=OperandRule(fw, tensor()), weight=OperandRule(fw, tensor()),
        grad_output=OperandRule(bw, tensor()), weight_for_grad_input=REUSE,
        input_for_grad_weight=REUSE, grad_output_for_grad_weight=REUSE,
        name="BNB_GLOBAL" if (fw.name, bw.name, bsz, bsz2) == _BNB_DEFAULTS else "bnb_global")


_BNB_DEFAULTS = ("float8_e4m3fn", "float8_e5m2", None, None)


def _all(rule_x: OperandRule, rule_w: OperandRule, rule_g: OperandRule, name: str) -> LinearRecipe:
    return LinearRecipe(input=rule_x, weight=rule_w, grad_output=rule_g,
                        weight_for_grad_input=rule_w, input_for_grad_weight=rule_x,
                        grad_output_for_grad_weight=rule_g, name=name)


#: bitsandbytes ``LinearFP8Mixed`` (bit-identical to the layers before recipes existed).
BNB_MIXED = bnb_recipe("mixed")
#: bitsandbytes ``LinearFP8Global``.
BNB_GLOBAL = bnb_recipe("global")
#: torchao 0.18 ``Float8LinearRecipeName.TENSORWISE`` (``Float8LinearConfig()``): every
#: operand of every GEMM one float32 scale; e4m3 for X and W, e5m2 for dY.
TENSORWISE = _all(OperandRule("e4m3"), OperandRule("e4m3"), OperandRule("e5m2"), "TENSORWISE")
#: torchao 0.18 ``ROWWISE``: every operand axiswise along its GEMM's contraction axis,
#: e4m3 everywhere, scales rounded down to powers of two as torchao computes it.
ROWWISE = _all(*(OperandRule("e4m3", axiswise(), "pow2_torchao"),) * 3, "ROWWISE")
#: torchao 0.18 ``ROWWISE_WITH_GW_HP``: fprop axiswise; dgrad dY axiswise and W one
#: scale; wgrad in high precision; e4m3, torchao's power-of-two scales.
ROWWISE_WITH_GW_HP = LinearRecipe(
    input=OperandRule("e4m3", axiswise(), "pow2_torchao"),
    weight=OperandRule("e4m3", axiswise(), "pow2_torchao"),
    grad_output=OperandRule("e4m3", axiswise(), "pow2_torchao"),
    weight_for_grad_input=OperandRule("e4m3", tensor(), "pow2_torchao"),
    input_for_grad_weight=None, grad_output_for_grad_weight=None, name="ROWWISE_WITH_GW_HP")
#: DeepSeek-V3 (arXiv:2412.19437 §3.3) / TransformerEngine ``Float8BlockScaling``: 1×128
#: blocks along each GEMM's contraction axis for X and dY (re-quantized from high
#: precision for wgrad), 128×128 tiles for W, e4m3 everywhere, exact power-of-two scales.
BLOCKWISE_1x128 = _all(OperandRule("e4m3", block(128), "pow2"),
                       OperandRule("e4m3", tile(128), "pow2"),
                       OperandRule("e4m3", block(128), "pow2"), "BLOCKWISE_1x128")

#: OCP MX v1.0 MXFP8 as TransformerEngine ``MXFP8BlockScaling`` trains it: e4m3 for every
#: operand including the gradients, 1×32 blocks along each GEMM's contraction axis (every
#: backward operand re-quantized from high precision in its GEMM's orientation), e8m0
#: scales by the RCEIL rule (cuBLAS' UE8M0 conversion, torchao ``ScaleCalculationMode.RCEIL``).
MXFP8 = _all(*(OperandRule("e4m3", block(32), "mx_rceil"),) * 3, "MXFP8")
#: :data:`MXFP8` with the OCP MX v1.0 FLOOR scale rule (torchao's ``to_mx`` default), which
#: can saturate a block's largest element — for comparing scale rules.
MXFP8_FLOOR = _all(*(OperandRule("e4m3", block(32), "mx_floor"),) * 3, "MXFP8_FLOOR")
#: OCP MX v1.0 MXFP4: float4_e2m1fn for every operand, 1×32 blocks along each GEMM's
#: contraction axis, e8m0 scales by the spec's FLOOR rule (torchao ``to_mx``'s default).
MXFP4 = _all(*(OperandRule("float4_e2m1fn", block(32), "mx_floor"),) * 3, "MXFP4")



def _nvfp4_rule(granularity: Granularity, stochastic: bool = False) -> OperandRule:
    return OperandRule("float4_e2m1fn", granularity, "nvfp4_te",
                       rounding="stochastic" if stochastic else "nearest")


#: TransformerEngine ``NVFP4BlockScaling()`` (its defaults; NVFP4 paper arXiv:2509.25149):
#: float4_e2m1fn elements with TE's two-level scale chain (e4m3 block scales, a float32
#: tensor scale; §13) — 1×16 blocks for X and dY along each GEMM's contraction axis,
#: 16×16 tiles for W (the same quantized weight in fprop and dgrad), stochastic rounding
#: of dY in both backward GEMMs (``fp4_quant_bwd_grad``), and the 16-point random Hadamard
#: transform of both wgrad operands (TE applies it to the columnwise X and dY).
NVFP4 = LinearRecipe(
    input=_nvfp4_rule(block(16)), weight=_nvfp4_rule(tile(16)),
    grad_output=_nvfp4_rule(block(16), stochastic=True), weight_for_grad_input=REUSE,
    input_for_grad_weight=_nvfp4_rule(block(16)),
    grad_output_for_grad_weight=_nvfp4_rule(block(16), stochastic=True),
    wgrad_transform="rht16", name="NVFP4")

#: Every preset by name.
PRESETS: dict[str, LinearRecipe] = {r.name: r for r in (
    BNB_MIXED, BNB_GLOBAL, TENSORWISE, ROWWISE, ROWWISE_WITH_GW_HP, BLOCKWISE_1x128,
    MXFP8, MXFP8_FLOOR, MXFP4, NVFP4)}


def get_recipe(recipe: Any, *, argname: str = "recipe") -> LinearRecipe:
    """A :class:`LinearRecipe` from itself or a preset name (case-insensitive).

    Raises:
      TypeError: not a recipe or a name (e.g. a codebook was passed).
      ValueError: an unknown name (the message lists the presets).
    """
    if isinstance(recipe, LinearRecipe):
        return recipe
    if isinstance(recipe, str):
        for name, r in PRESETS.items():
            if name.lower() == recipe.lower():
                return r
        raise ValueError(f"{argname}: unknown recipe {recipe!r}; presets: {', '.join(PRESETS)}")
    if isinstance(recipe, (Codebook, OperandRule)):
        raise TypeError(
            f"{argname} must be a LinearRecipe or a preset name ({', '.join(PRESETS)}), got a "
            f"{type(recipe).__name__}; a codebook belongs in OperandRule(format=...)"
        )
    raise TypeError(
        f"{argname} must be a LinearRecipe or a preset name ({', '.join(PRESETS)}), "
        f"got {type(recipe).__name__}: {recipe!r}"
    )


def conversion(mode: str | None, recipe: Any, fw_format: Any, bw_format: Any,
               bsz: int | None, bsz2: int | None) -> tuple[str, dict[str, Any]]:
    """What ``convert_to_fp8`` builds (both backends): ``("recipe", {"recipe": r})`` for
    :class:`LinearFP8` layers, or ``("mixed" | "global", {fw_format, bw_format, bsz, bsz2})``
    for bitsandbytes' layers (defaults: mode "mixed", e4m3 / e5m2, block sizes from each
    layer's features).

    Raises:
      ValueError: ``recipe`` together with ``mode`` or a bitsandbytes option; unknown
        ``mode`` or preset. TypeError: ``recipe`` is not a recipe or a preset name.
    """
    legacy = dict(fw_format=fw_format, bw_format=bw_format, bsz=bsz, bsz2=bsz2)
    if recipe is not None:
        given = [k for k, v in (("mode", mode), *legacy.items()) if v is not None]
        if given:
            raise ValueError(
                f"convert_to_fp8: recipe={recipe!r} cannot be combined with "
                f"{', '.join(given)} (those configure the bitsandbytes layers); put the formats "
                f"and block sizes in the recipe"
            )
        return "recipe", {"recipe": get_recipe(recipe)}
    mode = "mixed" if mode is None else mode
    if mode not in ("mixed", "global"):
        raise ValueError(f"mode must be one of mixed, global; got {mode!r}")
    return mode, dict(fw_format="e4m3" if fw_format is None else fw_format,
                      bw_format="e5m2" if bw_format is None else bw_format, bsz=bsz, bsz2=bsz2)


@functools.lru_cache(maxsize=None)
def pow2_torchao_thresholds() -> np.ndarray:
    """float32[256] ``T``: under ``"pow2_torchao"`` a scale ``q`` with biased exponent ``E``
    (``q ∈ [2**(E-127), 2**(E-126))``) becomes ``2**(E-126)`` if ``q ≥ T[E]``, else ``2**(E-127)``.

    torchao computes ``exp2(floor(log2(q)))`` in float32. With ``k = E - 126``,
    ``log2(q) ∈ [k-1, k)``, and the float32 rounding of ``log2(q)`` reaches ``k`` exactly
    when ``log2(q) ≥ k - h`` with ``h`` half the float32 spacing just below ``k`` (ties
    cannot occur: the logarithm of a float32 that is not a power of two is irrational).
    Writing ``q = 2**k · (1 - j·2**-24)``, that is ``j ≤ (1 - 2**-h)·2**24``, so
    ``T[E] = 2**k · (1 - j_max·2**-24)``, a float32. Entries with no round-up (``j_max =
    0``: k ≤ 1, where the spacing is too fine) are +inf. This assumes a correctly rounded
    float32 log2; tests compare it with torch's on constructed scales.
    """
    t = np.full(256, np.inf, dtype=np.float64)
    for e in range(1, 255):
        k = e - 126
        if k == 0:
            continue  # log2(q) in [-1, 0): rounds to 0 only below 2**-150 — never
        mag = abs(k)
        # float32 spacing of the numbers just below k (towards -inf)
        if k > 0:
            top = math.floor(math.log2(mag))
            spacing = 2.0 ** (top - 23) if mag != 2 ** top else 2.0 ** (top - 24)
        else:
            spacing = 2.0 ** (math.floor(math.log2(mag)) - 23)
        h = spacing / 2
        j_max = math.floor(-math.expm1(-h * math.log(2)) * 2.0**24)
        if j_max >= 1:
            t[e] = 2.0**k * (1 - j_max * 2.0**-24)
    out = t.astype(np.float32)
    assert np.all(out[np.isfinite(out)].astype(np.float64) == t[np.isfinite(t)])
    out.setflags(write=False)
    return out
