"""How close a preset's MLP must stay to its fp32 twin (tests/test_*_recipe.py).

The 1024 → 2048 → 1024 GELU MLP check of the recipe issue: mean |output error| < 0.05
and mean |first-layer weight- / bias-gradient error| < 2e-5 for the FP8 presets. A
recipe whose operands are 4-bit (float4_e2m1fn: one mantissa bit against e4m3's three)
has a quantum four times as large relative to its scale, so its bounds are four times
as wide (MXFP4 measured: output 0.042, weight gradient 3.2e-5)."""

from __future__ import annotations

from fp8core import recipe as FR

FP8_OUT, FP8_GRAD = 0.05, 2e-5


def mlp_bounds(preset: str) -> tuple[float, float]:
    """(output bound, gradient bound) for ``preset``."""
    recipe = FR.get_recipe(preset)
    rules = [recipe.rule(s) for s in FR.SLOTS]
    four_bit = any(r is not None and r.format.format.total_bits <= 4 for r in rules)
    factor = 4.0 if four_bit else 1.0
    return FP8_OUT * factor, FP8_GRAD * factor
