"""Block sizes and block plans.

Planning is pure Python on ints, cached, and returns immutable plans; backends
only execute them (no backend recomputes a block count or a padding).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from fp8core import _validation

__all__ = [
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "select_block_size",
    "select_block_sizes",
    "BlockPlan",
    "plan_blocks",
    "TilePlan",
    "plan_tiles",
    "OperandPlan",
    "plan_operand",
    "operand_matrix",
]

MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 4096


def select_block_size(features: int) -> int:
    """bitsandbytes' rule: the smallest power of two ≥ ``features``, clamped to [64, 4096].

    >>> [select_block_size(n) for n in (1, 64, 65, 768, 1024, 1025, 5000)]
    [64, 64, 128, 1024, 1024, 2048, 4096]

    Raises:
      ValueError: ``features`` is not an int ≥ 1.
    """
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise ValueError(f"features must be an int >= 1, got {features!r}")
    size = 1 << (features - 1).bit_length()
    return min(max(size, MIN_BLOCK_SIZE), MAX_BLOCK_SIZE)


def select_block_sizes(in_features: int, out_features: int) -> tuple[int, int]:
    """``(bsz, bsz2)`` for a linear layer: activations are blocked by ``in_features``
    (A's last dim), output gradients by ``out_features``."""
    return select_block_size(in_features), select_block_size(out_features)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """How a tensor of ``numel`` elements splits into blocks of the row-major flattening.

    Attributes:
      numel: elements in the tensor.
      blocksize: elements per block (the last block may be partial).
      n_blocks: ``ceil(numel / blocksize)``; 0 for an empty tensor.
      pad: zeros appended to make ``n_blocks * blocksize`` elements.
    """

    numel: int
    blocksize: int
    n_blocks: int
    pad: int

    @property
    def padded_numel(self) -> int:
        return self.n_blocks * self.blocksize


@functools.lru_cache(maxsize=1024)
def plan_blocks(numel: int, blocksize: int) -> BlockPlan:
    """The :class:`BlockPlan` for ``numel`` elements and ``blocksize``.

    Raises:
      TypeError / ValueError: ``blocksize`` is not a positive int.
    """
    _validation.check_blocksize(blocksize)
    n_blocks = -(-numel // blocksize)
    return BlockPlan(numel, blocksize, n_blocks, n_blocks * blocksize - numel)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """How a row-major ``(rows, cols)`` array splits into ``tile_rows × tile_cols`` tiles.

    Tiles at the bottom and right edges may be partial (they are never padded with
    neighbouring data; a backend that pads uses zeros, which never change an absmax).
    The absmax / scale grid is ``grid = (ceil(rows / tile_rows), ceil(cols / tile_cols))``,
    row-major.
    """

    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    grid: tuple[int, int]
    pad_rows: int
    pad_cols: int

    @property
    def n_groups(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.rows + self.pad_rows, self.cols + self.pad_cols

    def transposed(self) -> "TilePlan":
        """The same tiles seen on the transposed array (grid transposed)."""
        return plan_tiles(self.cols, self.rows, self.tile_cols, self.tile_rows)


@functools.lru_cache(maxsize=4096)
def plan_tiles(rows: int, cols: int, tile_rows: int, tile_cols: int) -> TilePlan:
    """The :class:`TilePlan` of a ``(rows, cols)`` array (the only tile arithmetic)."""
    for name, v in (("rows", rows), ("cols", cols)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    _validation.check_blocksize(tile_rows, argname="tile_rows")
    _validation.check_blocksize(tile_cols, argname="tile_cols")
    gr, gc = -(-rows // tile_rows), -(-cols // tile_cols)
    return TilePlan(rows, cols, tile_rows, tile_cols, (gr, gc),
                    gr * tile_rows - rows, gc * tile_cols - cols)


@dataclasses.dataclass(frozen=True)
class OperandPlan:
    """How one GEMM operand, viewed as ``(rows, cols)`` with the contraction axis last,
    is grouped under a granularity (docs/numerics.md §9.3).

    ``kind == "tiles"``: ``tiles`` gives the groups (tensor = one tile of the whole
    matrix, axiswise = ``1 × cols``, block(B) = ``1 × B``, tile(B) = ``B × B``) and the
    absmax grid ``scale_shape == tiles.grid``. ``kind == "flat"``: ``flat`` gives blocks
    of the row-major flattening and ``scale_shape == (n_blocks,)``.
    """

    kind: str
    rows: int
    cols: int
    tiles: TilePlan | None
    flat: BlockPlan | None

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return self.tiles.grid if self.tiles is not None else (self.flat.n_blocks,)

    @property
    def spans_rows(self) -> bool:
        """Flat blocks that share one scale across rows (tokens): bitsandbytes' behaviour."""
        return self.flat is not None and self.rows > 1 and self.cols % self.flat.blocksize != 0

    @property
    def is_global(self) -> bool:
        """One group holding every element (a non-empty tensor-granularity operand)."""
        return self.tiles is not None and self.tiles.grid == (1, 1)


@functools.lru_cache(maxsize=4096)
def plan_operand(rows: int, cols: int, granularity) -> OperandPlan:
    """The :class:`OperandPlan` of a ``(rows, cols)`` operand (cols = contraction axis).

    ``granularity`` is an :class:`fp8core.recipe.Granularity`; ``flat()`` without a size
    takes ``select_block_size(cols)`` (bitsandbytes' rule).
    """
    kind, size = granularity.kind, granularity.size
    if kind == "flat":
        bs = size if size is not None else select_block_size(max(cols, 1))
        return OperandPlan("flat", rows, cols, None, plan_blocks(rows * cols, bs))
    tr, tc = {
        "tensor": (max(rows, 1), max(cols, 1)),
        "axiswise": (1, max(cols, 1)),
        "block": (1, size),
        "tile": (size, size),
    }[kind]
    return OperandPlan("tiles", rows, cols, plan_tiles(rows, cols, tr, tc), None)


def operand_matrix(shape: tuple[int, ...], axis: int) -> tuple[int, int, bool]:
    """``(rows, cols, transposed)`` of the operand view: the contraction axis last.

    ``axis=-1`` (or ndim-1): rows = the product of the leading dims. ``axis=0`` of a 2-D
    array: the operand is its transpose."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}: {axis!r}")
    nd = len(shape)
    if nd == 0:
        raise ValueError("x must have at least 1 dimension")
    if axis in (-1, nd - 1):
        cols = shape[-1]
        rows = math.prod(shape[:-1])
        return rows, cols, False
    if nd == 2 and axis in (0, -2):
        return shape[1], shape[0], True
    raise ValueError(
        f"axis (the contraction axis) must be the last axis, or 0 of a 2-D array; "
        f"got axis={axis} for shape {tuple(shape)}"
    )
