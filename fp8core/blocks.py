"""Block sizes and block plans.

Planning is pure Python on ints, cached, and returns immutable plans; backends
only execute them (no backend recomputes a block count or a padding).
"""

from __future__ import annotations

import dataclasses
import functools

from fp8core import _validation

__all__ = [
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "select_block_size",
    "select_block_sizes",
    "BlockPlan",
    "plan_blocks",
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
