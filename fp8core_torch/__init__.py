"""fp8core_torch: the PyTorch backend of fp8core (FP8-simulated training).

Quantizers bit-identical to :mod:`fp8core.reference`, the bitsandbytes-shaped
autograd matmuls and ``nn.Linear`` drop-ins. Device-agnostic: every tensor is
created on its input's device.
"""

from fp8core_torch.config import QuantSpec
from fp8core_torch.quantize import (
    dequantize_blockwise,
    dequantize_global,
    fake_quantize,
    quantize_blockwise,
    quantize_global,
)

__all__ = [
    "QuantSpec",
    "dequantize_blockwise",
    "dequantize_global",
    "fake_quantize",
    "quantize_blockwise",
    "quantize_global",
]

from fp8core_torch.matmul import matmul_fp8_global, matmul_fp8_mixed  # noqa: E402
from fp8core_torch.linear import LinearFP8Global, LinearFP8Mixed  # noqa: E402
from fp8core_torch.convert import convert_to_fp8  # noqa: E402

__all__ += [
    "LinearFP8Global",
    "LinearFP8Mixed",
    "convert_to_fp8",
    "matmul_fp8_global",
    "matmul_fp8_mixed",
]
