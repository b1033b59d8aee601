"""The 16-point random Hadamard transform (docs/numerics.md §12): against a float64
matrix built here from its definition (Sylvester H16, TransformerEngine's sign vector,
1/4), bit-identical across numpy / torch / JAX (eager and jit) on special values, and
as the wgrad pre-transform of a recipe in both backends' matmuls."""

from __future__ import annotations

import numpy as np
import pytest

import fp8core
import fp8core.recipe as R
from fp8core import hadamard as H
from fp8core import reference as ref

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import fp8core_jax as J  # noqa: E402
import fp8core_torch as T  # noqa: E402

# TransformerEngine transformer_engine/{pytorch,jax}/.../hadamard: get_wgrad_sign_vector()
TE_SIGNS = [1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1]


def _matrix() -> np.ndarray:
    """diag(signs) @ H16 / 4, H16[i, j] = (-1)**popcount(i & j) (the Sylvester matrix)."""
    h = np.array([[(-1.0) ** bin(i & j).count("1") for j in range(16)] for i in range(16)])
    return np.diag(np.asarray(TE_SIGNS, np.float64)) @ h / 4


def _bits(a) -> np.ndarray:
    """float32 bit patterns, every NaN as one pattern (§12: a NaN's sign and payload are
    the arithmetic's, unspecified)."""
    a = np.array(a.detach() if hasattr(a, "detach") else a, np.float32)
    a[np.isnan(a)] = np.nan
    return a.view(np.int32)


def _specials() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 48)).astype(np.float32)
    x[0, :16] *= np.float32(3e-38)                      # normals and subnormals mixed
    x[1, :16] = np.float32(2.0**-124 - 2.0**-148)       # x/4 would round up to 2**-126
    x[1, 16:32] = -np.float32(2.0**-126)
    x[2, 3] = np.inf
    x[3, 20] = np.nan
    x[4] = np.float32(3e38)                             # sums overflow to inf
    x[5] = -0.0
    x[6, :16] = np.float32(1e-45)                       # the smallest subnormal
    x[7, ::2] = np.float32(65504.0)
    return x


def test_matrix_is_te_definition_and_orthonormal():
    assert list(H.SIGNS) == TE_SIGNS
    np.testing.assert_array_equal(H.rht_matrix(), _matrix())
    np.testing.assert_array_equal(_matrix() @ _matrix().T, np.eye(16))


def test_unit_vectors_give_the_matrix_rows_exactly():
    """Hand-worked: e_i rotates to row i of D·H/4 — ±0.25 entries, no rounding."""
    y = ref.random_hadamard_transform(np.eye(16, dtype=np.float32))
    np.testing.assert_array_equal(y, _matrix().astype(np.float32))
    assert y[3, 0] == -0.25 and y[0, 5] == 0.25                # s_3 = -1; H[0, :] = 1


def test_reference_within_rounding_of_float64_product():
    """Four butterfly stages round four times: |y − v·R| ≤ 4·2**-24·Σ|v|/4 per run."""
    x = np.random.default_rng(0).standard_normal((64, 160)).astype(np.float32)
    y = ref.random_hadamard_transform(x)
    runs = x.astype(np.float64).reshape(64, 10, 16)
    want = (runs @ _matrix()).reshape(64, 160)
    bound = np.repeat(np.abs(runs).sum(-1), 16, axis=-1) * 2.0**-24
    assert np.all(np.abs(y - want) <= bound)
    assert np.abs(y - want).max() > 0                           # the float32 sums do round
    back = (y.astype(np.float64).reshape(64, 10, 16) @ _matrix().T).reshape(64, 160)
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_flush_rules_hand_worked():
    """§12's flushes: a subnormal input is ±0; w·0.25 below 2**-126 is ±0 (tininess
    before rounding: 2**-124 − 2**-148 would round up to 2**-126, and gives 0)."""
    v = np.zeros((1, 16), np.float32)
    v[0, 3] = np.float32(2.0**-124 - 2.0**-148)                # s_3 = -1: w_j = -v_3·H[3, j]
    y = ref.random_hadamard_transform(v)
    assert np.all(y == 0) and np.signbit(y[0, 0]) and not np.signbit(y[0, 1])  # H[3,0]=1, H[3,1]=-1
    v[0, 3] = 0
    v[0, 0] = np.float32(1e-39)                                 # subnormal input: DAZ
    assert np.all(_bits(ref.random_hadamard_transform(v)) == 0)
    v[0, 0] = np.float32(2.0**-124)
    np.testing.assert_array_equal(np.abs(ref.random_hadamard_transform(v)), np.float32(2.0**-126))


@pytest.mark.parametrize("dtype,axis", [("float32", -1)] + [
    pytest.param(d, a, marks=pytest.mark.slow) for d in ("float32", "bfloat16", "float16")
    for a in (-1, 0) if (d, a) != ("float32", -1)])
def test_backends_bit_identical(dtype, axis):
    import ml_dtypes
    x = _specials()
    if dtype == "float16":
        x = np.nan_to_num(x, posinf=np.inf).clip(-65504, 65504).astype(np.float16)
    elif dtype == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16)
    x = x if axis == -1 else np.ascontiguousarray(np.tile(x, (2, 1))[:, :32].T)
    want = _bits(ref.random_hadamard_transform(x, axis=axis))
    tx = torch.from_numpy(x.astype(np.float32)).to(getattr(torch, dtype))
    got = {
        "torch": T.random_hadamard_transform(tx, axis=axis).numpy(),
        "jax": J.random_hadamard_transform(x, axis=axis),
        "jax.jit": jax.jit(J.random_hadamard_transform, static_argnames="axis")(x, axis=axis),
    }
    for name, y in got.items():
        np.testing.assert_array_equal(_bits(y), want, err_msg=name)


@pytest.mark.slow
def test_3d_any_axis():
    x = np.random.default_rng(1).standard_normal((3, 32, 5)).astype(np.float32)
    want = np.moveaxis(ref.random_hadamard_transform(np.moveaxis(x, 1, -1)), -1, 1)
    for y in (ref.random_hadamard_transform(x, axis=1),
              T.random_hadamard_transform(torch.from_numpy(x), axis=1).numpy(),
              J.random_hadamard_transform(x, axis=-2)):
        np.testing.assert_array_equal(_bits(y), _bits(want))


@pytest.mark.parametrize("x, kw, exc, match", [
    (np.ones((4, 24), np.float32), {}, ValueError, r"multiple of 16, got 24"),
    (np.ones((32, 4), np.float32), {"axis": 1}, ValueError, r"along axis=1, .* got 4"),
    (np.float32(1.0), {}, ValueError, "at least one axis"),
    (np.ones((4, 16), np.float32), {"axis": 2}, ValueError, r"axis=2 is out of range for a 2-d"),
    (np.ones((4, 16), np.float32), {"axis": 1.0}, TypeError, "axis must be an int"),
    (np.ones((4, 16), np.int32), {}, TypeError, "floating-point"),
])
def test_errors_same_in_every_backend(x, kw, exc, match):
    for fn, arg in ((ref.random_hadamard_transform, x), (J.random_hadamard_transform, x),
                    (T.random_hadamard_transform, torch.from_numpy(np.asarray(x)))):
        with pytest.raises(exc, match=match):
            fn(arg, **kw)


# ------------------------------------------------------------------ recipe
RHT = R.MXFP4.replace(wgrad_transform="rht16", name="MXFP4_RHT")


def test_recipe_field_validation():
    assert RHT.source("input_for_grad_weight") == RHT.source("grad_output_for_grad_weight") == "quantize"
    assert R.TENSORWISE.replace(wgrad_transform="rht16").source("input_for_grad_weight") == "quantize"
    assert "wgrad_transform=rht16" in RHT.describe()
    with pytest.raises(ValueError, match=r"input_for_grad_weight='reuse' cannot be combined with "
                                         r"wgrad_transform='rht16'"):
        R.BNB_GLOBAL.replace(wgrad_transform="rht16")
    with pytest.raises(ValueError, match=r"wgrad_transform must be None or one of rht16, got 'hadamard'"):
        R.MXFP8.replace(wgrad_transform="hadamard")


def _operands(a_shape, n, recipe, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal(a_shape).astype(np.float32)
    A[..., 3, :] *= 40                                              # an outlier token
    B = rng.standard_normal((a_shape[-1], n)).astype(np.float32)
    g = rng.standard_normal((*a_shape[:-1], n)).astype(np.float32)
    return A, B, g, ref.linear_operands(A, B, g, recipe)


@pytest.mark.slow   # the NVFP4 preset's quick recipe tests run the transform in both matmuls
@pytest.mark.parametrize("a_shape", [(2, 16, 64), (3, 7, 64)], ids=["M=32", "M=21 padded"])
def test_matmul_wgrad_is_product_of_rotated_operands(a_shape):
    """torch and JAX: grad_B == the reference's rotated, quantized wgrad operands'
    product (float32 accumulation bound); out and grad_A bit-identical to the recipe
    without the transform (only wgrad changes)."""
    n = 40
    A, B, g, ops = _operands(a_shape, n, RHT)
    m_pad = H.padded_length(int(np.prod(a_shape[:-1])))
    assert ops["input_for_grad_weight"].shape == (m_pad, a_shape[-1])
    xw, gw = (ops[s].astype(np.float64) for s in R.WGRAD_SLOTS)
    want, bound = xw.T @ gw, np.abs(xw).T @ np.abs(gw) * m_pad * 2.0**-24

    At, Bt = torch.from_numpy(A).requires_grad_(), torch.from_numpy(B).requires_grad_()
    out_t = T.matmul_fp8(At, Bt, recipe=RHT)
    out_t.backward(torch.from_numpy(g))
    out_j, vjp = jax.vjp(lambda a, b: J.matmul_fp8(a, b, recipe=RHT), A, B)
    ga_j, gb_j = vjp(g)
    base_t = [torch.from_numpy(A).requires_grad_(), torch.from_numpy(B).requires_grad_()]
    T.matmul_fp8(*base_t, recipe=R.MXFP4).backward(torch.from_numpy(g))
    for name, gb in (("torch", Bt.grad.numpy()), ("jax", np.asarray(gb_j))):
        assert np.all(np.abs(gb - want) <= bound + 1e-30), name
    np.testing.assert_array_equal(_bits(At.grad), _bits(base_t[0].grad))
    np.testing.assert_array_equal(_bits(np.asarray(ga_j)), _bits(At.grad))
    np.testing.assert_array_equal(_bits(out_t.detach()), _bits(np.asarray(out_j)))


@pytest.mark.slow
def test_high_precision_wgrad_rotation_is_exact_up_to_rounding():
    """Rotating both high-precision wgrad operands leaves dYᵀX (R is orthonormal)."""
    rec = R.LinearRecipe(input=R.OperandRule("e4m3"), weight=R.OperandRule("e4m3"),
                         grad_output=R.OperandRule("e5m2"), wgrad_transform="rht16", name="HP_RHT")
    A, B, g, _ = _operands((4, 12, 32), 24, rec)
    exact = A.reshape(-1, 32).astype(np.float64).T @ g.reshape(-1, 24)
    gb = jax.grad(lambda b: (J.matmul_fp8(A, b, recipe=rec) * g).sum())(B)
    bt = torch.from_numpy(B).requires_grad_()
    (T.matmul_fp8(torch.from_numpy(A), bt, recipe=rec) * torch.from_numpy(g)).sum().backward()
    scale = np.abs(A.reshape(-1, 32)).T.astype(np.float64) @ np.abs(g.reshape(-1, 24))
    for got in (np.asarray(gb), bt.grad.numpy()):
        assert np.all(np.abs(got - exact) <= 64 * 2.0**-24 * scale + 1e-30)
