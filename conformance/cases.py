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

QUANTIZER_OPS = ("quantize_blockwise", "quantize_global", "fake_quantize_blockwise", "fake_quantize_global")
MATMUL_OPS = ("matmul_fp8_mixed", "matmul_fp8_global")
MODULE_OPS = ("linear_fp8_mixed", "linear_fp8_global")
TRAIN_OPS = ("train_mlp_mixed", "train_mlp_global")
OPERATIONS = QUANTIZER_OPS + MATMUL_OPS + MODULE_OPS + TRAIN_OPS

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

    @property
    def id(self) -> str:
        dims = "x".join(map(str, self.shape))
        if self.op in QUANTIZER_OPS:
            bs = f", bs={self.blocksize}" if self.blocksize else ""
            return f"{self.op}[{self.codebook}, {dims}, {self.dtype}{bs}, {self.distribution}]"
        fmts = f"{self.codebook}/{self.bw_codebook}"
        if self.op in MATMUL_OPS + MODULE_OPS:
            bdims = "x".join(map(str, self.b_shape))
            bs = f", bsz={self.blocksize or 'auto'}"
            return f"{self.op}[{fmts}, {dims} @ {bdims}, {self.dtype}{bs}]"
        return f"{self.op}[{fmts}, batch {dims}, {self.steps} steps]"


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
                for dist in dists:
                    if dist == "fp16_max" and dtype != "float16":
                        continue
                    for op in QUANTIZER_OPS:
                        blockwise = op.endswith("blockwise")
                        cases.append(Case(op, cb, shape, dtype, dist, seed, bs if blockwise else None))
    return cases


def _matmul_cases(seed: int, quick: bool) -> list[Case]:
    cases = []
    a_shapes = ((2, 64, 768), (96, 128), (2, 3, 16, 48)) if not quick else ((2, 64, 768),)
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
            for op in (TRAIN_OPS[:1] if quick else TRAIN_OPS)]


@functools.lru_cache(maxsize=8)
def all_cases(seed: int = 0, quick: bool = False) -> tuple[Case, ...]:
    """The full suite (or the ``--quick`` subset) for ``seed``."""
    return tuple(
        _quantizer_cases(seed, quick) + _matmul_cases(seed, quick) + _module_cases(seed, quick)
        + _training_cases(seed, quick)
    )


def select(cases, pattern: str | None) -> list[Case]:
    """Cases whose id contains ``pattern`` or matches it as a glob (``*``, ``?``, ``[``)."""
    if not pattern:
        return list(cases)
    if any(ch in pattern for ch in "*?"):
        return [c for c in cases if fnmatch.fnmatchcase(c.id, pattern)]
    return [c for c in cases if pattern in c.id]
