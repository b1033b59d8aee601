"""torchao 0.18's float8 training as a peer: its fp8 codes and scales equal the reference's.

For the presets ``TENSORWISE``, ``ROWWISE`` and ``ROWWISE_WITH_GW_HP`` (``fp8core.recipe``,
transcriptions of ``Float8LinearConfig.from_recipe_name``) and every slot of each, the
operand is cast by torchao's own ``hp_tensor_to_float8_dynamic`` in the orientation
``matmul_with_hp_or_float8_args`` (torchao/float8/float8_linear.py) uses —

=============================  ====================  ===========  ==========================
slot (``cast_config_<slot>``)  torchao tensor        axiswise dim  ours: ``quantize_operand``
=============================  ====================  ===========  ==========================
input                          ``input_hp (..., K)``  -1           ``X, axis=-1``
weight                         ``weight_hp_t (K, N)`` 0            ``Wᵀ, axis=0``
grad_output                    ``grad_output (M, N)`` -1           ``dY, axis=-1``
weight_for_grad_input          ``weight_hp_t (K, N)`` -1           ``Wᵀ, axis=-1``
input_for_grad_weight          ``input (M, K)``       0            ``X, axis=0``
grad_output_for_grad_weight    ``grad_output (M, N)`` 0            ``dY, axis=0``
=============================  ====================  ===========  ==========================

— and its codes (``._data`` as uint8) and scale (``._scale``, float32 bits) must equal
``fp8core.reference.quantize_operand``'s codes and ``operand_scales(...)[0]`` (the qscale)
bit for bit. Both compute ``fl32(x) · scale``, clamp to ±M and round half to even.

Where torchao's arithmetic differs from ours (each difference is pinned by a test here):

* **Dequantization divides.** torchao unscales by ``data / scale`` (``Float8TrainingTensor``,
  the emulated ``mm``); we multiply by ``dscale = fl(a · fl(1/M))``. For power-of-two scales
  (``ROWWISE*``: ``dscale = 1/qscale`` exactly) the values are the same; for ``TENSORWISE``'s
  float32 scale they can differ by an ulp (:func:`test_dequantization_divides_by_the_scale`).
* **The amax floor.** torchao clamps amax at ``EPS = 1e-12`` before dividing; we clip at the
  codebook's floor (``Codebook.scale_floor``, 2**-106 for e4m3fn) and flush a float32-subnormal
  amax to 0 first. Groups with ``amax < 1e-12`` therefore get other scales (and, if non-zero,
  other codes): the equality tests use inputs whose every group has ``amax >= 1e-12``
  (asserted), and :func:`test_amax_below_torchao_eps_gets_other_scales` pins the difference.
* **A float64 division.** torchao computes ``M / amax`` in float64 and rounds to float32; that
  equals our single float32 division ``fl32(M / a)`` because float64 has more than
  ``2·24 + 2`` bits (a double rounding of a quotient is then innocuous).
* **Power-of-two scales** are ``exp2(floor(log2(scale)))`` in float32
  (``_round_scale_down_to_power_of_2``), which rounds *up* for scales a few ulps below a
  power of two: that is our ``"pow2_torchao"`` rule, not ``"pow2"``
  (:func:`test_pow2_torchao_is_torchaos_rounding_and_pow2_is_not`).

Then ``Float8Linear(emulate=True)`` (config ``from_recipe_name``) is checked against the
float64 product of its own operands as our reference predicts them, and against
``fp8core_torch.LinearFP8(recipe=...)``, within the float32 accumulation bound of
``conformance.compare.accumulation_bound`` (twice it between the two implementations).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install torchao --no-deps)")

from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: E402
from torchao.float8.config import ScalingGranularity, ScalingType  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.float8_scaling_utils import (  # noqa: E402
    get_maybe_axiswise_dim,
    hp_tensor_to_float8_dynamic,
)
from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig  # noqa: E402
from torchao.float8.float8_utils import (  # noqa: E402
    EPS,
    _round_scale_down_to_power_of_2,
    amax_to_scale,
    tensor_to_scale,
)

import fp8core  # noqa: E402
from fp8core import recipe as R  # noqa: E402
from fp8core import reference as ref  # noqa: E402
from conformance import compare  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
PEER_PRESETS = ("TENSORWISE", "ROWWISE", "ROWWISE_WITH_GW_HP")

#: slot -> (tensor in torchao's orientation, torchao's axiswise dim = our contraction axis, role)
ORIENTATION = {
    "input": ("X", -1, GemmInputRole.INPUT),
    "weight": ("Wt", 0, GemmInputRole.WEIGHT),
    "grad_output": ("dY", -1, GemmInputRole.GRAD_OUTPUT),
    "weight_for_grad_input": ("Wt", -1, GemmInputRole.WEIGHT),
    "input_for_grad_weight": ("X", 0, GemmInputRole.INPUT),
    "grad_output_for_grad_weight": ("dY", 0, GemmInputRole.GRAD_OUTPUT),
}
#: shapes of the operand in torchao's orientation; 3-D only where torchao passes N-D
#: tensors (the forward input; backward tensors are reshaped to 2-D first)
SHAPES = {"X": ((64, 96), (3, 50, 72)), "Wt": ((96, 64), (72, 130)), "dY": ((64, 96), (150, 40))}
DISTRIBUTIONS = ("spread", "normal", "heavy_tailed", "midpoints")


# ------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True)
def pinned_numerics():
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


def to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.array(a, order="C", copy=True)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def draw(distribution: str, shape, dtype, seed: int) -> np.ndarray:
    """Inputs from numpy and a seed; ``spread``: rows and columns of very different magnitudes
    (10**±5 per row times 10**±3 per column), so axiswise groups along either axis differ."""
    rng = np.random.default_rng([seed, len(shape), *shape, DISTRIBUTIONS.index(distribution)])
    n = int(np.prod(shape))
    if distribution == "spread":
        m = shape[-1]
        rows = n // m
        x = (rng.standard_normal((rows, m)) * 10.0 ** rng.uniform(-5, 5, (rows, 1))
             * 10.0 ** rng.uniform(-3, 3, (1, m)))
    elif distribution == "normal":
        x = rng.standard_normal(n)
    elif distribution == "heavy_tailed":
        x = rng.standard_t(1.5, n) * 10.0 ** rng.integers(-2, 3, n)
    else:  # exact midpoints between e4m3 / e5m2 values at a power-of-two scale, plus ±M
        from conformance.inputs import _midpoints
        cb = fp8core.resolve_codebook("e4m3")
        x = _midpoints(rng, n, shape[-1], cb)
    return np.asarray(x, np.float64).astype(np.float32).reshape(shape).astype(dtype)


def torchao_cast(x: torch.Tensor, config: Float8LinearConfig, slot: str):
    """torchao's cast of one slot, exactly as matmul_with_hp_or_float8_args calls it."""
    cc = getattr(config, f"cast_config_{slot}")
    _, dim, role = ORIENTATION[slot]
    return hp_tensor_to_float8_dynamic(
        x, cc.target_dtype, LinearMMConfig(), gemm_input_role=role,
        scaling_granularity=cc.scaling_granularity,
        axiswise_dim=get_maybe_axiswise_dim(dim, cc.scaling_granularity),
        round_scales_to_power_of_2=config.round_scales_to_power_of_2)


def group_absmax_min(x: np.ndarray, rule, axis: int) -> float:
    _, absmax = ref.quantize_operand(x, rule, axis=axis)
    return float(np.min(absmax))


def assert_bits(name, expected, actual, context):
    o = compare.compare_bits(name, np.asarray(expected), np.asarray(actual))
    assert o.passed, f"{context}: {o.message}"


def slot_cases():
    """(preset, slot) of every quantized slot (high-precision slots: the config test)."""
    for preset in PEER_PRESETS:
        for slot in R.SLOTS:
            if R.PRESETS[preset].rule(slot) is not None:
                yield preset, slot


# --------------------------------------------------- the recipes are torchao's

@pytest.mark.parametrize("preset", PEER_PRESETS)
def test_presets_transcribe_torchaos_configs(preset):
    """Every slot: same target dtype, granularity, scale rule, or both disabled."""
    config = Float8LinearConfig.from_recipe_name(preset.lower())
    recipe = R.PRESETS[preset]
    granularity = {ScalingGranularity.TENSORWISE: "tensor", ScalingGranularity.AXISWISE: "axiswise"}
    for slot in R.SLOTS:
        cc = getattr(config, f"cast_config_{slot}")
        rule = recipe.rule(slot)
        if cc.scaling_type is ScalingType.DISABLED:
            assert rule is None, f"{preset}.{slot}: torchao keeps it in high precision, we have {rule}"
            continue
        assert rule is not None, f"{preset}.{slot}: torchao casts ({cc.short_str()}), we do not"
        assert str(cc.target_dtype).removeprefix("torch.") == rule.format.name, (preset, slot)
        assert granularity[cc.scaling_granularity] == rule.granularity.kind, (preset, slot)
        expected_scale = "pow2_torchao" if config.round_scales_to_power_of_2 else "fp32"
        assert rule.scale == expected_scale, (preset, slot, rule.scale)


# ---------------------------------------------- codes and scales, bit for bit

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("preset,slot", list(slot_cases()), ids=[f"{p}.{s}" for p, s in slot_cases()])
def test_codes_and_scales_equal_the_reference(preset, slot, distribution, dtype):
    config = Float8LinearConfig.from_recipe_name(preset.lower())
    rule = R.PRESETS[preset].rule(slot)
    tensor, axis, _ = ORIENTATION[slot]
    np_dtype = {"float32": np.dtype(np.float32), "bfloat16": BF16}[dtype]
    for shape in SHAPES[tensor]:
        if len(shape) > 2 and axis != -1:
            continue
        x = draw(distribution, shape, np_dtype, seed=7)
        context = f"{preset}.{slot} {distribution} {dtype} {shape}"
        # torchao clamps amax at EPS, we at the codebook floor: keep every group above EPS
        assert group_absmax_min(x, rule, axis) >= EPS, f"{context}: a group below torchao's EPS"
        t = torchao_cast(to_torch(x), config, slot)
        codes, absmax = ref.quantize_operand(x, rule, axis=axis)
        qscale, _ = ref.operand_scales(absmax, rule)
        assert_bits("codes", codes, t._data.view(torch.uint8).numpy(), context)
        ao_scale = t._scale.numpy()
        assert ao_scale.dtype == np.float32 and ao_scale.size == qscale.size, context
        # torchao keeps the scale broadcastable to the data ((..., 1), (1, N) or 0-d); ours is in
        # the operand's orientation (rows, 1): the same values in the same order
        assert_bits("scale", qscale, ao_scale.reshape(qscale.shape), context)


def test_dequantization_divides_by_the_scale():
    """torchao unscales by ``data / scale``; ours is ``value · dscale``. Equal bits for
    power-of-two scales; for TENSORWISE's float32 scale not always equal, and a few ulps apart at
    most: ``v / fl(M/a)`` is within 1 ulp of ``v·a/M``, ``fl(v · fl(a · fl(1/M)))`` within 1.5,
    so they differ by at most 2 ulps (3 with the two bounds' ulps at different binades)."""
    x = draw("spread", (64, 96), np.dtype(np.float32), seed=3)
    for preset, equal in (("ROWWISE", True), ("TENSORWISE", False)):
        config = Float8LinearConfig.from_recipe_name(preset.lower())
        rule = R.PRESETS[preset].rule("input")
        t = torchao_cast(to_torch(x), config, "input")
        ours = ref.fake_quantize_operand(x, rule, axis=-1)
        theirs = to_numpy(t.to_original_precision())
        if equal:
            assert_bits("dequantized", ours, theirs, preset)
        else:
            ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64))
            assert 1 <= ulps.max() <= 3, f"{preset}: division vs multiplication differ by {ulps.max()} ulp"
            # the same as our codes decoded and divided by our qscale in float32
            codes, absmax = ref.quantize_operand(x, rule)
            qscale, _ = ref.operand_scales(absmax, rule)
            divided = rule.format.values256[codes] / qscale
            assert_bits("value / qscale", divided.astype(np.float32), theirs, preset)


def test_amax_below_torchao_eps_gets_other_scales():
    """torchao: ``M / max(amax, 1e-12)``; ours: ``M / clip(amax, 2**-106)`` (e4m3fn), with a
    float32-subnormal amax flushed to 0 first. Equal at and above EPS, different below."""
    cb = fp8core.resolve_codebook("e4m3")
    assert float(cb.scale_floor) == 2.0**-106
    rule = R.OperandRule("e4m3")
    amax = np.array([0.0, 1e-40, 2.0**-106, 1e-20, 1e-13, 9e-13, 1.5e-12, 2e-12, 1.0], np.float32)
    ours = np.array([ref.operand_scales(ref.quantize_operand(np.array([a], np.float32), rule)[1], rule)[0]
                     for a in amax]).reshape(-1)
    theirs = np.array([amax_to_scale(torch.tensor(a), torch.float8_e4m3fn).item() for a in amax],
                      np.float32)
    below = amax.astype(np.float64) < EPS
    assert np.all(theirs[below] == np.float32(448 / 1e-12)), theirs[below]
    assert np.all(ours[below] > theirs[below]), (ours[below], theirs[below])
    assert_bits("scale at/above EPS", ours[~below], theirs[~below], "amax >= EPS")
    # a zero tensor: same (zero) codes, other scales; a tiny one: other codes too
    for a, same_codes in ((0.0, True), (1e-14, False)):
        x = np.full((4, 8), a, np.float32)
        x[0, 0] = -a
        t = torchao_cast(to_torch(x), Float8LinearConfig(), "input")
        codes, _ = ref.quantize_operand(x, rule)
        assert np.array_equal(codes, t._data.view(torch.uint8).numpy()) == same_codes, a


def _amax_with_scale(q0: np.float32, m: np.float32):
    """A float32 amax with ``fl32(M / amax) == q0`` exactly, or None when no float32 maps there."""
    a = np.float32(np.float64(m) / np.float64(q0))
    for step in (0, 1, -1, 2, -2, 3, -3):
        b = a
        for _ in range(abs(step)):
            b = np.nextafter(b, np.float32(np.inf) if step > 0 else np.float32(0))
        if np.float32(m / b) == q0:
            return b
    return None


def test_pow2_torchao_is_torchaos_rounding_and_pow2_is_not():
    """amax chosen so that ``q0 = fl(448 / amax)`` is ``j`` ulps below ``2**k``: torchao's
    ``exp2(floor(log2(q0)))`` rounds up to ``2**k`` for ``j <= j_max(k)`` (float32 log2 rounds
    to the integer): our ``"pow2_torchao"`` does too, our exact ``"pow2"`` gives ``2**(k-1)``.
    (``j = 4`` is no value of ``fl(448 / a)`` — 448's mantissa 1.75 makes ``M / a`` skip it.)"""
    m = np.float32(448)
    thresholds = R.pow2_torchao_thresholds()
    rules = {s: R.OperandRule("e4m3", R.tensor(), s) for s in ("pow2", "pow2_torchao")}
    differs, checked = 0, 0
    for k in (-100, -60, -26, -3, 1, 2, 3, 5, 10, 20, 30, 40, 48):
        for j in range(0, 7):
            q0 = np.float32(2.0**k * (1 - j * 2.0**-24))
            a = _amax_with_scale(q0, m)
            if a is None:
                assert j == 4, (k, j)
                continue
            assert a >= np.float32(EPS)
            checked += 1
            ours = {s: ref.operand_scales(np.array([a], np.float32), r)[0][0] for s, r in rules.items()}
            theirs = amax_to_scale(torch.tensor(a), torch.float8_e4m3fn, round_scales_to_power_of_2=True)
            also = _round_scale_down_to_power_of_2(torch.tensor(q0))
            assert theirs.dtype == torch.float32 and theirs.item() == also.item()
            assert_bits("pow2_torchao", np.float32(ours["pow2_torchao"]), theirs.numpy(), f"k={k} j={j}")
            e = k - 1 + 127 if j else k + 127  # q0's biased exponent
            rounds_up = bool(j) and q0 >= thresholds[e]
            assert float(ours["pow2"]) == (2.0**(k - 1) if j else 2.0**k), (k, j)
            assert float(theirs.item()) == (2.0**k if rounds_up or not j else 2.0**(k - 1)), (k, j)
            assert (ours["pow2"] != ours["pow2_torchao"]) == rounds_up, (k, j)
            differs += rounds_up
    assert checked >= 60 and differs >= 25, (checked, differs)


def test_tensor_to_scale_is_operand_scales_of_the_absmax():
    """The scale alone (tensor_to_scale) over a row-spread input, per row and per column."""
    x = draw("spread", (40, 72), np.dtype(np.float32), seed=11)
    for gran, dim in ((R.axiswise(), -1), (R.axiswise(), 0), (R.tensor(), None)):
        for pow2 in (False, True):
            rule = R.OperandRule("e4m3", gran, "pow2_torchao" if pow2 else "fp32")
            ao_gran = ScalingGranularity.AXISWISE if dim is not None else ScalingGranularity.TENSORWISE
            theirs = tensor_to_scale(to_torch(x), torch.float8_e4m3fn, scaling_granularity=ao_gran,
                                     axiswise_dim=dim, round_scales_to_power_of_2=pow2)
            axis = -1 if dim is None else dim
            qscale, _ = ref.operand_scales(ref.quantize_operand(x, rule, axis=axis)[1], rule)
            assert_bits("scale", qscale, theirs.numpy().reshape(qscale.shape), f"{gran} dim={dim} pow2={pow2}")


# ------------------------------------------------ Float8Linear(emulate=True)

M_SHAPE, K, N = (32, 64, 96), 96, 128


def _module_inputs(seed=0):
    rng = np.random.default_rng([seed, 2026])
    x = rng.standard_normal(M_SHAPE).astype(np.float32)
    w = (rng.uniform(-1, 1, (N, K)) / math.sqrt(K)).astype(np.float32)
    b = (rng.uniform(-1, 1, N) / math.sqrt(K)).astype(np.float32)
    g = rng.standard_normal(M_SHAPE[:-1] + (N,)).astype(np.float32)
    return x, w, b, g


def _run(layer, x, g):
    tx = to_torch(x).requires_grad_(True)
    out = layer(tx)
    out.backward(to_torch(g))
    return {"out": to_numpy(out), "grad_input": to_numpy(tx.grad), "grad_weight": to_numpy(layer.weight.grad),
            "grad_bias": to_numpy(layer.bias.grad)}


def _torchao_layer(preset, w, b):
    config = Float8LinearConfig.from_recipe_name(preset.lower())
    config = dataclasses.replace(config, emulate=True)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(to_torch(w))
        lin.bias.copy_(to_torch(b))
    model = convert_to_float8_training(torch.nn.Sequential(lin), config=config)
    assert isinstance(model[0], Float8Linear) and model[0].config.emulate
    return model[0]


def _torchao_operands(preset, x, w, g):
    """torchao's dequantized operand of every slot (``data / scale`` in float32), in the
    layouts of ``fp8core.reference.linear_operands``; high-precision slots are the tensors."""
    recipe = R.PRESETS[preset]
    x2, wt, g2 = x.reshape(-1, K), np.ascontiguousarray(w.T), g.reshape(-1, N)
    src = {"X": x2, "Wt": wt, "dY": g2}
    out = {}
    for slot in R.SLOTS:
        tensor, axis, _ = ORIENTATION[slot]
        rule = recipe.rule(slot)
        if rule is None:
            out[slot] = src[tensor]
            continue
        codes, absmax = ref.quantize_operand(src[tensor], rule, axis=axis)
        qscale, _ = ref.operand_scales(absmax, rule)
        qscale = qscale.reshape(-1)
        # scales broadcast along the contraction axis: rows of (M, K) for axis -1, columns for 0
        per = qscale[:, None] if (axis == -1 and qscale.size > 1) else qscale[None, :]
        out[slot] = (rule.format.values256[codes] / per).astype(np.float32)
    return out


def _oracle(ops, bias, dy):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    products = {
        "out": (ops["input"], ops["weight"]),
        "grad_input": (ops["grad_output"], ops["weight_for_grad_input"].T),
        "grad_weight": (ops["grad_output_for_grad_weight"].T, ops["input_for_grad_weight"]),
    }
    oracle = {k: f(a) @ f(b) for k, (a, b) in products.items()}
    oracle["out"] = oracle["out"] + f(bias)
    # the bias gradient: Σ over tokens of dY, i.e. ones(1, M) @ dY
    dy = dy.reshape(-1, dy.shape[-1])
    products["grad_bias"] = (np.ones((1, dy.shape[0]), np.float32), dy)
    oracle["grad_bias"] = (f(products["grad_bias"][0]) @ f(dy)).reshape(-1)
    bounds = {k: compare.accumulation_bound(a, b, oracle[k].reshape(-1, b.shape[-1]), "float32",
                                            "float32").reshape(oracle[k].shape)
              for k, (a, b) in products.items()}
    bounds["out"] = bounds["out"] + 2 * 2.0**-24 * (np.abs(oracle["out"]) + np.abs(f(bias)))  # + bias, rounded
    return oracle, bounds


def _check(name, oracle, bounds, got, factor=1.0):
    for key in ("out", "grad_input", "grad_weight", "grad_bias"):
        o = compare.compare_tolerance(key, oracle[key], got[key].reshape(oracle[key].shape), factor * bounds[key])
        assert o.passed, f"{name}: {o.message}"


@pytest.mark.parametrize("preset", PEER_PRESETS)
def test_float8linear_matches_the_reference_operands(preset):
    """torchao's Float8Linear(emulate=True): within the float32 accumulation bound of the float64
    product of its operands as the reference predicts them (our codes and qscales, decoded by
    division as torchao does); bias gradient = Σ dY."""
    x, w, b, g = _module_inputs()
    got = _run(_torchao_layer(preset, w, b), x, g)
    ops = _torchao_operands(preset, x, w, g)
    # for power-of-two scales those operands are the reference's own dequantized values
    if preset != "TENSORWISE":
        ours = ref.linear_operands(x, w.T, g, R.PRESETS[preset])
        for slot in R.SLOTS:
            assert_bits(slot, ours[slot], ops[slot], preset)
    oracle, bounds = _oracle(ops, b, g)
    _check(f"torchao {preset}", oracle, bounds, got)


def _fp8core_layer(preset, w, b):
    fp8core_torch = pytest.importorskip("fp8core_torch", reason="fp8core_torch is not installed")
    if not hasattr(fp8core_torch, "LinearFP8"):
        pytest.skip("fp8core_torch.LinearFP8 (the recipe layer) has not landed yet")
    layer = fp8core_torch.LinearFP8(K, N, recipe=preset)
    layer.load_state_dict({"weight": to_torch(w), "bias": to_torch(b)})
    return layer


@pytest.mark.parametrize("path", ["kernel", "ops"])
@pytest.mark.parametrize("preset", PEER_PRESETS)
def test_float8linear_agrees_with_fp8core_linear(preset, path, monkeypatch):
    """Same weights, same input and output gradient: torchao's emulated layer and
    fp8core_torch.LinearFP8(recipe=preset) — on its C-kernel path and on its torch-ops path —
    agree on outputs and on the input, weight and bias gradients within twice the float32
    accumulation bound (each is within it of the oracle)."""
    from fp8core import _kernel
    if path == "kernel" and _kernel._LIB is None:
        pytest.skip("fp8core's C kernel is not built (no C compiler at install time)")
    monkeypatch.setattr(_kernel, "ENABLED", path == "kernel")
    x, w, b, g = _module_inputs()
    ours = _run(_fp8core_layer(preset, w, b), x, g)
    theirs = _run(_torchao_layer(preset, w, b), x, g)
    ref_ops = ref.linear_operands(x, w.T, g, R.PRESETS[preset])
    oracle, bounds = _oracle(ref_ops, b, g)
    _check(f"fp8core_torch {preset} vs the reference", oracle, bounds, ours)
    # the pair: torchao's outputs with fp8core's as the centre, twice the bound (plus the
    # division's ulp per TENSORWISE operand, already inside the (K + 2)·2**-24 term)
    pair = {k: np.asarray(v, np.float64) for k, v in ours.items()}
    _check(f"torchao vs fp8core_torch {preset}", {k: pair[k].reshape(oracle[k].shape) for k in oracle},
           bounds, theirs, factor=2.0)
