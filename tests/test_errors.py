"""Bad input and edge input (issue 11 items 5 and 6): feature counts of every integer type
nn.Linear accepts, empty layers, codebook tables, K = 0 / N = 0 gradients, and partial
blocks computed without allocating their padding.

Oracles: nn.Linear / nnx.Linear / plain ``x @ w`` gradients, the numpy reference's
global quantization (a block larger than the tensor is one group, docs/numerics.md §3),
per-block global quantization of hand-made slices, and tracemalloc / ru_maxrss.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import fp8core
import fp8core.recipe as FR
import fp8core_torch as T
from fp8core import reference as R
from fp8core.recipe import OperandRule, flat, tile
from fp8core_torch.config import resolve_spec
from _torch_helpers import pinned_numerics  # noqa: F401  (autouse fixture)

TORCH_CLASSES = [T.LinearFP8, T.LinearFP8Mixed, T.LinearFP8Global]
ARGNAMES = {T.LinearFP8: ("in_features", "out_features"),
            T.LinearFP8Mixed: ("input_features", "output_features"),
            T.LinearFP8Global: ("input_features", "output_features")}
ALLOWED = r"an int >= 0 \(Python or NumPy integer, not bool\)"


# ------------------------------------------------------------ feature counts (torch)
@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kind", [int, np.int64, np.int32, np.uint16], ids=lambda k: k.__name__)
def test_integer_feature_types(cls, kind):
    torch.manual_seed(0)
    ref = nn.Linear(kind(64), kind(128))           # nn.Linear accepts each of these
    layer = cls(kind(64), kind(128))
    assert type(layer.in_features) is int and type(layer.out_features) is int
    assert layer.weight.shape == ref.weight.shape == (128, 64)
    layer.load_state_dict(ref.state_dict())
    want = cls(64, 128)
    want.load_state_dict(ref.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), want(x))


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value, exc, shown", [
    (True, TypeError, "bool: True"),              # nn.Linear takes True as 1: stricter here
    (np.bool_(True), TypeError, "bool: np.True_"),
    (4.0, TypeError, "float: 4.0"),
    (np.float64(4), TypeError, r"float64: np.float64\(4.0\)"),
    ("4", TypeError, "str: '4'"),
    (-1, ValueError, "-1"),
    (np.int64(-3), ValueError, "-3"),
], ids=["bool", "np.bool_", "float", "np.float64", "str", "negative", "np.int64 negative"])
def test_bad_feature_counts_name_the_argument(cls, value, exc, shown):
    first, second = ARGNAMES[cls]
    with pytest.raises(exc, match=f"^{first} must be {ALLOWED}, got {shown}$"):
        cls(value, 4)
    with pytest.raises(exc, match=f"^{second} must be {ALLOWED}, got {shown}$"):
        cls(4, value)


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("k, n", [(0, 3), (3, 0), (0, 0)])
def test_empty_layer_matches_nn_linear(cls, k, n):
    """nn.Linear allows 0 features: output = bias (K = 0) or empty (N = 0), and its
    gradients; the FP8 layer gives the same values bit for bit."""
    ref = nn.Linear(k, n)
    with torch.no_grad():
        ref.bias.copy_(torch.arange(n, dtype=torch.float32) - 1.5)
    layer = cls(k, n)
    layer.load_state_dict(ref.state_dict())
    results = []
    for m in (layer, ref):
        x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = m(x)
        y.backward(torch.ones_like(y) * 2)
        results.append((y, x.grad, m.weight.grad, m.bias.grad))
    for what, got, want in zip(("out", "grad_x", "grad_w", "grad_b"), *results):
        assert got.shape == want.shape and torch.equal(got, want), what
    if k == 0 and n:
        assert torch.equal(results[0][0][0, 0], ref.bias.detach())     # bias-only
        assert torch.equal(results[0][3], torch.full((n,), 12.0))       # 2 * 6 rows


def test_convert_model_with_numpy_feature_counts():
    """A model whose nn.Linear got np.int64 sizes (valid for nn.Linear) converts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(np.int64(64), np.int64(32)), nn.ReLU(),
                          nn.Linear(np.int64(32), np.int64(64)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs in ({"recipe": "ROWWISE"}, {"mode": "global"}):
        converted = T.convert_to_fp8(nn.Sequential(*[m for m in model]), **kwargs)
        want = T.convert_to_fp8(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64)),
                                **kwargs)
        want.load_state_dict(state)
        assert type(converted[0].in_features) is int
        x = torch.randn(5, 64)
        assert torch.equal(converted(x), want(x))


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
def test_wrong_feature_count_names_the_layer_torch(cls):
    layer = cls(8, 4)
    with pytest.raises(ValueError, match=(
            rf"^input has 9 features \(shape \(2, 9\)\), but {cls.__name__}\(in_features=8, "
            rf"out_features=4\) expects 8 in its last dimension$")):
        layer(torch.ones(2, 9))


# --------------------------------------------------------- feature counts (JAX / NNX)
def _jax():
    jax = pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")
    import fp8core_jax.nn as N
    return jax, nnx, N


@pytest.mark.parametrize("name", ["LinearFP8", "LinearFP8Mixed", "LinearFP8Global"])
def test_jax_integer_types_bad_values_and_wrong_features(name):
    jax, nnx, N = _jax()
    import jax.numpy as jnp
    cls = getattr(N, name)
    layer = cls(np.int64(64), np.int32(16), rngs=nnx.Rngs(0))
    ref = nnx.Linear(np.int64(64), np.int32(16), rngs=nnx.Rngs(0))   # nnx accepts them too
    assert type(layer.in_features) is int and layer.kernel.shape == ref.kernel.shape
    assert np.array_equal(np.asarray(layer.kernel[...]), np.asarray(ref.kernel[...]))
    for value, exc, shown in ((True, TypeError, "bool: True"), (4.0, TypeError, "float: 4.0"),
                              (-1, ValueError, "-1")):
        with pytest.raises(exc, match=f"^in_features must be {ALLOWED}, got {shown}$"):
            cls(value, 4, rngs=nnx.Rngs(0))
        with pytest.raises(exc, match=f"^out_features must be {ALLOWED}, got {shown}$"):
            cls(4, value, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=(
            rf"^inputs has 9 features \(shape \(2, 9\)\), but {name}\(in_features=64, "
            r"out_features=16\) expects 64 in its last dimension$")):
        layer(jnp.ones((2, 9)))


@pytest.mark.parametrize("name", ["LinearFP8", "LinearFP8Mixed", "LinearFP8Global"])
@pytest.mark.parametrize("k, n", [(0, 3), (3, 0), (0, 0)])
def test_jax_empty_layer_matches_plain_linear(name, k, n):
    """Oracle: ``x @ kernel + bias`` in jnp (nnx.Linear(0, n) itself raises
    ZeroDivisionError in lecun_normal; the FP8 layer skips drawing an empty kernel)."""
    jax, nnx, N = _jax()
    import jax.numpy as jnp
    layer = getattr(N, name)(k, n, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.arange(n, dtype=jnp.float32) - 1.5
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, k)), jnp.float32)
    g = jnp.full((2, 3, n), 2.0)
    kernel, bias = layer.kernel[...], layer.bias[...]
    y = layer(x)
    grads, grad_x = nnx.grad(lambda m, x: (m(x) * g).sum(), argnums=(0, 1))(layer, x)
    want_y = x @ kernel + bias
    want = jax.grad(lambda x, kk, b: ((x @ kk + b) * g).sum(), argnums=(0, 1, 2))(x, kernel, bias)
    for what, got, exp in (("out", y, want_y), ("grad_x", grad_x, want[0]),
                           ("grad_kernel", grads.kernel[...], want[1]),
                           ("grad_bias", grads.bias[...], want[2])):
        assert got.shape == exp.shape and np.array_equal(np.asarray(got), np.asarray(exp)), what


# ------------------------------------------------------- K = 0 / N = 0 gradients
SHAPES = [((3, 0), (0, 4)), ((3, 5), (5, 0)), ((0, 5), (5, 4)), ((2, 3, 0), (0, 4))]


@pytest.mark.parametrize("a_shape, b_shape", SHAPES, ids=str)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_empty_matmul_gradients_match_jnp(a_shape, b_shape, jit):
    jax, _, _ = _jax()
    import jax.numpy as jnp
    import fp8core_jax as J
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
    b = jnp.asarray(rng.standard_normal(b_shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal((*a_shape[:-1], b_shape[1])), jnp.float32)
    fns = {"TENSORWISE": lambda a, b: J.matmul_fp8(a, b, recipe="TENSORWISE"),
           "ROWWISE": lambda a, b: J.matmul_fp8(a, b, recipe="ROWWISE"),
           "mixed": J.matmul_fp8_mixed, "global": J.matmul_fp8_global}
    want_y, want_vjp = jax.vjp(jnp.matmul, a, b)
    want = want_vjp(g)
    for name, fn in fns.items():
        fn = jax.jit(fn) if jit else fn
        y, vjp = jax.vjp(fn, a, b)
        assert y.shape == want_y.shape and np.array_equal(np.asarray(y), np.asarray(want_y)), name
        for what, got, exp in zip(("grad_A", "grad_B"), vjp(g), want):
            assert got.shape == exp.shape, (name, what)
            assert np.array_equal(np.asarray(got), np.asarray(exp)), (name, what)


@pytest.mark.parametrize("a_shape, b_shape", SHAPES, ids=str)
def test_torch_empty_matmul_gradients_match_torch(a_shape, b_shape):
    """The torch side gives the same shapes and values (every preset)."""
    g = torch.randn(*a_shape[:-1], b_shape[1], generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in [torch.matmul] + [lambda a, b, p=p: T.matmul_fp8(a, b, recipe=p, seed=0) for p in FR.PRESETS]:
        a = torch.randn(a_shape, requires_grad=True)
        b = torch.randn(b_shape, requires_grad=True)
        y = fn(a, b)
        y.backward(g)
        grads.append((y.detach(), a.grad, b.grad))
    for got in grads[1:]:
        for x, want in zip(got, grads[0]):
            assert x.shape == want.shape and torch.equal(x, want)


# ------------------------------------------------------------------ table codebooks
_NO_ZERO = np.linspace(0.1, 1.0, 256).astype(np.float32)
_ZERO_MSG = (r"codebook table must contain a zero entry \(0.0 or -0.0\): zeros, values that "
             r"round to zero and non-finite groups are coded as it; the smallest \|entry\| is 0.1")


def test_table_without_zero_is_a_value_error_at_construction():
    with pytest.raises(ValueError, match=f"^fw_code: {_ZERO_MSG}$"):
        fp8core.resolve_codebook(_NO_ZERO, argname="fw_code")
    with pytest.raises(ValueError, match=f"^fw_format: {_ZERO_MSG}$"):
        T.LinearFP8Mixed(8, 4, fw_format=torch.from_numpy(_NO_ZERO))
    with pytest.raises(ValueError, match=f"^bw_code: {_ZERO_MSG}$"):
        T.matmul_fp8_mixed(torch.ones(2, 8), torch.ones(8, 4), bw_code=torch.from_numpy(_NO_ZERO))
    with pytest.raises(ValueError, match=_ZERO_MSG):
        fp8core.Codebook.from_table(_NO_ZERO)
    ok = _NO_ZERO.copy()
    ok[0] = -0.0                       # a -0.0 entry is a zero entry
    assert fp8core.resolve_codebook(ok).zero_code == 0


def _e4m3_table() -> np.ndarray:
    """256 finite float8_e4m3fn values (the two NaN codes replaced by 0): exactly
    representable as a torch / ml_dtypes float8 tensor."""
    v = fp8core.Codebook.from_format("e4m3").values256.copy()
    v[np.isnan(v)] = 0.0
    return v


def test_float8_tensor_as_table_is_exact_float32():
    table = _e4m3_table()
    t8 = torch.from_numpy(table).to(torch.float8_e4m3fn)
    assert torch.equal(t8.float(), torch.from_numpy(table))      # representable: exact
    assert resolve_spec(t8, argname="fw_code").codebook == fp8core.resolve_codebook(table)
    a = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    b = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    got = T.matmul_fp8_mixed(a, b, fw_code=t8, bw_code=t8.to(torch.float8_e5m2))
    want = T.matmul_fp8_mixed(a, b, fw_code=torch.from_numpy(table),
                              bw_code=torch.from_numpy(table).to(torch.float8_e5m2).float())
    assert torch.equal(got, want)


def test_jax_float8_array_as_table():
    _jax()
    import jax.numpy as jnp
    import fp8core_jax as J
    table = _e4m3_table()
    a = jnp.asarray(np.random.default_rng(3).standard_normal((4, 64)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(4).standard_normal((64, 8)), jnp.float32)
    got = J.matmul_fp8_mixed(a, b, fw_format=jnp.asarray(table).astype(jnp.float8_e4m3fn))
    want = J.matmul_fp8_mixed(a, b, fw_format=table)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match=f"^fw_format: {_ZERO_MSG}$"):
        J.matmul_fp8_mixed(a, b, fw_format=jnp.asarray(_NO_ZERO))


# --------------------------------------------- partial blocks without their padding
_X10 = np.array([-3.0, 0.5, 2.25, -0.125, 7.0, 1e-3, -6.5, 0.0, 3.3, -1.1], np.float32)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("blocksize", [2**26, 2**40], ids=["2**26", "2**40"])
def test_reference_huge_block_is_global_and_allocates_nothing_big(blocksize):
    """A block larger than the tensor is one group (global semantics, §3) of at most 64
    elements (the reference pads a lone partial block to min(blocksize, 64))."""
    want_codes, want_absmax = R.quantize_global(_X10, "e4m3")
    codes, absmax = R.quantize_blockwise(_X10, "e4m3", blocksize)
    assert np.array_equal(codes, want_codes) and np.array_equal(absmax, want_absmax.reshape(1))
    assert np.array_equal(R.dequantize_blockwise(codes, absmax, "e4m3", blocksize),
                          R.dequantize_global(want_codes, want_absmax, "e4m3"))
    x2 = _X10.reshape(2, 5)
    rule = OperandRule("e4m3", flat(blocksize))
    c, a = R.quantize_operand(x2, rule)
    assert np.array_equal(c.reshape(-1), want_codes)
    assert np.array_equal(R.dequantize_operand(c, a, rule).reshape(-1),
                          R.dequantize_global(want_codes, want_absmax, "e4m3"))
    peak = _peak_bytes(lambda: R.dequantize_blockwise(*R.quantize_blockwise(_X10, "e4m3", blocksize),
                                                      "e4m3", blocksize))
    assert peak < 1 << 20, f"peak {peak} bytes for 10 elements"
    peak = _peak_bytes(lambda: R.fake_quantize_operand(x2, rule, axis=0))
    assert peak < 1 << 20, f"peak {peak} bytes for 10 elements (operand)"


@pytest.mark.parametrize("tile", [(2**40, 2**40), (2**40, 2), (3, 2**26)],
                         ids=["2**40x2**40", "2**40x2", "3x2**26"])
def test_reference_huge_tiles_allocate_nothing_big(tile):
    """A tile far larger than the array is clamped in the reference's layout (its zero
    padding changes no absmax): the groups equal those of the tile cut to the array, by
    hand — global for one tile, else per band / per column group — with bounded memory."""
    x = _X10.reshape(2, 5)
    tr, tc = tile
    codes, absmax = R.quantize_tiles(x, "e4m3", tr, tc)
    gr, gc = absmax.shape
    assert (gr, gc) == (-(-2 // tr), -(-5 // tc))
    for i in range(gr):
        for j in range(gc):
            sl = (slice(i * tr, (i + 1) * tr), slice(j * tc, (j + 1) * tc))
            c, a = R.quantize_global(x[sl], "e4m3")
            assert np.array_equal(codes[sl], c) and absmax[i, j] == a
            want = R.fake_quantize(x[sl], "e4m3")
            got = R.dequantize_tiles(codes, absmax, "e4m3", tr, tc)[sl]
            assert np.array_equal(got, want)
    peak = _peak_bytes(lambda: R.dequantize_tiles(*R.quantize_tiles(x, "e4m3", tr, tc), "e4m3",
                                                  tr, tc))
    assert peak < 1 << 20, f"peak {peak} bytes for 10 elements"


def test_reference_partial_last_block_is_its_own_group():
    """10 elements, blocksize 4: groups [0:4], [4:8], [8:10], each quantized alone."""
    codes, absmax = R.quantize_blockwise(_X10, "e5m2", 4)
    for i, sl in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
        c, a = R.quantize_global(_X10[sl], "e5m2")
        assert np.array_equal(codes[sl], c) and absmax[i] == a


def test_jax_xla_path_huge_block_is_global(monkeypatch):
    _jax()
    import jax.numpy as jnp
    import fp8core_jax as J
    from fp8core import _kernel
    monkeypatch.setattr(_kernel, "ENABLED", False)       # the XLA body (what changed)
    x = jnp.asarray(_X10)
    want_codes, want_absmax = R.quantize_global(_X10, "e4m3")
    for blocksize in (4, 2**40):
        codes, absmax = J.quantize_blockwise(x, "e4m3", blocksize)
        rc, ra = R.quantize_blockwise(_X10, "e4m3", blocksize)
        assert np.array_equal(np.asarray(codes), rc) and np.array_equal(np.asarray(absmax), ra)
        y = J.dequantize_blockwise(codes, absmax, "e4m3", blocksize)
        assert np.array_equal(np.asarray(y), R.dequantize_blockwise(rc, ra, "e4m3", blocksize))
        assert np.array_equal(np.asarray(J.fake_quantize(x, "e4m3", blocksize)),
                              R.fake_quantize(_X10, "e4m3", blocksize))
    assert np.array_equal(np.asarray(codes), want_codes)
    x2 = x.reshape(2, 5)
    rule = OperandRule("e4m3", flat(2**40))
    for axis in (-1, 0):
        c, a = J.quantize_operand(x2, rule, axis=axis)
        rc, ra = R.quantize_operand(_X10.reshape(2, 5), rule, axis=axis)
        assert np.array_equal(np.asarray(c), rc) and np.array_equal(np.asarray(a), ra), axis
        assert np.array_equal(np.asarray(J.dequantize_operand(c, a, rule, axis=axis)),
                              R.dequantize_operand(rc, ra, rule, axis=axis))
        assert np.array_equal(np.asarray(J.fake_quantize_operand(x2, rule, axis=axis)),
                              R.fake_quantize_operand(_X10.reshape(2, 5), rule, axis=axis))
    # a 2**40 x 2**40 tile holds the whole array: global semantics (one absmax), unpadded
    rule = OperandRule("e4m3", tile(2**40))
    c, a = J.quantize_operand(x2, rule)
    assert np.array_equal(np.asarray(c).reshape(-1), want_codes) and float(a.reshape(())) == want_absmax
    assert np.array_equal(np.asarray(J.dequantize_operand(c, a, rule)).reshape(-1),
                          R.dequantize_global(want_codes, want_absmax, "e4m3"))


def test_jax_xla_path_huge_block_memory_bounded():
    """Peak RSS of a fresh process: 10 elements with blocksize 2**26 cost +768 MiB before
    (the padding and its intermediates); now < 128 MiB over a warm-up with blocksize 4."""
    _jax()
    code = textwrap.dedent("""
        import resource, numpy as np, jax.numpy as jnp
        import fp8core_jax as J
        x = jnp.asarray(np.arange(10, dtype=np.float32))
        for bs in (4, 8):   # warm-up: imports, compilation of the same code path
            J.dequantize_blockwise(*J.quantize_blockwise(x, "e4m3", bs), "e4m3", bs).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        bs = 2**26
        J.dequantize_blockwise(*J.quantize_blockwise(x, "e4m3", bs), "e4m3", bs).block_until_ready()
        J.fake_quantize(x, "e4m3", bs).block_until_ready()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = dict(os.environ, FP8CORE_KERNEL="0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    delta_mib = int(out.stdout.split()[-1])
    assert delta_mib < 128, f"+{delta_mib} MiB peak RSS for 10 elements with blocksize 2**26"
