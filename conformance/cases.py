"""The conformance cases, as data.

A :class:`Case` is frozen and carries everything needed to reproduce it: the
operation, codebook(s), shapes, dtype, block sizes, input distribution, seed and
comparison tier. Inputs are generated once by numpy from the seed (float32, then
cast) — never by a framework RNG — so every backend sees the same bits.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools

import fp8core
from fp8core import recipe as R

QUANTIZER_OPS = ("quantize_blockwise", "quantize_global", "fake_quantize_blockwise", "fake_quantize_global")
MATMUL_OPS = ("matmul_fp8_mixed", "matmul_fp8_global")
MODULE_OPS = ("linear_fp8_mixed", "linear_fp8_global")
TRAIN_OPS = ("train_mlp_mixed", "train_mlp_global")
#: the recipe engine (docs/numerics.md §9): operands under an OperandRule, and per preset
#: the matmul, the layer and a training run
OPERAND_OPS = ("quantize_operand", "fake_quantize_operand")
RECIPE_MATMUL_OPS = ("matmul_fp8",)
RECIPE_MODULE_OPS = ("linear_fp8",)
RECIPE_TRAIN_OPS = ("train_mlp",)
OPERATIONS = (QUANTIZER_OPS + MATMUL_OPS + MODULE_OPS + TRAIN_OPS
              + OPERAND_OPS + RECIPE_MATMUL_OPS + RECIPE_MODULE_OPS + RECIPE_TRAIN_OPS)

DTYPES = ("float32", "float16", "bfloat16")
DISTRIBUTIONS = (
    "normal", "uniform", "heavy_tailed", "midpoints", "zero_blocks", "nan_block", "inf_block",
    "tiny", "huge", "negative_zero", "fp16_max",
)
#: every native 8-bit element format and the bitsandbytes legacy tables
QUANTIZER_CODEBOOKS = fp8core.NATIVE_8BIT_FORMATS + tuple(fp8core.LEGACY_NAMES)
#: (shape, blocksize): full blocks, a partial last block, 1-D … 4-D
QUANTIZER_SHAPES = (((4, 256), 256), ((3, 100), 64), ((700,), 256), ((2, 3, 4, 25), 128))


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case.

    Attributes:
      op: one of :data:`OPERATIONS`.
      codebook: the (forward) codebook name.
      shape: input shape (A's shape for matmuls and modules, (batch, features) for training).
      dtype: input dtype name.
      distribution: how inputs are drawn (see :mod:`conformance.inputs`).
      seed: numpy seed for the inputs.
      blocksize: quantizer block size, or ``bsz`` for matmuls (None: global / automatic).
      bw_codebook, b_shape, blocksize2: matmul/module extras (backward codebook, B's shape, ``bsz2``).
      tier: ``"bitwise"`` or ``"tolerance"`` (results that go through a matmul).
      steps: training steps (training cases only).
      rule: the :class:`fp8core.recipe.OperandRule` of an operand case.
      axis: the contraction axis of an operand case (-1, or 0 of a 2-D input).
      recipe: the preset name of a recipe matmul / module / training case.
      not_on: backend paths that do not run the case, by design (a deterministic subset of a
        cross product that one path compiles case by case; see :data:`XLA_SUBSET`).
    """

    op: str
    codebook: str
    shape: tuple[int, ...]
    dtype: str
    distribution: str = "normal"
    seed: int = 0
    blocksize: int | None = None
    bw_codebook: str | None = None
    b_shape: tuple[int, ...] | None = None
    blocksize2: int | None = None
    tier: str = "bitwise"
    steps: int = 0
    rule: R.OperandRule | None = None
    axis: int = -1
    recipe: str | None = None
    not_on: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        dims = "x".join(map(str, self.shape))
        if self.op in OPERAND_OPS:
            return f"{self.op}[{self.rule}, {dims}, axis={self.axis}, {self.dtype}, {self.distribution}]"
        if self.op in RECIPE_MATMUL_OPS + RECIPE_MODULE_OPS:
            return f"{self.op}[{self.recipe}, {dims} @ {'x'.join(map(str, self.b_shape))}, {self.dtype}]"
        if self.op in RECIPE_TRAIN_OPS:
            return f"{self.op}[{self.recipe}, batch {dims}, {self.steps} steps]"
        if self.op in QUANTIZER_OPS:
            bs = f", bs={self.blocksize}" if self.blocksize else ""
            return f"{self.op}[{self.codebook}, {dims}, {self.dtype}{bs}, {self.distribution}]"
        fmts = f"{self.codebook}/{self.bw_codebook}"
        if self.op in MATMUL_OPS + MODULE_OPS:
            bdims = "x".join(map(str, self.b_shape))
            bs = f", bsz={self.blocksize or 'auto'}"
            return f"{self.op}[{fmts}, {dims} @ {bdims}, {self.dtype}{bs}]"
        return f"{self.op}[{fmts}, batch {dims}, {self.steps} steps]"


#: jax[xla] compiles every (shape, codebook, dtype, op) of a quantizer row (~0.3 s each on
#: a 2-core CPU; the other paths take under 0.05 s): in the full run it takes one shape per
#: codebook × dtype of the cross product (rotating, so every shape is covered), with every
#: distribution and op. The other paths run all of it.
XLA_SUBSET = "jax[xla]"


def _xla_shape(codebook: str, dtype: str, shapes) -> tuple[int, ...]:
    i = QUANTIZER_CODEBOOKS.index(codebook) + DTYPES.index(dtype)
    return shapes[i % len(shapes)][0]


def _quantizer_cases(seed: int, quick: bool) -> list[Case]:
    cases = []
    if quick:  # one shape per codebook: partial blocks, 4-D, full blocks
        plan = {"float8_e4m3fn": QUANTIZER_SHAPES[1:2], "float8_e5m2": QUANTIZER_SHAPES[3:4],
                "bnb_e4m3": QUANTIZER_SHAPES[0:1]}
    else:
        plan = {cb: QUANTIZER_SHAPES for cb in QUANTIZER_CODEBOOKS}
    dtypes = ("float32", "bfloat16") if quick else DTYPES
    dists = ("normal", "midpoints", "nan_block", "inf_block", "tiny", "negative_zero") if quick else DISTRIBUTIONS
    for cb, shapes in plan.items():
        for dtype in dtypes:
            for shape, bs in shapes:
                if len(shape) == 1 and dtype != "float32" and not quick:
                    continue  # 1-D is a layout case: float32 covers it (keeps the full run < 3 min)
                if quick and dtype != "float32" and cb != "float8_e4m3fn":
                    continue  # quick: bfloat16 through one format (each path compiles per dtype)
                usable = [s for s in shapes if len(s[0]) > 1 or dtype == "float32"]
                not_on = (XLA_SUBSET,) if not quick and shape != _xla_shape(cb, dtype, usable) else ()
                for dist in dists:
                    if dist == "fp16_max" and dtype != "float16":
                        continue
                    for op in QUANTIZER_OPS:
                        blockwise = op.endswith("blockwise")
                        cases.append(Case(op, cb, shape, dtype, dist, seed, bs if blockwise else None,
                                          not_on=not_on))
    return cases


def _matmul_cases(seed: int, quick: bool) -> list[Case]:
    cases = []
    a_shapes = ((2, 64, 768), (96, 128), (2, 3, 16, 48)) if not quick else ((96, 128),)
    n_out = {768: 3072, 128: 256, 48: 80}
    pairs = (("float8_e4m3fn", "float8_e5m2"), ("bnb_e4m3", "bnb_e5m2"))
    dtypes = DTYPES if not quick else ("float16",)
    for op in MATMUL_OPS:
        for fw, bw in (pairs if not quick else pairs[:1]):
            for shape in a_shapes:
                k = shape[-1]
                for dtype in dtypes:
                    cases.append(Case(op, fw, shape, dtype, "normal", seed, None, bw, (k, n_out[k]),
                                      None, "tolerance"))
    # explicit block sizes, including blocks that span rows
    if not quick:
        for op in MATMUL_OPS:
            cases.append(Case(op, "float8_e4m3fn", (5, 7, 96), "float32", "heavy_tailed", seed, 64,
                              "float8_e5m2", (96, 40), 128, "tolerance"))
    return cases


def _module_cases(seed: int, quick: bool) -> list[Case]:
    dtypes = ("float32", "bfloat16") if not quick else ("float32",)
    return [Case(op, "float8_e4m3fn", (4, 16, 96), dtype, "normal", seed, None, "float8_e5m2",
                 (96, 160), None, "tolerance")
            for op in MODULE_OPS for dtype in dtypes]


def _training_cases(seed: int, quick: bool) -> list[Case]:
    steps = 20
    return [Case(op, "float8_e4m3fn", (32, 64), "float32", "normal", seed, None, "float8_e5m2",
                 (64, 10), None, "tolerance", steps)
            for op in (() if quick else TRAIN_OPS)]  # training runs in the full suite only


# ------------------------------------------------------------------ recipes

#: element formats of the operand cases: the presets' two, one more native format, and a
#: bitsandbytes table (scale "fp32" only: the power-of-two rules need a native format)
OPERAND_FORMATS = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "bnb_e4m3")
#: the scale rules every granularity takes (the MX and NVFP4 rules have their own cases)
NON_MX_SCALE_RULES = tuple(s for s in R.SCALE_RULES
                           if not s.startswith("mx_") and s not in fp8core.nvfp4.ENGINE_RULES)
#: the NVFP4 rules (§13.5) and the granularities they take
NVFP4_SCALE_RULES = tuple(fp8core.nvfp4.ENGINE_RULES)
NVFP4_GRANULARITIES = (R.block(16), R.tile(16))
OPERAND_GRANULARITIES = (R.tensor(), R.axiswise(), R.block(128), R.tile(128), R.flat())
#: the MX rules' cases: every MX element format × scale mode on 1×32 blocks and 32×32 tiles
MX_GRANULARITIES = (R.block(32), R.tile(32))
#: (shape, contraction axis): full 128-blocks and tiles, partial ones, 3-D (axis -1 only)
OPERAND_SHAPES = (((256, 256), -1), ((256, 256), 0), ((130, 200), -1), ((130, 200), 0),
                  ((3, 50, 72), -1))
#: (A's shape, N) of the recipe matmuls: K = 256 (two full blocks) and N = 200 (a partial
#: tile), then K = 72 and N = 130 (partial blocks and tiles, 3-D A)
RECIPE_MATMUL_SHAPES = (((96, 256), 200), ((3, 10, 72), 130))
#: the --quick recipe rows (each JAX path compiles every matmul and layer, ~1 s each):
#: matmul_fp8 for high-precision wgrad with pow2 scales and for blocks and tiles, LinearFP8
#: for one scale per tensor (the bitsandbytes presets are the quick matmul_fp8_* /
#: linear_fp8_* rows); training runs only in the full suite
QUICK_MATMUL_PRESETS = ("ROWWISE_WITH_GW_HP", "BLOCKWISE_1x128")
QUICK_MODULE_PRESETS = ("TENSORWISE",)


@functools.lru_cache(maxsize=1)
def preset_rules() -> tuple[R.OperandRule, ...]:
    """Every distinct OperandRule of every preset, in preset and slot order."""
    out: list[R.OperandRule] = []
    for recipe in R.PRESETS.values():
        for slot in R.SLOTS:
            rule = recipe.rule(slot)
            if rule is not None and rule not in out:
                out.append(rule)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def operand_rules() -> tuple[R.OperandRule, ...]:
    """The presets' rules, then formats × granularities × scale rules (tables: "fp32"),
    then the NVFP4 rules (float4_e2m1fn only) in their two granularities."""
    out = list(preset_rules())
    for fmt in OPERAND_FORMATS:
        native = fp8core.resolve_codebook(fmt).is_native
        for gran in OPERAND_GRANULARITIES:
            for scale in (NON_MX_SCALE_RULES if native else ("fp32",)):
                rule = R.OperandRule(fmt, gran, scale)
                if rule not in out:
                    out.append(rule)
    for fmt in fp8core.mx.MX_ELEMENT_FORMATS:
        for gran in MX_GRANULARITIES:
            for scale in fp8core.mx.MX_SCALE_RULES:
                rule = R.OperandRule(fmt, gran, scale)
                if rule not in out:
                    out.append(rule)
    for scale in NVFP4_SCALE_RULES:
        for gran in NVFP4_GRANULARITIES:
            rule = R.OperandRule(fp8core.nvfp4.ELEMENT_FORMAT, gran, scale)
            if rule not in out:
                out.append(rule)
    return tuple(out)


def _codebook_name(cb) -> str:
    """A name :func:`fp8core.resolve_codebook` takes back (a table's own name is descriptive)."""
    if cb.is_native:
        return cb.name
    return next(n for n in QUANTIZER_CODEBOOKS if fp8core.resolve_codebook(n) == cb)


def _group_hint(rule: R.OperandRule, shape, axis) -> int | None:
    """The group length the input generator aligns its special values to (midpoints' ±M,
    zero blocks) in the row-major flattening: a row for row-shaped groups."""
    cols = shape[-1] if axis == -1 else shape[0]
    kind, size = rule.granularity.kind, rule.granularity.size
    if kind == "tensor":
        return None
    if kind == "flat":
        return size or fp8core.select_block_size(cols)
    return shape[-1]


def _operand_cases(seed: int, quick: bool) -> list[Case]:
    """quantize_operand / fake_quantize_operand cases: a deterministic subset of rules ×
    (shape, axis) × dtype × distribution (see the README's conformance section):

    * the presets' rules: every (shape, axis) in float32, plus bfloat16 and float16 on a
      rotating (shape, axis) each; both ops; ``normal`` and four of the special
      distributions per combination, rotating (each rule sees every distribution);
    * every other rule (formats × granularities × scale rules, then the MX formats × modes
      on block(32) / tile(32)): one (shape, axis, dtype) combination, rotating (they cover
      all 15), quantize_operand only, ``normal`` and three rotating special distributions.

    ``quick``: one preset rule per granularity (and one MX block rule), one rotating
    (shape, axis, dtype) each.
    """
    combos = [(shape, axis, dtype) for shape, axis in OPERAND_SHAPES for dtype in DTYPES]
    specials = [d for d in DISTRIBUTIONS if d not in ("normal", "fp16_max")]
    presets = preset_rules()
    plan = []  # (rule, (shape, axis, dtype), distributions, ops)
    for i, rule in enumerate(operand_rules()):
        if quick:
            kind = (rule.granularity.kind, rule.is_mx)
            if rule in presets and kind not in {(p[0].granularity.kind, p[0].is_mx) for p in plan}:
                plan.append((rule, combos[(4 * i) % len(combos)],
                             ("normal", "midpoints", "nan_block", "zero_blocks"), OPERAND_OPS))
            continue
        if rule in presets:
            chosen = [c for c in combos if c[2] == "float32"]
            chosen += [c for j, c in enumerate(combos) if c[2] != "float32" and j % 5 == i % 5][:2]
            for j, combo in enumerate(chosen):
                dists = ("normal",) + tuple(specials[(4 * (i + j) + k) % len(specials)] for k in range(4))
                if combo[2] == "float16":
                    dists += ("fp16_max",)
                plan.append((rule, combo, dists, OPERAND_OPS))
        else:
            dists = ("normal",) + tuple(specials[(3 * i + k) % len(specials)] for k in range(3))
            plan.append((rule, combos[(7 * i) % len(combos)], dists, OPERAND_OPS[:1]))
    cases = []
    for rule, (shape, axis, dtype), dists, ops in plan:
        for dist in dists:
            for op in ops:
                cases.append(Case(op, _codebook_name(rule.format), shape, dtype, dist, seed,
                                  _group_hint(rule, shape, axis), rule=rule, axis=axis))
    return cases


def _recipe_cases(seed: int, quick: bool) -> list[Case]:
    """Per preset: matmul_fp8 forward + backward (the 3-D shape in every dtype, the 2-D one
    in float32), LinearFP8 with transferred weights (float32, bfloat16), and a short
    training run. ``quick``: :data:`QUICK_MATMUL_PRESETS` on the 3-D matmul in float32,
    :data:`QUICK_MODULE_PRESETS` in float32, no training."""
    cases = []
    for name in R.PRESETS:
        for shape, n in (RECIPE_MATMUL_SHAPES[1:] if quick else RECIPE_MATMUL_SHAPES):
            if quick and name not in QUICK_MATMUL_PRESETS:
                continue
            k = shape[-1]
            for dtype in (("float32",) if quick or len(shape) == 2 else DTYPES):
                cases.append(Case("matmul_fp8", "float8_e4m3fn", shape, dtype, "normal", seed, None,
                                  None, (k, n), None, "tolerance", recipe=name))
        if quick and name not in QUICK_MODULE_PRESETS:
            continue
        for dtype in (("float32",) if quick else ("float32", "bfloat16")):
            cases.append(Case("linear_fp8", "float8_e4m3fn", (4, 16, 96), dtype, "normal", seed, None,
                              None, (96, 160), None, "tolerance", recipe=name))
    for name in (() if quick else R.PRESETS):
        cases.append(Case("train_mlp", "float8_e4m3fn", (32, 64), "float32", "normal", seed, None, None,
                          (64, 10), None, "tolerance", 20, recipe=name))
    return cases


@functools.lru_cache(maxsize=8)
def all_cases(seed: int = 0, quick: bool = False) -> tuple[Case, ...]:
    """The full suite (or the ``--quick`` subset) for ``seed``."""
    return tuple(
        _quantizer_cases(seed, quick) + _matmul_cases(seed, quick) + _module_cases(seed, quick)
        + _training_cases(seed, quick) + _operand_cases(seed, quick) + _recipe_cases(seed, quick)
    )


def select(cases, pattern: str | None) -> list[Case]:
    """Cases whose id contains ``pattern`` or matches it as a glob (``*``, ``?``, ``[``)."""
    if not pattern:
        return list(cases)
    if any(ch in pattern for ch in "*?"):
        return [c for c in cases if fnmatch.fnmatchcase(c.id, pattern)]
    return [c for c in cases if pattern in c.id]
