"""fp8core must import and work with torch and jax unavailable (checked in a subprocess)."""

import subprocess
import sys
import textwrap


def test_fp8core_imports_without_torch_or_jax():
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "jax", "jaxlib", "flax"):
            sys.modules[name] = None  # any import of these now raises ImportError
        import numpy as np
        import fp8core
        codes, absmax = fp8core.quantize_blockwise(np.ones(10, np.float32), "e4m3", 64)
        assert codes.dtype == np.uint8 and absmax.shape == (1,)
        loaded = [m for m in ("torch", "jax", "flax") if sys.modules.get(m) is not None]
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
