"""The README's Python examples run as written (one namespace, in order, like a reader would)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    assert any("LinearFP8Mixed(768, 3072)" in b for b in blocks)
    assert any("nnx.Rngs(0)" in b for b in blocks)


def test_readme_examples_run(capsys):
    pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("flax", reason="flax is not installed")
    namespace: dict = {}
    for block in _python_blocks():
        if "collect_stats" in block:  # needs a trained model and loss; covered by tests/test_stats.py
            continue
        exec(compile(block, str(README), "exec"), namespace)
    out, layer = namespace["out"], namespace["layer"]
    assert out.shape == (32, 128, 3072) and str(out.dtype) == "float16"
    model = namespace["model"]
    assert type(model[0]).__name__ == "LinearFP8Global" and type(model[2]).__name__ == "Linear"
    assert "LinearFP8Global(in_features=64, out_features=256" in capsys.readouterr().out
    sd = namespace["state_dict"]
    import numpy as np
    np.testing.assert_array_equal(sd["0.weight"], model.state_dict()["0.weight"].numpy())
