"""Sharding rules for the custom-call quantizers of GEMM operands (issue 12).

An XLA custom call has no sharding rule, so the SPMD partitioner all-gathers its
operands. The tile quantizers of :mod:`fp8core_jax.quantize` (every operand whose
groups are tiles of the physical 2-D array: tensor, axiswise, block, tile, and flat
blocks that are tiles) therefore go through ``jax.experimental.custom_partitioning``
on the kernel path, with this rule, decided per array dimension from the operand's
sharding (the grid of absmax is ``(gr, gc)``, one per ``tile_rows × tile_cols`` tile):

* **local** — the dimension is not sharded, or each shard holds whole tiles (its size a
  multiple of the tile): tiles never span shards, so the C kernel runs on each shard as
  it is, and the absmax grid is sharded as the array;
* **spanning** — each tile holds whole shards (the tile a multiple of the shard size,
  e.g. a per-tensor or per-column absmax over sharded tokens): each shard reduces its
  part of the tiles (the XLA path's max |x| and NaN flag), an all-reduce (max) over the
  dimension's mesh axes makes the tile's absmax, and the shard quantizes with it — on
  the XLA path, since the kernel has no entry taking a given absmax. The grid is
  replicated along that dimension;
* anything else (a tile boundary inside a shard that also spans shards, or a dimension
  the mesh does not divide) is replicated first: an all-gather, as without the rule.

Dequantization is elementwise given each tile's absmax: the kernel on each shard, with
the grid sharded as quantization left it. Results are the unsharded call's bits: the
groups are the same, max and OR are exact in any order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from fp8core.blocks import TilePlan, plan_tiles
from fp8core.codebooks import Codebook
from fp8core_jax import _ffi


# --------------------------------------------------------------- the calls
def _kernel_quantize(x, t: TilePlan, codebook: Codebook, scale: str, out_dtype, want_codes: bool):
    """The custom call for the tiles ``t`` of the 2-D ``x``: the flat call when every tile
    is a run of the row-major flattening (or there is one tile), else the tile call.
    Returns ``(values or None, codes or None, absmax grid)``."""
    kw = dict(out_dtype=out_dtype, want_codes=want_codes, **({} if scale == "fp32" else {"scale": scale}))
    if t.grid == (1, 1) or _runs(t):
        vals, codes, absmax = _ffi.quantize(x, codebook, None if t.grid == (1, 1) else _runs(t), **kw)
        back = lambda y: None if y is None else y.reshape(x.shape)  # noqa: E731
        return back(vals), back(codes), absmax.reshape(t.grid)
    return _ffi.quantize_tiles(x, codebook, t.tile_rows, t.tile_cols, **kw)


def _kernel_dequantize(codes, absmax, table, t: TilePlan, codebook: Codebook, scale: str, dtype):
    kw = {"table": table, **({} if scale == "fp32" else {"scale": scale})}
    if t.grid == (1, 1) or _runs(t):
        blocksize = None if t.grid == (1, 1) else _runs(t)
        return _ffi.dequantize(codes, absmax.reshape(-1), codebook, blocksize, dtype,
                               **kw).reshape(codes.shape)
    return _ffi.dequantize_tiles(codes, absmax, codebook, t.tile_rows, t.tile_cols, dtype, **kw)


def _runs(t: TilePlan) -> int | None:
    """Tile size when every tile is a run of the row-major flattening, else None."""
    if t.pad_cols == 0 and (t.tile_rows == 1 or t.grid[1] == 1):
        return t.tile_rows * t.tile_cols
    return None


# ------------------------------------------------------------ the rule
def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _dim_rule(n: int, tile: int, axes: tuple[str, ...], mesh) -> tuple[str, tuple[str, ...]]:
    """``(kind, mesh axes kept)`` of one dimension: ``"local"`` or ``"spanning"`` (module
    docstring); a dimension that is neither is replicated (``"local"``, no axes)."""
    shards = math.prod(mesh.shape[a] for a in axes)
    tile = min(tile, n)
    if shards == 1 or n % shards:
        return "local", ()
    size = n // shards
    if size % tile == 0:
        return "local", axes
    if tile % size == 0:
        return "spanning", axes
    return "local", ()


def _spec(sharding, mesh) -> tuple:
    """The operand's PartitionSpec entries; ``(None, None)`` for a sharding that is not a
    tiling of whole mesh axes (then the operand is replicated first). Shardings arrive
    undecoded (``decode_shardings=False``): decoding also the results' would fail on
    a grid sharded over part of a mesh axis, which Shardy may propose for a compound
    factor."""
    if isinstance(sharding, NamedSharding):
        return tuple(sharding.spec) + (None, None)
    try:
        from jax._src.sharding_impls import parse_flatten_op_sharding
        spec = parse_flatten_op_sharding(sharding._to_xla_hlo_sharding(2), mesh)[0]
    except Exception:  # noqa: BLE001 - anything unusual: replicate (an all-gather)
        return (None, None)
    return tuple(spec) + (None, None)


def _rules(t: TilePlan, mesh, sharding):
    spec = _spec(sharding, mesh)
    return (_dim_rule(t.rows, t.tile_rows, _mesh_axes(spec[0]), mesh),
            _dim_rule(t.cols, t.tile_cols, _mesh_axes(spec[1]), mesh))


def _shardings(mesh, rules):
    """(array sharding, grid sharding): the grid is replicated along spanning dimensions."""
    def entry(axes):
        return None if not axes else (axes[0] if len(axes) == 1 else axes)
    array = NamedSharding(mesh, P(*(entry(a) for _, a in rules)))
    grid = NamedSharding(mesh, P(*(entry(a) if k == "local" else None for k, a in rules)))
    return array, grid


def _local_plan(t: TilePlan, mesh, rules) -> TilePlan:
    """The tiles of one shard (along a spanning dimension the shard is part of one tile)."""
    shape, tiles = [], []
    for (kind, axes), n, tile in zip(rules, (t.rows, t.cols), (t.tile_rows, t.tile_cols)):
        size = n // math.prod(mesh.shape[a] for a in axes)
        shape.append(size)
        tiles.append(size if kind == "spanning" else min(tile, n))
    return plan_tiles(shape[0], shape[1], tiles[0], tiles[1])


def _sdy_rule(t: TilePlan, n_elementwise: int, with_grid_operand: bool):
    """Shardy's rule: the array's dimensions are (grid × tile) compound factors when
    the tiles divide them, so the grid follows the array's sharding."""
    dims, grid, sizes = [], [], {}
    for name, n, tile in (("r", t.rows, t.tile_rows), ("c", t.cols, t.tile_cols)):
        tile = min(tile, n)
        if tile == 1:  # one tile per element along the dimension: the same factor
            dims.append(f"{name}g")
        elif n % tile == 0 and tile < n:  # (Shardy takes no size-1 factor in a compound)
            dims.append(f"({name}g {name}t)")
            sizes[f"{name}t"] = tile
        else:
            dims.append(f"{name}n")
        grid.append(f"{name}g")
    a, g = " ".join(dims), " ".join(grid)
    if with_grid_operand:  # + the codebook's value table
        return f"{a}, {g}, v -> {a}", sizes
    return f"{a} -> " + ", ".join([a] * n_elementwise + [g]), sizes


def _batchable(op, plain):
    """``op`` (a custom_partitioning call, which has no batching rule) with one: under
    ``vmap``, ``plain`` — the same custom call without the sharding rule (the custom
    call batches sequentially), as before the rule existed."""
    f = jax.custom_batching.custom_vmap(op)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]
        out = jax.vmap(plain)(*args)
        return out, jax.tree.map(lambda _: True, out)

    return f


# ------------------------------------------------------------- quantize
@functools.lru_cache(maxsize=None)
def _quantizer(t: TilePlan, codebook: Codebook, scale: str, out_dtype: str | None, want_codes: bool):
    dtype = None if out_dtype is None else jnp.dtype(out_dtype)

    def pick(vals, codes, absmax):
        return tuple(y for y, keep in ((vals, dtype is not None), (codes, want_codes), (absmax, True))
                     if keep)

    def plain(x):
        return pick(*_kernel_quantize(x, t, codebook, scale, dtype, want_codes))

    op = custom_partitioning(plain)

    def partition(mesh, arg_shapes, result_shape):
        rules = _rules(t, mesh, arg_shapes[0].sharding)
        array, grid = _shardings(mesh, rules)
        lt = _local_plan(t, mesh, rules)
        spanning = [(d, axes) for d, (kind, axes) in enumerate(rules) if kind == "spanning"]

        def lower(x):
            if not spanning:
                return pick(*_kernel_quantize(x, lt, codebook, scale, dtype, want_codes))
            return pick(*_spanning_quantize(x, t, lt, spanning, codebook, scale, dtype, want_codes))

        return mesh, lower, pick(array, array, grid), (array,)

    rule, sizes = _sdy_rule(t, len(pick(1, 1, 1)) - 1, False)
    op.def_partition(partition, sharding_rule=rule, decode_shardings=False, **sizes)
    return _batchable(op, plain)


def _spanning_quantize(x, t: TilePlan, lt: TilePlan, spanning, codebook: Codebook, scale: str,
                       dtype, want_codes: bool):
    """One shard of an operand whose tiles span shards: the shard's partial absmax, an
    all-reduce (max) over the spanning dimensions' mesh axes, then §3 with that absmax
    on the XLA path (:mod:`fp8core_jax.quantize`'s group math)."""
    from fp8core_jax import quantize as _q

    c = _q._constants(codebook)
    groups = _q._tiles_to_groups(x.astype(jnp.float32), lt)          # (gr, gc, th, tw) of the shard
    key = _q._tile_key(groups)                                       # int32 max key per tile part
    full_grid, index = list(key.shape), [0, 0]
    for d, axes in spanning:  # the shard's part of one tile: place it in the dimension's grid
        tile = min((t.tile_rows, t.tile_cols)[d], (t.rows, t.cols)[d])
        full_grid[d] = t.grid[d]
        index[d] = lax.axis_index(axes) * (lt.rows, lt.cols)[d] // tile
    axes = tuple(a for _, ax in spanning for a in ax)
    # 0 is below every key: the other tiles' entries do not change the max
    key = lax.pmax(lax.dynamic_update_slice(jnp.zeros(full_grid, jnp.int32), key, index), axes)
    absmax = _q._absmax_of_key(key)                                  # grid, full along spanning dims
    own = lax.dynamic_slice(absmax, index, lt.grid)
    codes_g, _ = _q._quantize_groups(groups, c, scale, absmax=own)
    vals = codes = None
    if want_codes:
        codes = _q._groups_to_tiles(codes_g, lt)
    if dtype is not None:
        vals = _q._cast_out(_q._groups_to_tiles(_q._dequantize_groups(codes_g, own, c, scale), lt),
                            dtype)
    return vals, codes, absmax


def quantize_tiles(x, t: TilePlan, codebook: Codebook, scale: str, out_dtype, want_codes: bool):
    """``(values or None, codes or None, absmax grid)`` of the 2-D ``x`` in the tiles ``t``
    through the kernel, partitioned by the rule of the module docstring."""
    out = list(_quantizer(t, codebook, scale, None if out_dtype is None else jnp.dtype(out_dtype).name,
                          want_codes)(x))
    vals = out.pop(0) if out_dtype is not None else None
    codes = out.pop(0) if want_codes else None
    return vals, codes, out[0]


# ----------------------------------------------------------- dequantize
@functools.lru_cache(maxsize=None)
def _dequantizer(t: TilePlan, codebook: Codebook, scale: str, dtype: str):
    def plain(codes, absmax, table):  # the table an operand: the op's body may hold no constant
        return _kernel_dequantize(codes, absmax, table, t, codebook, scale, jnp.dtype(dtype))

    op = custom_partitioning(plain)

    def partition(mesh, arg_shapes, result_shape):
        rules = _rules(t, mesh, arg_shapes[0].sharding)
        array, grid = _shardings(mesh, rules)
        lt = _local_plan(t, mesh, rules)
        spanning = [(d, axes) for d, (kind, axes) in enumerate(rules) if kind == "spanning"]

        def lower(codes, absmax, table):
            if spanning:  # the grid is whole along a spanning dimension: the shard's tile
                index = [0, 0]
                for d, axes in spanning:
                    tile = min((t.tile_rows, t.tile_cols)[d], (t.rows, t.cols)[d])
                    index[d] = lax.axis_index(axes) * (lt.rows, lt.cols)[d] // tile
                absmax = lax.dynamic_slice(absmax, index, lt.grid)
            return _kernel_dequantize(codes, absmax, table, lt, codebook, scale, jnp.dtype(dtype))

        return mesh, lower, array, (array, grid, NamedSharding(mesh, P()))

    rule, sizes = _sdy_rule(t, 1, True)
    op.def_partition(partition, sharding_rule=rule, decode_shardings=False, **sizes)
    return _batchable(op, plain)


def dequantize_tiles(codes, absmax, t: TilePlan, codebook: Codebook, scale: str, dtype) -> jax.Array:
    """``fl(value[code] * dscale)`` of the 2-D ``codes`` with their absmax grid, in ``dtype``."""
    from fp8core import _kernel
    return _dequantizer(t, codebook, scale, jnp.dtype(dtype).name)(
        codes, absmax, jnp.asarray(_kernel._table(codebook)))
