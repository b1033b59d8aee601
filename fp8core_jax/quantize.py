"""JAX quantizers: the numerics contract (docs/numerics.md §3–§4, §9) in jax.numpy.

Blockwise / global quantizers, and the GEMM-operand quantizers of recipes
(:func:`quantize_operand` & co.: every granularity of :mod:`fp8core.recipe` and
every scale rule), all executing the same jitted group math.

Every function here matches :mod:`fp8core.reference` bit for bit on codes
(uint8), absmax (float32 bits; NaN stored as ``0x7FC00000``) and dequantized
values, jitted or eager, on XLA:CPU (which flushes float32 subnormals: the
contract's scale floor makes the results independent of that).

Codebooks and block sizes are static: a :class:`fp8core.Codebook` is frozen and
hashable, so it is passed to ``jax.jit`` as a static argument; the numpy
constants derived from it (value table, thresholds) are built once per codebook
(:func:`_constants`, an ``lru_cache`` of a pure function).

On CPU, native codebooks and float32 / float16 / bfloat16 data go through fp8core's
fused C kernel as an XLA custom call (:mod:`fp8core_jax._ffi`; the torch backend's
kernel, same bits); everything else — other platforms, tables, float64, or
``FP8CORE_KERNEL=0`` — runs the jax.numpy body below. Under ``jit`` with sharded
operands, a GEMM operand whose groups are tiles (every granularity but flat blocks
running across rows) is not all-gathered when each shard holds whole tiles or each tile
whole shards (then its absmax is all-reduced), on either path: the jax.numpy body is
written so the SPMD partitioner keeps it sharded (:func:`_tiles_to_groups`,
:func:`_tile_key`), and the custom calls carry a sharding rule
(:mod:`fp8core_jax._partition`).

XLA hazards and how this module meets them (each is pinned by a test in
``tests/test_jax_quantize.py``):

* ``x / c`` → ``x * (1/c)``: the contract never divides by a constant. The only
  division is ``qscale = M / a`` (a constant divided by the per-group absmax);
  ``dscale = a * INV_M`` is written as a multiplication.
* float32 subnormals are flushed on CPU: the scale floor makes every subnormal
  input quantize to a signed zero and every non-zero output a normal. MX rules
  (§11) have no scale floor — a subnormal input scaled by up to 2**126 has a
  non-zero code, small scale bytes decode to subnormals, rceil's scale of an inf
  block is 2**-127 — so they apply their powers of two to the float32 bits
  (:func:`_mul_pow2`) and find the scale byte by integer compares.
* ``f32 → f8 → f32`` may be removed as "excess precision": the fused
  fake-quantize path never converts to an 8-bit type (it rounds with integer
  arithmetic on the float32 bits, :func:`_rne_values`), and the code paths go
  through a ``bitcast_convert_type`` to uint8.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fp8core
import fp8core.mx
import fp8core.random
import fp8core.nvfp4
import fp8core.recipe
from fp8core.blocks import OperandPlan, TilePlan, operand_matrix, plan_operand, plan_tiles
from fp8core import _kernel, _validation
from fp8core.codebooks import CANONICAL_NAN_BITS, F32_SMALLEST_NORMAL, Codebook
from fp8core_jax import _ffi, _partition

__all__ = [
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_global",
    "dequantize_global",
    "fake_quantize",
    "quantize_operand",
    "dequantize_operand",
    "fake_quantize_operand",
    "quantize_mx",
    "dequantize_mx",
    "NATIVE_CAST_FORMATS",
]

#: 8-bit formats rounded with XLA's own ``convert`` (round half to even). Each was
#: checked exhaustively against ml_dtypes over every float32 in [−M, M]
#: (``tests/test_jax_exhaustive.py``, marked slow). Every other codebook (sub-byte
#: formats, tables) rounds with ``searchsorted(thresholds)``, the contract's search form.
NATIVE_CAST_FORMATS: frozenset[str] = frozenset(fp8core.NATIVE_8BIT_FORMATS)

_CANONICAL_NAN = float(CANONICAL_NAN_BITS.view(np.float32))


class _Constants(NamedTuple):
    """Host constants of one codebook (read-only numpy arrays / Python scalars)."""

    native_dtype: Any          # jnp dtype for XLA's convert, or None → search form
    rne: tuple[int, int, bool] | None  # (mantissa bits, log2 min normal, has −0): integer RNE
    values256: np.ndarray      # f32[256]: value of every uint8 code
    thresholds: np.ndarray     # f32[n-1]: searchsorted decision points
    sorted_codes: np.ndarray   # u8[n]: code of each sorted entry
    sorted_code_values: np.ndarray  # f32[n]: values256[sorted_codes]
    m: np.float32
    inv_m: np.float32
    floor: np.float32
    ceiling: np.float32
    zero_code: int
    negzero_code: int | None
    fill_code: int
    format_name: str | None    # the format's name (MX byte tables), None for tables


@functools.lru_cache(maxsize=None)
def _constants(codebook: Codebook) -> _Constants:
    native = None
    if codebook.is_native and codebook.format.name in NATIVE_CAST_FORMATS:
        native = jnp.dtype(getattr(jnp, codebook.format.jax_dtype))
    rne = None
    if codebook.is_native:
        fmt = codebook.format
        rne = (int(fmt.mantissa_bits), int(np.log2(fmt.smallest_normal)), bool(fmt.has_negative_zero))
    return _Constants(
        native_dtype=native,
        rne=rne,
        values256=codebook.values256,
        thresholds=codebook.thresholds,
        sorted_codes=codebook.sorted_codes,
        sorted_code_values=codebook.values256[codebook.sorted_codes],
        m=np.float32(codebook.max),
        inv_m=np.float32(codebook.inv_max),
        floor=np.float32(codebook.scale_floor),
        ceiling=np.float32(codebook.scale_ceiling),
        zero_code=int(codebook.zero_code),
        negzero_code=codebook.negzero_code,
        fill_code=int(codebook.fill_code),
        format_name=None if codebook.format is None else codebook.format.name,
    )


# --------------------------------------------------------------- validation
def _check_x(x: Any, argname: str = "x") -> jax.Array:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = jnp.asarray(x)
        dtype = x.dtype
    _validation.check_float_dtype(np.dtype(dtype).name, argname=argname)
    return x


def _dtype_name(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}") from None
    _validation.check_float_dtype(name, argname="dtype")
    return name


def _resolve_named(codebook: Any, argname: str) -> Codebook:
    """A hashable Codebook from a name, Codebook or table; errors name ``argname``."""
    if isinstance(codebook, jax.core.Tracer):
        raise TypeError(f"{argname}: a codebook table must be concrete (numpy), not a traced array")
    if isinstance(codebook, jax.Array):  # table given as a jax array: make it host data
        codebook = np.asarray(codebook)
    return fp8core.resolve_codebook(codebook, argname=argname)


def _resolve(codebook: Any) -> Codebook:
    return _resolve_named(codebook, "codebook")


# ------------------------------------------------------------- group math
def _absmax_parts(n_groups: int, size: int) -> int:
    """Slices per group for a two-stage absmax (1 = one stage).

    XLA:CPU runs a reduction on as many threads as it has output rows, so a
    single group (global quantization) of 16M elements is reduced by one
    thread (~4.2 ms vs ~1.9 ms in 256 slices). Only exact divisions are used
    (no padding pass); max and OR are exact in any order, so the bits do not
    depend on the split.
    """
    if n_groups >= 64 or size < (1 << 16):
        return 1
    for parts in (256, 128, 64, 32, 16, 8, 4, 2):
        if size % parts == 0 and size // parts >= 1024:
            return parts
    return 1


def _per_group(a: jax.Array, groups: jax.Array) -> jax.Array:
    """A per-group array broadcast against its groups' elements: ``(n,)`` against
    ``(n, size)``, the grid ``(gr, gc)`` against the tile view ``(gr, gc, th, tw)``."""
    return a.reshape(a.shape + (1,) * (groups.ndim - a.ndim))


# Inner chunk of a tile (rows, columns) that the one-pass variadic reduction covers in the
# tile view; the chunks' partial maxima are reduced by one integer max (_tile_key). A shard
# that is not a whole number of chunks regroups (all-gathers) the array: 32 columns keep a
# tensor-parallel shard of 192 columns (qkv 768 / 4) local, which 128 did not.
_TILE_CHUNK = (8, 32)
_NAN_KEY = 0x7FFFFFFF  # above every |x| bit pattern, NaN's included


def _group_absmax(groups: jax.Array) -> jax.Array:
    """§3.2 on a (n_groups, size) float32 array, or on the tile view
    ``(gr, gc, th, tw)`` of :func:`_tiles_to_groups` (absmax ``(gr, gc)``):
    NaN-propagating max |x|.

    One variadic reduction yields ``(max |x|, any(isnan(x)))`` per group; a NaN
    flag gives the canonical NaN whatever the float max did with the NaN (XLA's
    max may propagate or drop it, and a float all-reduce max of a sharded array
    drops it — found by tests/test_jax_sharding.py). Without NaN the float max
    is exact in any reduction order; ±inf gives +inf. A maximum below the
    smallest normal is stored as +0: with subnormals flushed (XLA:CPU) the max
    may return 0 or any subnormal, both become +0. Zeros are +0 (``abs``).
    """
    if groups.shape[-1] == 0:
        return jnp.zeros(groups.shape[:-1], jnp.float32)
    # One variadic reduction: (max |x|, any NaN). XLA:CPU emits it as a single
    # fused pass over the input; a lone integer max is rewritten into a
    # reduce-window tree whose input (|x| bits, 4 bytes/element) is
    # materialised first (~3.5x slower on 16M elements), and a lone float max
    # goes to a library kernel that drops NaN and materialises |x| unless the
    # shapes line up. The float max is only trusted where no NaN is present
    # (max of non-NaN floats is exact in any order); the NaN flag is an exact
    # boolean OR in any order. Both are then folded into one int32 key (_key),
    # whose max — also across shards — is the absmax.
    if groups.ndim == 4:
        return _absmax_of_key(_tile_key(groups))
    n_groups, size = groups.shape
    parts = _absmax_parts(n_groups, size)
    if parts > 1:  # few large groups: reduce `parts` slices of each in parallel first
        sl = groups.reshape(n_groups * parts, size // parts)
        top, has_nan = _mag_nan(jnp.abs(sl), jnp.isnan(sl), (1,))
        top, has_nan = _mag_nan(top.reshape(n_groups, parts), has_nan.reshape(n_groups, parts), (1,))
    else:
        top, has_nan = _mag_nan(jnp.abs(groups), jnp.isnan(groups), (1,))
    return _absmax_of_key(_key(top, has_nan))


def _mag_nan(mag: jax.Array, nan: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(max mag, any nan)`` over ``axes``: one variadic reduction (one fused pass)."""
    return lax.reduce((mag, nan), (jnp.float32(0), np.bool_(False)),
                      lambda p, q: (jnp.maximum(p[0], q[0]), p[1] | q[1]), axes)


def _key(top: jax.Array, has_nan: jax.Array) -> jax.Array:
    """An int32 whose max is the absmax: the bits of ``|top|`` (ordered as the floats
    they are, for non-negative floats), :data:`_NAN_KEY` for a NaN group. An integer max
    is exact and NaN-propagating in any order, also as a cross-device all-reduce."""
    bits = lax.bitcast_convert_type(top, jnp.int32) & jnp.int32(0x7FFFFFFF)
    return jnp.where(has_nan, jnp.int32(_NAN_KEY), bits)


def _tile_key(groups: jax.Array) -> jax.Array:
    """:func:`_key` per tile of the tile view ``(gr, gc, th, tw)``, shape ``(gr, gc)``: the
    variadic reduction over chunks of at most 8 rows x 32 columns of each tile, then an
    integer max of the chunks' keys. A variadic reduction over a sharded axis is
    partitioned as an all-gather of the per-shard partials; a plain max becomes an
    all-reduce, so a tile that spans shards (per-tensor, per-column over sharded tokens)
    costs an all-reduce of one int32 per tile. Shards whose size is a multiple of the
    chunk keep the first stage local; the second runs on 1/256 of the data."""
    gr, gc, th, tw = groups.shape
    thi, twi = np.gcd(th, _TILE_CHUNK[0]), np.gcd(tw, _TILE_CHUNK[1])
    v = groups.reshape(gr, gc, th // thi, thi, tw // twi, twi)
    return jnp.max(_key(*_mag_nan(jnp.abs(v), jnp.isnan(v), (3, 5))), axis=(2, 3))


def _absmax_of_key(key: jax.Array) -> jax.Array:
    """The stored absmax of a :func:`_key`: +0 below the smallest normal, the canonical
    NaN for a NaN group."""
    top = jnp.where(key < jnp.int32(0x00800000), jnp.int32(0), key)           # subnormal → +0
    top = jnp.where(top > jnp.int32(0x7F800000), jnp.int32(CANONICAL_NAN_BITS.view(np.int32)), top)
    return lax.bitcast_convert_type(top, jnp.float32)


def _group_scales(absmax: jax.Array, c: _Constants, scale: str = "fp32"
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """§3.3 / §9.2: ``(finite, qscale, dscale)`` under the scale rule ``scale``.

    ``a = clip(absmax, FLOOR, CEIL)``; ``q0 = fl(M / a)`` (a division of a
    constant by a variable — XLA does not turn it into a reciprocal).
    ``"fp32"``: ``qscale = q0``, ``dscale = fl(a * INV_M)`` (a multiplication by
    the host constant ``fl(1/M)``, never a division by M). ``"pow2"``: ``qscale``
    = the largest power of two ≤ ``q0`` (its exponent bits ``E``; ``q0`` is a
    float32 normal for any absmax, by the clip); ``"pow2_torchao"``: that power
    of two, or the next one when ``q0 ≥ fp8core.recipe.pow2_torchao_thresholds()[E]``
    (torchao's float32 ``exp2(floor(log2(q0)))``); both: ``dscale = 1/qscale``
    exactly, written as exponent bits (no division). Non-finite groups:
    ``qscale = 0`` (unused), ``dscale = NaN``.

    MX rules (§11, :func:`_mx_scales`): ``qscale`` and ``dscale`` are int32 exponents
    ``k`` of the powers of two ``2**k`` (a float32 ``2**k`` may be subnormal, which
    XLA:CPU flushes), applied by :func:`_scale_and_saturate` / :func:`_unscale`;
    ``finite`` is ``byte != 255``.
    """
    if scale in fp8core.mx.MX_SCALE_RULES:
        return _mx_scales(absmax, c, scale)
    if scale in fp8core.nvfp4.ENGINE_RULES:        # §13.5: r, t·s over the whole grid
        return _nvfp4_scales(absmax, scale)
    finite = jnp.isfinite(absmax)
    a = jnp.clip(jnp.where(finite, absmax, jnp.float32(1)), c.floor, c.ceiling)
    q0 = jnp.float32(c.m) / a
    if scale == "fp32":
        qscale, dscale = q0, a * jnp.float32(c.inv_m)
    elif scale in ("pow2", "pow2_torchao"):
        e = (lax.bitcast_convert_type(q0, jnp.uint32) >> 23) & jnp.uint32(0xFF)
        if scale == "pow2_torchao":
            thresholds = jnp.asarray(fp8core.recipe.pow2_torchao_thresholds())
            e = e + (q0 >= thresholds[e.astype(jnp.int32)]).astype(jnp.uint32)
        qscale = lax.bitcast_convert_type(e << 23, jnp.float32)
        dscale = lax.bitcast_convert_type((jnp.uint32(254) - e) << 23, jnp.float32)
    else:
        raise ValueError(f"unknown scale rule {scale!r}; expected one of "
                         f"{', '.join(fp8core.recipe.SCALE_RULES)}")
    qscale = jnp.where(finite, qscale, jnp.float32(0))
    dscale = jnp.where(finite, dscale, jnp.float32(np.nan))
    return finite, qscale, dscale


def _mx_tables(format_name: str, mode: str) -> tuple[np.ndarray, ...]:
    """Host tables of one MX element format and mode: :func:`fp8core.mx.binade_table`
    (``base``, ``step``, ``qexp``, ``dexp``, int32[256] each)."""
    return fp8core.mx.binade_table(format_name, mode)


def _mx_bytes(absmax: jax.Array, c: _Constants, scale: str) -> jax.Array:
    """§11: the e8m0 byte (int32) of each §3.2 absmax (+0, positive, +inf or NaN): its
    float32 bits looked up in :func:`fp8core.mx.byte_table` (per binade,
    :func:`_mx_tables`; integer compares — non-negative floats order like their bits, and
    no float32-subnormal arithmetic is involved); NaN → 255."""
    base, step, _, _ = _mx_tables(c.format_name, fp8core.mx.mode_of(scale))
    bits = lax.bitcast_convert_type(absmax, jnp.int32) & jnp.int32(0x7FFFFFFF)
    e = bits >> 23
    b = jnp.asarray(base)[e] + (bits >= jnp.asarray(step)[e]).astype(jnp.int32)
    return jnp.where(bits > jnp.int32(0x7F800000), jnp.int32(fp8core.mx.E8M0_NAN), b)


def _mx_scales(absmax: jax.Array, c: _Constants, scale: str
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(finite, qexp, dexp)`` of an MX rule: ``finite = byte != 255`` and the int32
    exponents of :func:`fp8core.mx.byte_scales`' ``qscale`` and ``dscale``."""
    _, _, qexp, dexp = _mx_tables(c.format_name, fp8core.mx.mode_of(scale))
    b = _mx_bytes(absmax, c, scale)
    return b != fp8core.mx.E8M0_NAN, jnp.asarray(qexp)[b], jnp.asarray(dexp)[b]


def _jnv():
    """:mod:`fp8core_jax.nvfp4` (imported late: it imports this module)."""
    from fp8core_jax import nvfp4
    return nvfp4


def _nvfp4_scales(absmax: jax.Array, scale: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(finite, r, dscale)`` of an NVFP4 rule over one operand's whole absmax grid."""
    return _jnv().engine_scales(absmax, fp8core.nvfp4.ENGINE_RULES[scale])


def _mul_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """``x · 2**k`` for float32 ``x`` and int32 ``k`` (broadcast), by integer arithmetic on
    the bits, so that float32 subnormals — which XLA:CPU flushes to zero as operands and as
    results — are neither read nor produced as zeros.

    A normal or subnormal ``x`` (a subnormal's significand converted to float32 is exact,
    ``|x| · 2**149``) is renormalised and its exponent moved by ``k``: a normal result is
    exact; an exponent above the float32 range gives ±inf (the rounded product's
    overflow); a subnormal result is the significand shifted into the subnormal field —
    exact whenever the product is a float32 (MX decoding: element values have ≤ 3
    mantissa bits and are ≥ 2**-16, and ``k ≥ -127``), truncated toward zero otherwise
    (MX scaling: such a product is far below half the smallest element-format subnormal,
    so it rounds to ±0 either way). ±0, ±inf and NaN are returned unchanged; the sign is
    always kept.
    """
    b = lax.bitcast_convert_type(x, jnp.uint32)
    sign = b & jnp.uint32(0x80000000)
    a = b & jnp.uint32(0x7FFFFFFF)
    e = (a >> 23).astype(jnp.int32)
    sub = e == 0
    an = jnp.where(sub, lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32), a)
    en = (an >> 23).astype(jnp.int32) - jnp.where(sub, jnp.int32(149), jnp.int32(0)) + k
    frac = an & jnp.uint32(0x7FFFFF)
    normal = (jnp.clip(en, 1, 254).astype(jnp.uint32) << 23) | frac
    shift = jnp.clip(1 - en, 0, 31).astype(jnp.uint32)
    subnormal = (frac | jnp.uint32(0x800000)) >> shift
    r = jnp.where(en >= 255, jnp.uint32(0x7F800000), jnp.where(en >= 1, normal, subnormal))
    r = jnp.where((a == 0) | (e == 255), a, r)
    return lax.bitcast_convert_type(r | sign, jnp.float32)


def _scale_and_saturate(groups: jax.Array, qscale: jax.Array, c: _Constants,
                        scale: str = "fp32") -> jax.Array:
    """§3.4: ``clip(fl(x * qscale), -M, M)`` — the clamp precedes any cast. MX rules:
    ``qscale`` is the exponent ``k`` and the product :func:`_mul_pow2` (a float32-subnormal
    ``x`` scaled by up to ``2**126`` is a normal with a non-zero code; ``2**-127``, rceil's
    scale of an inf block, is itself subnormal)."""
    if scale in fp8core.mx.MX_SCALE_RULES:
        s = _mul_pow2(groups, _per_group(qscale, groups))
    else:
        s = groups * _per_group(qscale, groups)
    return jnp.clip(s, -jnp.float32(c.m), jnp.float32(c.m))


def _unscale(values: jax.Array, finite: jax.Array, dscale: jax.Array, scale: str) -> jax.Array:
    """§4.3: ``fl(v * dscale)`` per group (``dscale`` NaN in non-finite groups). MX rules:
    ``dscale`` is the exponent ``k``, the product :func:`_mul_pow2` (exact, subnormal
    results included, as the reference's), NaN where the byte is 255."""
    if scale in fp8core.mx.MX_SCALE_RULES:
        return jnp.where(_per_group(finite, values), _mul_pow2(values, _per_group(dscale, values)),
                         jnp.float32(np.nan))
    return values * _per_group(dscale, values)


def _search_index(s: jax.Array, c: _Constants) -> jax.Array:
    """Index into the sorted entries: number of thresholds strictly below ``s``."""
    return jnp.searchsorted(jnp.asarray(c.thresholds), s, side="left").astype(jnp.int32)


def _round_to_codes(s: jax.Array, c: _Constants) -> jax.Array:
    """§3.5: codes of float32 values already clamped to [−M, M]."""
    if c.native_dtype is not None:
        return lax.bitcast_convert_type(s.astype(c.native_dtype), jnp.uint8)
    codes = jnp.asarray(c.sorted_codes)[_search_index(s, c)]
    if c.negzero_code is not None:  # −0 rule for native formats rounded by search
        codes = jnp.where((codes == c.zero_code) & jnp.signbit(s), jnp.uint8(c.negzero_code), codes)
    return codes


def _decode(codes: jax.Array, c: _Constants) -> jax.Array:
    """§4.2: float32 value of each uint8 code (NaN for codes without a value)."""
    if c.native_dtype is not None:
        return lax.bitcast_convert_type(codes, c.native_dtype).astype(jnp.float32)
    return jnp.asarray(c.values256)[codes.astype(jnp.int32)]


def _rne_values(s: jax.Array, mant: int, emin: int, negzero: bool) -> jax.Array:
    """Round float32 ``s`` (finite, |s| ≤ M) to a binary format with ``mant``
    mantissa bits and smallest normal ``2**emin``, half to even, in float32.

    Normal range: integer round-half-to-even on the bit pattern (drop
    ``23 - mant`` bits; a carry into the exponent is the next binade).
    Subnormal range (|s| < 2**emin): the grid is uniform, ``2**(emin - mant)``;
    scale by a power of two (exact), ``round`` half to even, scale back (exact).
    The sign is OR-ed back, so negatives rounding to zero give −0; formats
    without −0 (fnuz) get +0. No float8 ``convert`` is involved, so XLA has no
    reduced-precision round trip to remove; exhaustively checked against
    ml_dtypes (tests/test_jax_exhaustive.py).
    """
    b = lax.bitcast_convert_type(s, jnp.uint32)
    sign = b & jnp.uint32(0x80000000)
    a = b & jnp.uint32(0x7FFFFFFF)
    d = 23 - mant
    r_norm = (a + jnp.uint32((1 << (d - 1)) - 1) + ((a >> d) & jnp.uint32(1))) & jnp.uint32(
        (0xFFFFFFFF << d) & 0xFFFFFFFF)
    mag = lax.bitcast_convert_type(a, jnp.float32)
    sub = jnp.round(mag * jnp.float32(2.0 ** (mant - emin))) * jnp.float32(2.0 ** (emin - mant))
    r_sub = lax.bitcast_convert_type(sub, jnp.uint32)
    small = a < jnp.uint32(int(np.float32(2.0**emin).view(np.uint32)))
    r = jnp.where(small, r_sub, r_norm)
    if negzero:
        r = r | sign
    else:
        r = jnp.where(r == 0, r, r | sign)
    return lax.bitcast_convert_type(r, jnp.float32)


def _round_to_values(s: jax.Array, c: _Constants) -> jax.Array:
    """§3.5 + §4.2 fused: the float32 value of the code ``s`` rounds to.

    Native formats: :func:`_rne_values` (pure integer/float32 arithmetic that
    fuses with the scaling). Tables: search, then the value table.
    """
    if c.rne is not None:
        return _rne_values(s, *c.rne)
    return _decode(_round_to_codes(s, c), c)


def _quantize_groups(groups: jax.Array, c: _Constants, scale: str = "fp32",
                     absmax: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(codes, absmax)`` of the groups; ``absmax`` given: the groups' absmax computed
    elsewhere (a reduced amax, §10.2; a group spanning shards, fp8core_jax._partition)."""
    if absmax is None:
        absmax = _group_absmax(groups)                                 # §3.2
    if scale in fp8core.nvfp4.ENGINE_RULES:                            # §13.5
        finite, r, _ = _nvfp4_scales(absmax, scale)
        return _jnv().engine_quantize(groups, _per_group(r, groups),
                                      _per_group(finite, groups)), absmax
    finite, qscale, _ = _group_scales(absmax, c, scale)                # §3.3
    s = _scale_and_saturate(groups, qscale, c, scale)                  # §3.4
    s = jnp.where(_per_group(finite, groups), s, jnp.float32(0))
    codes = _round_to_codes(s, c)                                      # §3.5
    codes = jnp.where(_per_group(finite, groups), codes, jnp.uint8(c.fill_code))  # §3.6
    return codes, absmax


def _dequantize_groups(codes: jax.Array, absmax: jax.Array, c: _Constants,
                       scale: str = "fp32") -> jax.Array:
    if scale in fp8core.nvfp4.ENGINE_RULES:                            # §13.5
        _, _, dscale = _nvfp4_scales(absmax, scale)
        return _jnv().engine_decode(codes, _per_group(dscale, codes))
    finite, _, dscale = _group_scales(absmax, c, scale)                # §4.1
    return _unscale(_decode(codes, c), finite, dscale, scale)          # §4.2–4.3


def _fake_groups(groups: jax.Array, c: _Constants, scale: str = "fp32",
                 absmax: jax.Array | None = None) -> jax.Array:
    """dequantize(quantize(groups)) without materialising codes.

    Same float32 operations: non-finite groups get ``dscale = NaN`` so every
    element becomes NaN, as the fill code dequantizes in §4.
    """
    if absmax is None:
        absmax = _group_absmax(groups)
    if scale in fp8core.nvfp4.ENGINE_RULES:                            # §13.5
        codes, _ = _quantize_groups(groups, c, scale, absmax)
        return _dequantize_groups(codes, absmax, c, scale)
    finite, qscale, dscale = _group_scales(absmax, c, scale)
    s = _scale_and_saturate(groups, qscale, c, scale)
    return _unscale(_round_to_values(s, c), finite, dscale, scale)


def _cast_out(y: jax.Array, dtype: Any) -> jax.Array:
    """§4.4: the one final cast of float32 results, round to nearest even.

    bfloat16 is rounded with integer arithmetic on the float32 bits (XLA:CPU's
    own f32→bf16 convert is ~1.7x slower here); identical bits for every finite
    value and ±inf (overflow rounds to inf, as IEEE RNE does); NaN stays NaN
    (canonical payload — NaN payloads are unspecified by the contract). Inputs
    are float32 normals, zeros, ±inf or NaN — never subnormal by the scale floor,
    except under MX rules (§11: ``v · 2**(b - 127)`` for small bytes ``b``): the
    integer rounding is exact for them too, float16 makes them ±0 (as RNE does),
    and float64 (x64) reads their bits, where XLA:CPU's convert would flush them.
    """
    if jax.dtypes.canonicalize_dtype(dtype) == jnp.float64:      # x64 on
        b = lax.bitcast_convert_type(y, jnp.uint32)
        sub = (b & jnp.uint32(0x7F800000)) == 0
        field = (b & jnp.uint32(0x7FFFFF)).astype(jnp.float64) * np.float64(2.0 ** -149)
        return jnp.where(sub, jnp.where(jnp.signbit(y), -field, field), y.astype(jnp.float64))
    if jnp.dtype(dtype) != jnp.bfloat16:
        return y.astype(dtype)
    b = lax.bitcast_convert_type(y, jnp.uint32)
    r = (b + jnp.uint32(0x7FFF) + ((b >> 16) & jnp.uint32(1))) >> 16
    r = jnp.where(jnp.isnan(y), jnp.uint32(0x7FC0), r)
    return lax.bitcast_convert_type(r.astype(jnp.uint16), jnp.bfloat16)


def _blockwise(fn, flat: jax.Array, plan: fp8core.BlockPlan, *per_group: jax.Array):
    """``fn(groups, *per_group) -> (per_element, per_group_out)`` (tuples of arrays or
    None) over the blocks of the 1-D ``flat``: the full blocks as one
    ``(n_full, blocksize)`` array and a partial last block as a ``(1, rem)`` group of
    its own — never padded. The zeros that would fill it change neither its absmax
    (§3) nor any other code, so 10 elements with ``blocksize=2**40`` cost 10 elements.
    Per-element outputs come back as ``(numel,)``, per-group ones as ``(n_blocks,)``."""
    bs = plan.blocksize
    n_full, rem = divmod(plan.numel, bs)
    pieces = [(flat[: n_full * bs].reshape(n_full, bs), slice(0, n_full))] if n_full or not rem else []
    if rem:
        pieces.append((flat[n_full * bs:].reshape(1, rem), slice(n_full, n_full + 1)))
    outs = [fn(g, *(a[sl] for a in per_group)) for g, sl in pieces]

    def join(parts):
        if parts[0] is None:
            return None
        parts = [p.reshape(-1) for p in parts]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    return tuple(tuple(join([o[k][i] for o in outs]) for i in range(len(outs[0][k])))
                 for k in (0, 1))


# ------------------------------------------------------------ jitted cores
# Each core has an XLA body (below) and, for native codebooks and float32 /
# float16 / bfloat16 data on CPU, the fused C kernel as a custom call
# (:mod:`fp8core_jax._ffi`, the torch backend's kernel). ``kernel`` is a static
# argument decided outside the trace (:func:`_kernel_path`), so both variants
# are cached side by side; ``lax.platform_dependent`` lowers the custom call on
# CPU only, the XLA body everywhere else.
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _kernel_path(codebook: Codebook | None, *dtypes, scale: str = "fp32") -> bool:
    """Use the C kernel: it is loaded, takes the codebook (None: any, for decoding),
    every dtype and the scale rule (``fp8core._kernel.SCALE_RULE_CODES``: the MX and
    NVFP4 rules run on XLA ops until the kernel's binding lists them). Read at trace time
    (``FP8CORE_KERNEL=0`` / ``_kernel.ENABLED``)."""
    return (scale in _kernel.SCALE_RULE_CODES and all(jnp.dtype(d) in _KERNEL_DTYPES for d in dtypes)
            and (codebook is None or _kernel.supports(codebook))
            and _ffi.available())


def _dispatch(kernel: bool, operands, fused, xla):
    """``fused`` (the custom call) lowered on CPU and ``xla`` on every other platform;
    ``xla`` alone when the kernel is off."""
    if not kernel:
        return xla(*operands)
    return lax.platform_dependent(*operands, cpu=fused, default=xla)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_jit(x, codebook: Codebook, blocksize: int | None, kernel: bool):
    """``(codes shaped like x, absmax)``; ``blocksize=None`` is global (0-d absmax)."""
    def xla(x):
        c = _constants(codebook)
        x32 = x.astype(jnp.float32)
        if blocksize is None:
            codes, absmax = _quantize_groups(x32.reshape(1, -1), c)
            return codes.reshape(x.shape), absmax.reshape(())
        plan = fp8core.plan_blocks(x.size, blocksize)
        def body(groups):
            codes, absmax = _quantize_groups(groups, c)
            return (codes,), (absmax,)

        (codes,), (absmax,) = _blockwise(body, x32.reshape(-1), plan)          # §3.1
        return codes.reshape(x.shape), absmax

    def fused(x):
        _, codes, absmax = _ffi.quantize(x, codebook, blocksize, out_dtype=None, want_codes=True)
        return codes.reshape(x.shape), absmax

    return _dispatch(kernel, (x,), fused, xla)


def _quantize_blockwise(x, codebook: Codebook, blocksize: int):
    return _quantize_jit(x, codebook, blocksize, _kernel_path(codebook, x.dtype) and x.size > 0)


def _quantize_global(x, codebook: Codebook):
    return _quantize_jit(x, codebook, None, _kernel_path(codebook, x.dtype) and x.size > 0)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize_jit(codes, absmax, codebook: Codebook, blocksize: int | None, dtype: str,
                    kernel: bool):
    """§4, cast once to ``dtype`` (§4.4); ``blocksize=None`` is global."""
    def xla(codes, absmax):
        c = _constants(codebook)
        if blocksize is None:
            y = _dequantize_groups(codes.reshape(1, -1), absmax.reshape(1), c).reshape(codes.shape)
        else:
            plan = fp8core.plan_blocks(codes.size, blocksize)
            (y,), _ = _blockwise(lambda g, a: ((_dequantize_groups(g, a, c),), ()),
                                 codes.reshape(-1), plan, absmax.reshape(-1))
            y = y.reshape(codes.shape)
        return _cast_out(y, dtype)

    def fused(codes, absmax):
        return _ffi.dequantize(codes, absmax, codebook, blocksize, jnp.dtype(dtype)).reshape(codes.shape)

    return _dispatch(kernel, (codes, absmax), fused, xla)


def _dequantize_blockwise(codes, absmax, codebook: Codebook, blocksize: int, dtype: str):
    return _dequantize_jit(codes, absmax, codebook, blocksize, dtype, _kernel_path(None, dtype))


def _dequantize_global(codes, absmax, codebook: Codebook, dtype: str):
    return _dequantize_jit(codes, absmax, codebook, None, dtype, _kernel_path(None, dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fake_quantize_jit(x, codebook: Codebook, blocksize: int | None, kernel: bool):
    def xla(x):
        c = _constants(codebook)
        x32 = x.astype(jnp.float32)
        if blocksize is None:
            y = _fake_groups(x32.reshape(1, -1), c).reshape(x.shape)
        else:
            plan = fp8core.plan_blocks(x.size, blocksize)
            (y,), _ = _blockwise(lambda g: ((_fake_groups(g, c),), ()), x32.reshape(-1), plan)
            y = y.reshape(x.shape)
        return _cast_out(y, x.dtype)

    def fused(x):
        vals, _, _ = _ffi.quantize(x, codebook, blocksize, out_dtype=x.dtype, want_codes=False)
        return vals.reshape(x.shape)

    return _dispatch(kernel, (x,), fused, xla)


def _fake_quantize(x, codebook: Codebook, blocksize: int | None):
    return _fake_quantize_jit(x, codebook, blocksize, _kernel_path(codebook, x.dtype) and x.size > 0)


# ------------------------------------------------------------- public API
def quantize_blockwise(x: Any, codebook: Any, blocksize: int, *, rounding: str = "nearest",
                       seed: Any = None, stream: Any = 0, sr_bits: int = 8
                       ) -> tuple[jax.Array, jax.Array]:
    """Quantize with one absmax per block of the row-major flattening of ``x``.

    Args:
      x: float16 / bfloat16 / float32 (float64 with x64) array, any shape.
      codebook: format name or alias (``"e4m3"``), legacy name (``"bnb_e4m3"``),
        :class:`fp8core.Codebook`, or 256 table values. Static under ``jax.jit``
        (resolve tables to a Codebook before jitting).
      blocksize: elements per block, a positive int (static); the last block
        may be partial and is padded with zeros.
      rounding, seed, stream, sr_bits: ``rounding="stochastic"`` rounds as §14 (native
        formats; ``seed`` required; ``seed`` / ``stream`` may be traced integer scalars).

    Returns:
      ``(codes, absmax)``: uint8 codes shaped like ``x`` and float32 absmax of
      shape ``(ceil(x.size / blocksize),)``.

    Numerics (docs/numerics.md §3): upcast to float32; absmax NaN-propagating
    (NaN stored as ``0x7FC00000``), a subnormal absmax stored as +0;
    ``qscale = fl(M / clip(absmax, FLOOR, CEIL))`` once per block;
    ``clip(fl(x * qscale), -M, M)``; round to nearest, ties to even (native
    formats, −0 kept) or to the lower entry (tables); blocks whose absmax is
    NaN/inf store the fill code. Bit-identical to :func:`fp8core.quantize_blockwise`.

    Raises:
      TypeError: ``x`` is not floating point, ``blocksize`` is not an int, or
        ``codebook`` is not a codebook.
      ValueError: ``blocksize`` ≤ 0 or an unknown format name.
    """
    x = _check_x(x)
    codebook = _resolve(codebook)
    _validation.check_blocksize(blocksize)
    if rounding != "nearest" or sr_bits != 8:
        rule = fp8core.recipe.with_rounding(
            fp8core.recipe.OperandRule(codebook, fp8core.recipe.flat(blocksize)), rounding, sr_bits)
        if rule.is_stochastic:
            codes, absmax = quantize_operand(x.reshape(-1), rule, seed=seed, stream=stream)
            return codes.reshape(x.shape), absmax
    _check_nearest_keys(seed, stream)
    return _quantize_blockwise(x, codebook, blocksize)


def dequantize_blockwise(codes: Any, absmax: Any, codebook: Any, blocksize: int,
                         dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``fl(value[code] * dscale)``, cast once to ``dtype``.

    ``dscale = fl(clip(absmax, FLOOR, CEIL) * fl(1/M))``; blocks whose absmax is
    NaN or ±inf dequantize to NaN; codes without a value decode to NaN. The final
    cast rounds to nearest even (no intermediate reduced-precision rounding).
    Derivative: zero on every path (not differentiable, as the quantizers).

    Raises:
      TypeError: ``codes`` not uint8, ``absmax`` not float32, ``dtype`` not a float dtype.
      ValueError: ``absmax`` has the wrong shape, bad ``blocksize``.
    """
    codes = jnp.asarray(codes) if not hasattr(codes, "dtype") else codes
    absmax = jnp.asarray(absmax) if not hasattr(absmax, "dtype") else absmax
    codebook = _resolve(codebook)
    _validation.check_codes_dtype(np.dtype(codes.dtype).name)
    plan = fp8core.plan_blocks(int(np.prod(codes.shape)), blocksize)
    _validation.check_absmax(np.dtype(absmax.dtype).name, tuple(absmax.shape), (plan.n_blocks,))
    # not differentiable on any path (zero derivative; the custom call has none at all)
    return _dequantize_blockwise(codes, lax.stop_gradient(absmax), codebook, blocksize,
                                 _dtype_name(dtype))


def quantize_global(x: Any, codebook: Any) -> tuple[jax.Array, jax.Array]:
    """Quantize with one absmax for the whole array.

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x`` and a 0-d float32
    absmax (0 for an empty array). Numerics as :func:`quantize_blockwise`; the
    absmax is a NaN-propagating max, exact in any reduction order (sharding:
    an integer max of the bit patterns, since a float all-reduce max drops NaN).
    """
    x = _check_x(x)
    codebook = _resolve(codebook)
    return _quantize_global(x, codebook)


def dequantize_global(codes: Any, absmax: Any, codebook: Any, dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_global` (numerics as :func:`dequantize_blockwise`)."""
    codes = jnp.asarray(codes) if not hasattr(codes, "dtype") else codes
    absmax = jnp.asarray(absmax) if not hasattr(absmax, "dtype") else absmax
    codebook = _resolve(codebook)
    _validation.check_codes_dtype(np.dtype(codes.dtype).name)
    _validation.check_absmax(np.dtype(absmax.dtype).name, tuple(absmax.shape), ())
    return _dequantize_global(codes, lax.stop_gradient(absmax), codebook, _dtype_name(dtype))


def fake_quantize(x: Any, codebook: Any, blocksize: int | None = None) -> jax.Array:
    """Quantize then dequantize, returning ``x``'s dtype.

    ``blocksize=None`` uses one absmax for the array; an int quantizes blockwise.
    Bit-identical to ``dequantize(quantize(x))`` and to
    :func:`fp8core.fake_quantize`. For native formats it is fused (no uint8
    codes are materialised): ``fl(rne(s) * dscale)`` where ``rne`` rounds half
    to even with integer arithmetic on the float32 bits (no 8-bit cast that XLA
    could drop as excess precision); on CPU, fp8core's fused C kernel.

    Derivative: zero almost everywhere (it is piecewise constant), which is what
    ``jax.grad`` returns, as for ``jnp.round``. The FP8 matmuls implement
    straight-through gradients; for a straight-through estimator of your own use
    ``x + lax.stop_gradient(fake_quantize(x, ...) - x)``.
    """
    x = _check_x(x)
    codebook = _resolve(codebook)
    if blocksize is not None:
        _validation.check_blocksize(blocksize)
    return _fake_quantize_zero_grad(x, codebook, blocksize)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fake_quantize_zero_grad(x, codebook: Codebook, blocksize: int | None):
    return _fake_quantize(x, codebook, blocksize)


@_fake_quantize_zero_grad.defjvp
def _fake_quantize_jvp(codebook, blocksize, primals, tangents):
    """The a.e. derivative, zero: without this rule neither path differentiates at all
    (the custom call has no JVP; the XLA body's integer bitcasts fail inside JAX)."""
    (x,), (dx,) = primals, tangents
    return _fake_quantize(x, codebook, blocksize), jnp.zeros_like(dx)


# ------------------------------------------------------ §9: GEMM operands
# An operand is viewed as the matrix ``(rows, contraction)`` of its GEMM
# (fp8core.blocks.operand_matrix); its groups come from fp8core.blocks.plan_operand
# only. Tiles are taken on the *physical* row-major array: an operand contracted
# along axis 0 of a 2-D array is its transpose, whose tiles are the physical
# array's transposed tiles (TilePlan.transposed), so no transposed copy is made
# and only the absmax grid is transposed. Flat blocks follow the operand's own
# row-major flattening (a transposed flat operand is flattened transposed).
class _Layout(NamedTuple):
    plan: OperandPlan                    # in the operand's orientation (rows × contraction)
    transposed: bool                     # the operand is the transpose of the physical array
    phys: TilePlan | None                # tiles of the physical array (tile kinds)

    @property
    def runs(self) -> int | None:
        """Group size when every group is a run of the physical flattening (flat blocks;
        tiles one row high, or as wide as the array, with no column padding), else None."""
        if self.plan.kind == "flat":
            return None if self.transposed else self.plan.flat.blocksize
        t = self.phys
        if t.pad_cols == 0 and (t.tile_rows == 1 or t.grid[1] == 1):
            return t.tile_rows * t.tile_cols
        return None


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], granularity, axis: int) -> _Layout:
    """Validates ``axis`` for ``shape`` (errors at trace time) and plans the groups."""
    rows, cols, transposed = operand_matrix(tuple(shape), axis)
    plan = plan_operand(rows, cols, granularity)
    phys = None
    if plan.tiles is not None:
        phys = plan.tiles.transposed() if transposed else plan.tiles
    return _Layout(plan, transposed, phys)


def _tight(t: TilePlan) -> TilePlan:
    """The same tiles with ``tile_rows``/``tile_cols`` clamped to the array (a tile larger
    than the array holds the same elements): padding never exceeds a tile's overhang, so
    a 10-element operand with ``tile(2**40)`` is not padded to 2**40 zeros."""
    return plan_tiles(t.rows, t.cols, max(1, min(t.tile_rows, t.rows)),
                      max(1, min(t.tile_cols, t.cols)))


def _tiles_to_groups(m: jax.Array, t: TilePlan) -> jax.Array:
    """``(rows, cols)`` → the tile view ``(gr, gc, tile_rows, tile_cols)`` (tile ``(i, j)``
    at ``[i, j]``); edge tiles padded with zeros (which never change an absmax). A
    reshape that splits each axis and a transpose, never one that merges axes: a
    sharded axis stays one axis of the view, so the partitioner keeps it sharded."""
    t = _tight(t)
    if t.pad_rows or t.pad_cols:
        m = jnp.pad(m, ((0, t.pad_rows), (0, t.pad_cols)))
    gr, gc = t.grid
    return m.reshape(gr, t.tile_rows, gc, t.tile_cols).transpose(0, 2, 1, 3)


def _groups_to_tiles(groups: jax.Array, t: TilePlan) -> jax.Array:
    t = _tight(t)
    m = groups.transpose(0, 2, 1, 3).reshape(t.padded_shape)
    return m[: t.rows, : t.cols] if (t.pad_rows or t.pad_cols) else m


@functools.lru_cache(maxsize=4096)
def _flat_as_tiles(lay: _Layout) -> TilePlan | None:
    """The tiles that hold the same groups, in the same order, as the flat blocks of an
    operand that is not transposed, when a block size divides the rows' length (tiles
    ``1 x B``) or is a multiple of it dividing the array (tiles of ``B / cols`` whole rows,
    or one tile). Those go through the tile view, which a partitioner
    keeps sharded along either axis; other flat blocks run across rows."""
    if lay.plan.kind != "flat" or lay.transposed:
        return None
    rows, cols, bs = lay.plan.rows, lay.plan.cols, lay.plan.flat.blocksize
    if cols % bs == 0:
        return plan_tiles(rows, cols, 1, bs)
    if bs % cols == 0 and (rows % (bs // cols) == 0 or bs // cols >= rows):  # no padding
        return plan_tiles(rows, cols, min(bs // cols, rows), cols)
    return None


def _operand_apply(fn, x: jax.Array, lay: _Layout, *per_group: jax.Array):
    """``fn(groups, *per_group) -> (per_element, per_group_out)`` over the operand's groups
    (physical group order); per-element outputs come back shaped like ``x``, per-group
    ones 1-D. Flat blocks go through the tile view when they are tiles
    (:func:`_flat_as_tiles`), else through :func:`_blockwise` (a partial block unpadded)."""
    tiles = lay.phys if lay.plan.kind == "tiles" else _flat_as_tiles(lay)
    if tiles is None:
        flat = (x.T if lay.transposed else x).reshape(-1)
        elems, groups = _blockwise(fn, flat, lay.plan.flat, *per_group)
        if lay.transposed:
            back = lambda y: y.reshape(lay.plan.rows, lay.plan.cols).T  # noqa: E731
        else:
            back = lambda y: y.reshape(x.shape)  # noqa: E731
    else:
        elems, groups = fn(_tiles_to_groups(x.reshape(tiles.rows, tiles.cols), tiles),
                           *(a.reshape(tiles.grid) for a in per_group))
        back = lambda y: _groups_to_tiles(y, tiles).reshape(x.shape)  # noqa: E731
    return (tuple(None if y is None else back(y) for y in elems),
            tuple(None if a is None else a.reshape(-1) for a in groups))


def _grid_of_groups(absmax: jax.Array, lay: _Layout) -> jax.Array:
    """Per-group absmax (physical group order) → the operand's ``plan.scale_shape``."""
    if lay.plan.kind == "flat":
        return absmax.reshape(lay.plan.scale_shape)
    grid = absmax.reshape(lay.phys.grid)
    return grid.T if lay.transposed else grid


def _groups_of_grid(absmax: jax.Array, lay: _Layout) -> jax.Array:
    if lay.plan.kind == "flat":
        return absmax.reshape(-1)
    return (absmax.T if lay.transposed else absmax).reshape(-1)


def _ffi_recipes() -> bool:
    """The custom calls take scale rules and tiles (``_ffi.quantize_tiles`` and the
    ``scale=`` keyword landed together)."""
    return hasattr(_ffi, "quantize_tiles")


def _operand_kernel(rule, lay: _Layout, codebook: Codebook | None, *dtypes) -> bool:
    """The C kernel serves this operand (decided outside the trace; ``codebook=None``:
    decoding, which takes any codebook). Only scale rules the kernel executes
    (``fp8core._kernel.SCALE_RULE_CODES``, the MX rules included) go to it; the NVFP4
    rules run on XLA ops until the kernel's binding lists them (the decision is still
    :func:`_kernel_path`'s, so a caller that records it sees XLA chosen)."""
    if lay.plan.rows * lay.plan.cols == 0:
        return False
    if not _kernel_path(codebook, *dtypes, scale=rule.scale):
        return False
    if rule.scale != "fp32" or (lay.plan.kind == "tiles" and lay.runs is None
                                and lay.phys.grid != (1, 1)):
        return _ffi_recipes()
    return True


def _scale_kw(rule) -> dict:
    return {} if rule.scale == "fp32" else {"scale": rule.scale}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _operand_jit(x, rule, axis: int, out_dtype: str | None, want_codes: bool, kernel: bool):
    """``(values in out_dtype or None, codes or None, absmax of plan.scale_shape)``:
    dequantize(quantize(x)) and/or the codes, in one pass on the kernel path."""
    lay = _layout(tuple(x.shape), rule.granularity, axis)
    cb = rule.format

    def xla(x):
        if x.size == 0:
            zeros = jnp.zeros(x.shape, out_dtype or jnp.float32)
            return (zeros if out_dtype else None, jnp.zeros(x.shape, jnp.uint8) if want_codes else None,
                    jnp.zeros(lay.plan.scale_shape, jnp.float32))
        c = _constants(cb)

        def body(groups):
            vals = g_codes = None
            if want_codes:
                g_codes, absmax = _quantize_groups(groups, c, rule.scale)
                if out_dtype:
                    vals = _dequantize_groups(g_codes, absmax, c, rule.scale)
            else:
                absmax = _group_absmax(groups)
                vals = _fake_groups(groups, c, rule.scale)
            return (vals, g_codes), (absmax,)

        (vals, codes), (absmax,) = _operand_apply(body, x.astype(jnp.float32), lay)
        if out_dtype:
            vals = _cast_out(vals, out_dtype)
        return vals, codes, _grid_of_groups(absmax, lay)

    def fused(x):
        kw = dict(out_dtype=jnp.dtype(out_dtype) if out_dtype else None, want_codes=want_codes,
                  **_scale_kw(rule))
        tiles = lay.phys if lay.plan.kind == "tiles" else _flat_as_tiles(lay)
        if tiles is not None:  # tiles, with a sharding rule (fp8core_jax._partition)
            vals, codes, absmax = _partition.quantize_tiles(
                x.reshape(tiles.rows, tiles.cols), tiles, cb, rule.scale, kw["out_dtype"], want_codes)
            back = lambda y: y.reshape(x.shape)  # noqa: E731
        elif lay.transposed:  # flat blocks of the transpose's flattening
            vals, codes, absmax = _ffi.quantize(x.T, cb, lay.plan.flat.blocksize, **kw)
            back = lambda y: y.reshape(x.shape[::-1]).T  # noqa: E731
        else:  # flat blocks running across rows
            vals, codes, absmax = _ffi.quantize(x, cb, lay.plan.flat.blocksize, **kw)
            back = lambda y: y.reshape(x.shape)  # noqa: E731
        return (back(vals) if out_dtype else None, back(codes) if want_codes else None,
                _grid_of_groups(absmax.reshape(-1), lay))

    return _dispatch(kernel, (x,), fused, xla)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize_operand_jit(codes, absmax, rule, axis: int, dtype: str, kernel: bool):
    """§4 per group under ``rule``, cast once to ``dtype``."""
    lay = _layout(tuple(codes.shape), rule.granularity, axis)
    cb = rule.format

    def xla(codes, absmax):
        if codes.size == 0:
            return jnp.zeros(codes.shape, dtype)
        c = _constants(cb)
        (y,), _ = _operand_apply(lambda g, a: ((_dequantize_groups(g, a, c, rule.scale),), ()),
                                 codes, lay, _groups_of_grid(absmax, lay))
        return _cast_out(y, dtype)

    def fused(codes, absmax):
        kw = _scale_kw(rule)
        flat_absmax = _groups_of_grid(absmax, lay)
        tiles = lay.phys if lay.plan.kind == "tiles" else _flat_as_tiles(lay)
        if tiles is not None:  # tiles, with a sharding rule (fp8core_jax._partition)
            return _partition.dequantize_tiles(codes.reshape(tiles.rows, tiles.cols),
                                               flat_absmax.reshape(tiles.grid), tiles, cb,
                                               rule.scale, dtype).reshape(codes.shape)
        if lay.transposed:  # flat blocks
            y = _ffi.dequantize(codes.T, flat_absmax, cb, lay.plan.flat.blocksize, jnp.dtype(dtype), **kw)
            return y.reshape(codes.shape[::-1]).T
        y = _ffi.dequantize(codes, flat_absmax, cb, lay.plan.flat.blocksize, jnp.dtype(dtype), **kw)
        return y.reshape(codes.shape)

    return _dispatch(kernel, (codes, absmax), fused, xla)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _operand_given_jit(x, absmax, rule, out_dtype: str | None, want_codes: bool):
    """:func:`_operand_jit` of a ``tensor()`` rule with a given 0-d amax (§10.2), on XLA
    ops (one group, so the layout is the array's own)."""
    c = _constants(rule.format)
    g = x.astype(jnp.float32).reshape(1, -1)
    a = absmax.astype(jnp.float32).reshape(1)
    vals = codes = None
    if want_codes:
        codes, _ = _quantize_groups(g, c, rule.scale, a)
        if out_dtype:
            vals = _dequantize_groups(codes, a, c, rule.scale)
        codes = codes.reshape(x.shape)
    else:
        vals = _fake_groups(g, c, rule.scale, a)
    if out_dtype:
        vals = _cast_out(vals, out_dtype).reshape(x.shape)
    return vals, codes, a.reshape(())


def _reduced_absmax(x, axes) -> jax.Array:
    """§10.2: ``x``'s §3.2 absmax, all-reduced (max) over the mesh axes ``axes`` as its
    float32 bits (absmax values order like their bits, NaN above +inf)."""
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    bound = tuple(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    missing = [n for n in names if n not in bound]
    if missing:
        raise ValueError(
            f"amax_reduction={axes!r}: {', '.join(map(repr, missing))} is not a mesh axis of "
            f"the enclosing shard_map (its manual axes: {bound or 'none, not inside shard_map'}). "
            f"The amax is all-reduced over axes a shard_map binds; under a plain jit of "
            f"sharded arrays the amax is already global and needs no amax_reduction")
    local = _group_absmax(x.astype(jnp.float32).reshape(1, -1)).reshape(())
    top = lax.pmax(lax.bitcast_convert_type(local, jnp.int32), names)
    return lax.bitcast_convert_type(top, jnp.float32)


def _operand(x, rule, axis: int, out_dtype: str | None, want_codes: bool,
             absmax: jax.Array | None = None):
    """Internal entry of the matmuls (arguments already checked). ``absmax``: a given
    0-d amax for a ``tensor()`` rule (§10.2), computed on XLA ops. A stochastic rule is
    rejected: it needs a seed (:func:`quantize_operand`)."""
    if rule.is_stochastic:
        raise ValueError(f"rule {rule} rounds stochastically: quantize it with "
                         f"quantize_operand(x, rule, seed=...) (or matmul_fp8(..., seed=))")
    if absmax is not None:
        return _operand_given_jit(x, absmax, rule, out_dtype, want_codes)
    lay = _layout(tuple(x.shape), rule.granularity, axis)
    kernel = _operand_kernel(rule, lay, rule.format, x.dtype, *([out_dtype] if out_dtype else []))
    return _operand_jit(x, rule, axis, out_dtype, want_codes, kernel)


def _dequantize_operand(codes, absmax, rule, axis: int, dtype: str):
    lay = _layout(tuple(codes.shape), rule.granularity, axis)
    return _dequantize_operand_jit(codes, absmax, rule, axis, dtype,
                                   _operand_kernel(rule, lay, None, dtype))


def _fake_operand(x, rule, axis: int, reduce=None):
    """dequantize(quantize(x)) in x's dtype; ``reduce``: mesh axes over which a
    ``tensor()`` rule's amax is all-reduced first (the recipe's ``amax_reduction``)."""
    absmax = None if reduce is None else _reduced_absmax(x, reduce)
    return _operand(x, rule, axis, np.dtype(x.dtype).name, False, absmax)[0]


# ------------------------------------------------------ §14: stochastic rounding
def _mix32(v: jax.Array) -> jax.Array:
    """:func:`fp8core.random.mix32` on uint32 (wrapping multiplies, logical shifts)."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(fp8core.random.MIX_MUL1)
    v = v ^ (v >> 15)
    v = v * jnp.uint32(fp8core.random.MIX_MUL2)
    return v ^ (v >> 16)


def _random_bits(shape: tuple[int, ...], seed: jax.Array, stream: jax.Array, r: int) -> jax.Array:
    """:func:`fp8core.random.random_bits` on XLA ops (``seed``, ``stream``: uint32 scalars,
    traced)."""
    k1 = _mix32(seed ^ jnp.uint32(fp8core.random.SEED_SALT))
    k2 = _mix32(k1 ^ stream ^ jnp.uint32(fp8core.random.STREAM_SALT))
    n = int(np.prod(shape, dtype=np.int64))
    i = lax.iota(jnp.uint32, n)
    return (_mix32(_mix32(i ^ k1) ^ k2) >> jnp.uint32(32 - r)).reshape(shape)


def _key_array(value: Any, name: str) -> jax.Array:
    """A validated seed / stream as a uint32 scalar (an int, or a 0-d integer array —
    traced under jit, so a training step does not recompile when it changes)."""
    if hasattr(value, "dtype") and not isinstance(value, (int, np.integer)):
        fp8core.random.check_key_array(np.dtype(value.dtype).name, tuple(np.shape(value)), name)
        return jnp.asarray(value).astype(jnp.uint32)
    value = fp8core.random.check_seed(value) if name == "seed" else fp8core.random.check_stream(value)
    return jnp.uint32(value)


def random_bits(shape: tuple[int, ...], seed: Any, stream: Any = 0, r: int = 8) -> jax.Array:
    """:func:`fp8core.random.random_bits` computed with XLA ops (uint32 values in
    ``[0, 2**r)``); ``seed`` / ``stream`` ints or 0-d integer arrays (traceable)."""
    r = fp8core.random.check_sr_bits(r, "r")
    shape = tuple(int(d) for d in shape)
    fp8core.random.check_elements(int(np.prod(shape, dtype=np.int64)))
    return _random_bits_jit(_key_array(seed, "seed"), _key_array(stream, "stream"), shape, r)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random_bits_jit(seed, stream, shape, r):
    return _random_bits(shape, seed, stream, r)


def _expand_to_elements(per_group: jax.Array, plan) -> jax.Array:
    """fp8core.reference.expand_to_elements: a per-group array over (rows, cols)."""
    rows, cols = plan.rows, plan.cols
    if plan.kind == "flat":
        b = plan.flat.blocksize
        g = per_group.reshape(-1)
        return jnp.repeat(g, b, total_repeat_length=g.shape[0] * b)[: rows * cols].reshape(rows, cols)
    t = plan.tiles
    gr, gc = t.grid
    g = per_group.reshape(t.grid)
    g = jnp.repeat(g, t.tile_rows, axis=0, total_repeat_length=gr * t.tile_rows)
    return jnp.repeat(g, t.tile_cols, axis=1, total_repeat_length=gc * t.tile_cols)[:rows, :cols]


def _stochastic_codes(s: jax.Array, rand: jax.Array, codebook: Codebook, sr_bits: int,
                      toward_zero: jax.Array) -> jax.Array:
    """fp8core.reference.stochastic_round_to_codes on XLA ops. The bits of ``s`` are read
    by a bitcast (never flushed); a float32-subnormal ``|s|`` may be flushed by the
    multiply below, which changes nothing: its ``n`` is 0 and ``rint(δ·2**r)`` 0 either way."""
    fmt = codebook.format
    mbits = int(fmt.mantissa_bits)
    emin = int(np.log2(fmt.smallest_normal))
    b = lax.bitcast_convert_type(s, jnp.int32)
    magbits = b & jnp.int32(0x7FFFFFFF)
    e_eff = jnp.maximum((magbits >> 23) - 127, jnp.int32(emin))
    inv_q = lax.bitcast_convert_type((jnp.int32(mbits + 127) - e_eff) << 23, jnp.float32)
    frac = lax.bitcast_convert_type(magbits, jnp.float32) * inv_q
    n = jnp.floor(frac)
    d = (frac - n) * jnp.float32(2.0 ** sr_bits)
    up = (jnp.round(d) + rand.astype(jnp.float32)) >= jnp.float32(2.0 ** sr_bits)
    up = up & ~toward_zero
    magcode = ((e_eff - emin) << mbits) + n.astype(jnp.int32) + up.astype(jnp.int32)
    negative = b < 0
    if not fmt.has_negative_zero:
        negative = negative & (magcode != 0)
    codes = jnp.where(negative, magcode | jnp.int32(1 << (fmt.total_bits - 1)), magcode)
    return codes.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _operand_sr_jit(x, seed, stream, absmax, rule, axis: int, kernel: bool = False):
    """§14: the nearest rule's absmax and scales, each element scaled and saturated (§3.4)
    and rounded with the random bits of its row-major index in ``x``. ``absmax``: None or
    a given 0-d amax (§10.2; XLA ops). ``kernel``: the stochastic custom call on CPU (the
    generator in the kernel's loop; ``seed`` / ``stream`` its traced operand), XLA ops
    elsewhere; else XLA ops."""
    lay = _layout(tuple(x.shape), rule.granularity, axis)
    plan = lay.plan
    nearest = fp8core.recipe.nearest_rule(rule)
    if kernel and absmax is None:
        return _dispatch(True, (x, seed, stream), functools.partial(_operand_sr_fused, rule=rule,
                                                                    lay=lay),
                         lambda x, seed, stream: _operand_sr_jit(x, seed, stream, None, rule, axis))
    if absmax is not None:
        _, _, a = _operand_given_jit(x, absmax, nearest, None, True)
    else:
        _, _, a = _operand_jit(x, nearest, axis, None, True, False)
    a = a.reshape(plan.scale_shape)
    if x.size == 0:
        return jnp.zeros(x.shape, jnp.uint8), a
    c = _constants(rule.format)
    rand = _random_bits(tuple(x.shape), seed, stream, rule.sr_bits)
    m, rm = ((x.T, rand.T) if lay.transposed
             else (x.reshape(plan.rows, plan.cols), rand.reshape(plan.rows, plan.cols)))
    finite, qscale, _ = _group_scales(_expand_to_elements(a, plan).reshape(-1), c, rule.scale)
    x32 = m.astype(jnp.float32).reshape(-1, 1)
    if rule.is_nvfp4:                                   # §13.5: subnormal x lifted, as nearest
        s = _jnv().engine_scaled(x32.reshape(-1), qscale)
    else:
        s = _scale_and_saturate(x32, qscale, c, rule.scale).reshape(-1)      # §3.4
    s = jnp.where(finite, s, jnp.float32(0))
    # float32 subnormal inputs never round away (XLA:CPU reads them as ±0): by the bits
    tiny = (lax.bitcast_convert_type(x32.reshape(-1), jnp.int32) & jnp.int32(0x7FFFFFFF)) \
        < jnp.int32(0x00800000)
    codes = _stochastic_codes(s, rm.reshape(-1), rule.format, rule.sr_bits, tiny)
    codes = jnp.where(finite, codes, jnp.uint8(c.fill_code)).reshape(plan.rows, plan.cols)
    return (codes.T if lay.transposed else codes.reshape(x.shape)), a


def _operand_sr_fused(x, seed, stream, *, rule, lay: _Layout):
    """:func:`_operand_sr_jit` through the stochastic custom calls (the operand's groups as
    :func:`_operand_jit`'s ``fused``; a transposed flat operand's elements indexed in ``x``)."""
    plan, cb = lay.plan, rule.format
    kw = dict(seed=seed, stream=stream, sr_bits=rule.sr_bits, scale=rule.scale)
    tiles = lay.phys if plan.kind == "tiles" else _flat_as_tiles(lay)
    if tiles is not None:  # x's own element order: indices are positions
        codes, absmax = _ffi.quantize_tiles_sr(x.reshape(tiles.rows, tiles.cols), cb,
                                               tiles.tile_rows, tiles.tile_cols, **kw)
        codes = codes.reshape(x.shape)
    elif lay.transposed:  # flat blocks of the transpose's flattening
        codes, absmax = _ffi.quantize_sr(x.T, cb, plan.flat.blocksize, transposed=True, **kw)
        codes = codes.reshape(x.shape[::-1]).T
    else:
        codes, absmax = _ffi.quantize_sr(x.reshape(plan.rows, plan.cols), cb, plan.flat.blocksize,
                                         transposed=False, **kw)
        codes = codes.reshape(x.shape)
    return codes, _grid_of_groups(absmax.reshape(-1), lay).reshape(plan.scale_shape)


def _check_nearest_keys(seed: Any, stream: Any) -> None:
    if seed is not None:
        _key_array(seed, "seed")
    _key_array(stream, "stream")


def _check_axis(shape: tuple[int, ...], rule, axis: Any) -> int:
    _layout(tuple(shape), rule.granularity, axis)  # raises for a bad axis
    return int(axis)


def quantize_operand(x: Any, rule: Any, *, axis: int = -1, absmax: Any = None,
                     seed: Any = None, stream: Any = 0) -> tuple[jax.Array, jax.Array]:
    """Quantize a GEMM operand under an :class:`fp8core.recipe.OperandRule` (§9).

    Args:
      x: float16 / bfloat16 / float32 array; ``axis`` is its contraction axis (the
        last, or 0 of a 2-D array — the transposed orientation a backward GEMM uses).
      rule: element format, granularity (tensor, axiswise, block(B), tile(B),
        flat(B)) and scale rule (``"fp32"``, ``"pow2"``, ``"pow2_torchao"``, or an MX
        rule ``"mx_floor"`` … ``"mx_rceil"``: e8m0 block scales, §11). Static.
      absmax: for a ``tensor()`` rule, a float32 amax (0-d or ``(1, 1)``) to scale by
        instead of ``x``'s own (§10.2: e.g. the all-reduced max of every device's absmax);
        returned as given.
      seed, stream: ints in ``[0, 2**32)`` or 0-d integer arrays (traced under jit: no
        recompilation per step) keying the random bits of a ``rounding="stochastic"``
        rule (§14, ``seed`` required there). Stochastic rounding runs in the C kernel's
        custom call on CPU where it is loaded (XLA ops elsewhere, and for a given ``absmax``).

    Returns:
      ``(codes, absmax)``: uint8 codes shaped like ``x``; float32 absmax of shape
      :attr:`fp8core.OperandPlan.scale_shape` in the operand's orientation (rows ×
      groups along the contraction axis). Bit-identical to
      :func:`fp8core.reference.quantize_operand`.

    Numerics: §3 per group with the rule's scale (§9.2): upcast to float32; absmax
    NaN-propagating; ``qscale`` from ``fl(M / clip(absmax))`` (power-of-two rules take
    its exponent bits); ``clip(fl(x * qscale), -M, M)``; round half to even (native)
    or ties-to-lower (tables); NaN/inf groups store the fill code. Groups come from
    :func:`fp8core.plan_operand`: edge blocks and tiles are partial (padded with zeros,
    which never change an absmax).

    Raises:
      TypeError: ``x`` not floating point, ``rule`` not an OperandRule, ``axis`` not an int.
      ValueError: ``axis`` neither the last axis nor 0 of a 2-D array.
    """
    x = _check_x(x)
    rule = fp8core.recipe.check_rule(rule)
    axis = _check_axis(tuple(x.shape), rule, axis)
    if absmax is not None:
        absmax = jnp.asarray(absmax) if not hasattr(absmax, "dtype") else absmax
        _validation.check_given_absmax(rule, np.dtype(absmax.dtype).name, tuple(absmax.shape))
        absmax = lax.stop_gradient(absmax)
    if rule.is_stochastic:
        if seed is None:
            fp8core.random.check_seed(None)
        fp8core.random.check_elements(int(np.prod(x.shape, dtype=np.int64)))
        lay = _layout(tuple(x.shape), rule.granularity, axis)
        kernel = absmax is None and _operand_kernel(fp8core.recipe.nearest_rule(rule), lay,
                                                    rule.format, x.dtype)
        return _operand_sr_jit(x, _key_array(seed, "seed"), _key_array(stream, "stream"),
                               absmax, rule, axis, kernel)
    _check_nearest_keys(seed, stream)
    _, codes, absmax = _operand(x, rule, axis, None, True, absmax)
    return codes, absmax.reshape(_layout(tuple(x.shape), rule.granularity, axis).plan.scale_shape)


def dequantize_operand(codes: Any, absmax: Any, rule: Any, *, axis: int = -1,
                       dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_operand`: ``fl(value[code] * dscale)`` per group, cast
    once to ``dtype``; NaN/inf groups dequantize to NaN. Bit-identical to
    :func:`fp8core.reference.dequantize_operand`.

    Raises:
      TypeError: ``codes`` not uint8, ``absmax`` not float32, ``rule`` not an
        OperandRule, ``dtype`` not a float dtype.
      ValueError: ``absmax`` not of shape ``plan.scale_shape``; bad ``axis``.
    """
    codes = jnp.asarray(codes) if not hasattr(codes, "dtype") else codes
    absmax = jnp.asarray(absmax) if not hasattr(absmax, "dtype") else absmax
    rule = fp8core.recipe.check_rule(rule)
    _validation.check_codes_dtype(np.dtype(codes.dtype).name)
    axis = _check_axis(tuple(codes.shape), rule, axis)
    plan = _layout(tuple(codes.shape), rule.granularity, axis).plan
    _validation.check_absmax(np.dtype(absmax.dtype).name, tuple(absmax.shape), plan.scale_shape)
    return _dequantize_operand(codes, lax.stop_gradient(absmax), rule, axis, _dtype_name(dtype))


def fake_quantize_operand(x: Any, rule: Any, *, axis: int = -1, seed: Any = None,
                          stream: Any = 0) -> jax.Array:
    """``dequantize_operand(quantize_operand(x))`` in ``x``'s dtype, fused (no codes
    materialised; a stochastic rule materialises them); bit-identical to
    :func:`fp8core.reference.fake_quantize_operand`.

    Derivative: zero almost everywhere, as :func:`fake_quantize` (``custom_jvp``; a
    stochastic rule: ``stop_gradient``). Arguments and errors as :func:`quantize_operand`.
    """
    x = _check_x(x)
    rule = fp8core.recipe.check_rule(rule)
    axis = _check_axis(tuple(x.shape), rule, axis)
    if rule.is_stochastic:
        codes, absmax = quantize_operand(lax.stop_gradient(x), rule, axis=axis, seed=seed,
                                         stream=stream)
        return dequantize_operand(codes, absmax, rule, axis=axis, dtype=x.dtype)
    _check_nearest_keys(seed, stream)
    return _fake_operand_zero_grad(x, rule, axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fake_operand_zero_grad(x, rule, axis: int):
    return _fake_operand(x, rule, axis)


@_fake_operand_zero_grad.defjvp
def _fake_operand_jvp(rule, axis, primals, tangents):
    (x,), (dx,) = primals, tangents
    return _fake_operand(x, rule, axis), jnp.zeros_like(dx)


# ------------------------------------------------------------ §11: OCP MX
@functools.lru_cache(maxsize=None)
def _e8m0_exponents() -> np.ndarray:
    """int32[256]: ``b - 127``, the exponent of each e8m0 byte's value
    (:func:`fp8core.mx.e8m0_values`; 0 for the NaN byte, unused)."""
    v = fp8core.mx.e8m0_values(np.arange(256)).astype(np.float64)
    frac, exp = np.frexp(np.where(np.isnan(v), 1.0, v))
    if not np.all(frac == 0.5):
        raise AssertionError("e8m0 values are powers of two")
    out = (exp - 1).astype(np.int32)
    out.setflags(write=False)
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _mx_scale_bytes_jit(absmax, codebook: Codebook, scale: str, shape: tuple[int, ...], axis: int):
    """The e8m0 bytes (uint8) of quantize_operand's absmax grid, laid out as
    :func:`fp8core.mx.scales_shape` (the layout of :func:`fp8core.mx.scales_layout`)."""
    b = _mx_bytes(absmax, _constants(codebook), scale).astype(jnp.uint8)
    if len(shape) == 2 and axis in (0, -2):
        return b.T
    return b.reshape(*shape[:-1], b.shape[-1])


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _dequantize_mx_jit(codes, scales, codebook: Codebook, block_size: int, ax: int, dtype: str):
    """``fl(value[code] · 2**(scale − 127))`` by :func:`_mul_pow2` (exact, subnormal
    results included), NaN where the byte is 255, cast once to ``dtype``."""
    k = jnp.asarray(_e8m0_exponents())[scales.astype(jnp.int32)]
    nan = scales == jnp.uint8(fp8core.mx.E8M0_NAN)

    def expand(s):   # fp8core.mx.expand_scales: each block's value over its elements
        s = jnp.repeat(s, block_size, axis=ax, total_repeat_length=s.shape[ax] * block_size)
        return lax.slice_in_dim(s, 0, codes.shape[ax], axis=ax)

    y = _mul_pow2(_decode(codes, _constants(codebook)), expand(k))
    y = jnp.where(expand(nan), jnp.float32(np.nan), y)
    return _cast_out(y, dtype)


def quantize_mx(x: Any, element_format: Any, *, block_size: int = 32, axis: int = -1,
                scale_mode: str = "floor", rounding: str = "nearest", seed: Any = None,
                stream: Any = 0, sr_bits: int = 8) -> tuple[jax.Array, jax.Array]:
    """OCP MX quantization (§11): one e8m0 scale byte per block of ``block_size``
    consecutive elements along ``axis``; bit-identical to :func:`fp8core.quantize_mx`.

    Args:
      x: float16 / bfloat16 / float32 array; ``axis`` the last, or 0 of a 2-D array (a
        last partial block is allowed).
      element_format: an MX element format (``"e4m3"``, ``"e5m2"``, ``"e2m3"``,
        ``"e3m2"``, ``"e2m1"`` or their ml_dtypes names). Static, as the other keywords.
      block_size: elements per block, a positive multiple of the format's packing unit.
      scale_mode: torchao 0.18's ``ScaleCalculationMode``: ``"floor"`` (OCP MX v1.0),
        ``"ceil"``, ``"even"`` or ``"rceil"`` (:mod:`fp8core.mx`).
      rounding, seed, stream, sr_bits: ``rounding="stochastic"`` rounds the elements as
        §14 (``seed`` required; ``seed`` / ``stream`` may be traced integer scalars).

    Returns:
      ``(codes, scales)``: uint8 element codes shaped like ``x`` (a sub-byte format's bit
      pattern in the low bits) and uint8 e8m0 bytes of shape
      :func:`fp8core.mx.scales_shape`.

    Numerics: the block's §3.2 absmax; its byte searched in
    :func:`fp8core.mx.byte_table` (NaN → 255); elements ``clip(x · qscale, −M, M)``
    (:func:`fp8core.mx.byte_scales`, a power of two applied to the float32 bits, float32
    subnormal inputs included — XLA:CPU would flush them), rounded half to even; a
    block of byte 255 stores the fill code. Not differentiable: ``x`` enters through
    ``stop_gradient`` (its derivative is zero, as :func:`fake_quantize_operand`'s).

    Raises:
      TypeError / ValueError: as :func:`fp8core.quantize_mx` (bad ``x`` dtype,
      ``element_format``, ``block_size``, ``scale_mode`` or ``axis``).
    """
    x = _check_x(x)
    rule = fp8core.recipe.with_rounding(fp8core.mx.mx_rule(element_format, block_size, scale_mode),
                                        rounding, sr_bits)
    axis = _check_axis(tuple(x.shape), rule, axis)
    if rule.is_stochastic:
        codes, absmax = quantize_operand(lax.stop_gradient(x), rule, axis=axis, seed=seed,
                                         stream=stream)
    else:
        _check_nearest_keys(seed, stream)
        _, codes, absmax = _operand(lax.stop_gradient(x), rule, axis, None, True)
    plan = _layout(tuple(x.shape), rule.granularity, axis).plan
    scales = _mx_scale_bytes_jit(absmax.reshape(plan.scale_shape), rule.format, rule.scale,
                                 tuple(x.shape), axis)
    return codes, scales


def dequantize_mx(codes: Any, scales: Any, element_format: Any, *, block_size: int = 32,
                  axis: int = -1, dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_mx`: ``fl(value[code] · 2**(scale − 127))`` — exact in
    float32, subnormal results included (integer arithmetic on the bits: XLA:CPU flushes
    float32 subnormals) — NaN where the scale byte is 255, cast once to ``dtype`` (round
    half to even). Bit-identical to :func:`fp8core.dequantize_mx`; the inputs are
    integers, so nothing is differentiated.

    Raises:
      TypeError: ``codes`` or ``scales`` not uint8, ``dtype`` not a float dtype.
      ValueError: as :func:`fp8core.dequantize_mx` (``element_format``, ``block_size``,
        ``scales`` not of :func:`fp8core.mx.scales_shape`).
    """
    codes = jnp.asarray(codes) if not hasattr(codes, "dtype") else codes
    scales = jnp.asarray(scales) if not hasattr(scales, "dtype") else scales
    rule = fp8core.mx.mx_rule(element_format, block_size, "floor")
    _validation.check_codes_dtype(np.dtype(codes.dtype).name)
    fp8core.mx.check_scales(np.dtype(scales.dtype).name, tuple(scales.shape), tuple(codes.shape),
                            block_size, axis)
    dtype = _dtype_name(dtype)
    return _dequantize_mx_jit(codes, scales, rule.format, int(block_size), axis % codes.ndim, dtype)
