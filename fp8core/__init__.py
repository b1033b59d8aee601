"""fp8core: backend-agnostic FP8 formats, codebooks, block sizes, recipes
(:mod:`fp8core.recipe`), plans, and the numpy reference quantizers that define the
numerics contract (docs/numerics.md).

Imports numpy and ml_dtypes only — never torch or jax.
"""

from fp8core import recipe
from fp8core.blocks import (
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    BlockPlan,
    OperandPlan,
    TilePlan,
    operand_matrix,
    plan_blocks,
    plan_operand,
    plan_tiles,
    select_block_size,
    select_block_sizes,
)
from fp8core.codebooks import LEGACY_NAMES, Codebook, create_fp8_map, resolve_codebook
from fp8core.formats import ALIASES, FORMAT_NAMES, FormatSpec, all_formats, get_format
from fp8core._info import info
from fp8core.recipe import LinearRecipe, OperandRule, get_recipe
from fp8core.reference import (
    dequantize_blockwise,
    dequantize_global,
    dequantize_mx,
    dequantize_nvfp4,
    dequantize_operand,
    fake_quantize,
    fake_quantize_operand,
    quantize_blockwise,
    quantize_global,
    quantize_mx,
    quantize_nvfp4,
    quantize_operand,
    random_hadamard_transform,
)

__version__ = "0.1.0"

#: Formats usable as element codebooks (every format except the scale-only e8m0).
ELEMENT_FORMATS: tuple[str, ...] = tuple(n for n in FORMAT_NAMES if n != "float8_e8m0fnu")
#: 8-bit element formats (what the conformance suite calls "native 8-bit").
NATIVE_8BIT_FORMATS: tuple[str, ...] = tuple(n for n in ELEMENT_FORMATS if n.startswith("float8"))

__all__ = [
    "ALIASES",
    "BlockPlan",
    "Codebook",
    "ELEMENT_FORMATS",
    "FORMAT_NAMES",
    "FormatSpec",
    "LEGACY_NAMES",
    "LinearRecipe",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "NATIVE_8BIT_FORMATS",
    "OperandPlan",
    "OperandRule",
    "TilePlan",
    "all_formats",
    "create_fp8_map",
    "dequantize_blockwise",
    "dequantize_global",
    "dequantize_mx",
    "dequantize_nvfp4",
    "dequantize_operand",
    "fake_quantize",
    "fake_quantize_operand",
    "get_format",
    "get_recipe",
    "info",
    "operand_matrix",
    "plan_blocks",
    "plan_operand",
    "plan_tiles",
    "quantize_blockwise",
    "quantize_global",
    "quantize_mx",
    "quantize_nvfp4",
    "quantize_operand",
    "random_hadamard_transform",
    "recipe",
    "resolve_codebook",
    "select_block_size",
    "select_block_sizes",
]
