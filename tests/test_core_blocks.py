import pytest

from fp8core import plan_blocks, select_block_size, select_block_sizes


@pytest.mark.parametrize(
    "features, expected",
    [(1, 64), (63, 64), (64, 64), (65, 128), (768, 1024), (1024, 1024), (1025, 2048),
     (4096, 4096), (4097, 4096), (5000, 4096)],
)
def test_select_block_size_matches_bitsandbytes(features, expected):
    assert select_block_size(features) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.0, "64", None, True])
def test_select_block_size_rejects(bad):
    with pytest.raises(ValueError, match="features must be an int >= 1"):
        select_block_size(bad)


def test_select_block_sizes_pair():
    assert select_block_sizes(768, 3072) == (1024, 4096)
    assert select_block_sizes(1, 100) == (64, 128)


def test_plan_blocks():
    p = plan_blocks(1000, 256)
    assert (p.n_blocks, p.pad, p.padded_numel) == (4, 24, 1024)
    assert plan_blocks(0, 64).n_blocks == 0
    assert plan_blocks(512, 256).pad == 0
    with pytest.raises(ValueError, match="blocksize must be a positive int, got 0"):
        plan_blocks(10, 0)
    with pytest.raises(TypeError, match="blocksize must be a positive int, got float: 2.5"):
        plan_blocks(10, 2.5)
