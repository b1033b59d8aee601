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
