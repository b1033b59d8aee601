"""Flax NNX layers with FP8-simulated matmuls, mirroring ``flax.nnx.Linear`` (flax 0.12).

``LinearFP8Mixed`` / ``LinearFP8Global`` have ``nnx.Linear``'s parameters
(``kernel`` of shape ``(in_features, out_features)``, ``bias`` of shape
``(out_features,)``), initialisers (``lecun_normal`` / zeros) and ``param_dtype``.

One deliberate difference in dtype promotion: with ``dtype=None``, ``nnx.Linear``
computes in ``result_type(inputs, kernel, bias)``; these layers compute in the
**input's** dtype, because the FP8 matmul's output dtype is A's dtype (the
kernel is quantized in its own dtype, then cast) — so a float16 input gives a
float16 output, as the PyTorch backend does. With ``dtype`` set, inputs, kernel
and bias are cast to it first (``nnx.Linear``'s rule). The bias is added in the
promoted type of output and bias and the sum cast back to the output's dtype
(PyTorch's ``out += bias``).
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as _nnx_dtypes
from flax.nnx.nn import initializers

import fp8core
from fp8core import _validation
from fp8core_jax import quantize as _q
from fp8core_jax.matmul import matmul_fp8_global, matmul_fp8_mixed

__all__ = ["LinearFP8Mixed", "LinearFP8Global", "convert_to_fp8"]

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()


class _LinearFP8(nnx.Module):
    _matmul: tp.ClassVar[tp.Callable[..., jax.Array]]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: tp.Any | None = None,
        param_dtype: tp.Any = jnp.float32,
        kernel_init: tp.Callable = default_kernel_init,
        bias_init: tp.Callable = default_bias_init,
        rngs: nnx.Rngs,
        fw_format: tp.Any = "e4m3",
        bw_format: tp.Any = "e5m2",
        bsz: int | None = None,
        bsz2: int | None = None,
    ):
        _validation.check_features(in_features, "in_features")
        _validation.check_features(out_features, "out_features")
        if dtype is not None:
            _validation.check_float_dtype(np.dtype(dtype).name, argname="dtype")
        _validation.check_float_dtype(np.dtype(param_dtype).name, argname="param_dtype")
        # hashable, static configuration (resolved and checked once, here)
        self.fw_codebook = _q._resolve_named(fw_format, "fw_format")
        self.bw_codebook = _q._resolve_named(bw_format, "bw_format")
        if bsz is None:
            bsz = fp8core.select_block_size(in_features)
        if bsz2 is None:
            bsz2 = fp8core.select_block_size(out_features)
        _validation.check_matmul_blocksize(bsz, "bsz")
        _validation.check_matmul_blocksize(bsz2, "bsz2")

        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.bsz = bsz
        self.bsz2 = bsz2

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``FP8(inputs @ kernel) + bias`` over the last dimension of ``inputs``.

        Raises:
          TypeError: ``inputs`` is not floating point.
          ValueError: ``inputs.shape[-1] != in_features``.
        """
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        if not hasattr(inputs, "dtype"):
            inputs = jnp.asarray(inputs)
        _validation.check_float_dtype(np.dtype(inputs.dtype).name, argname="inputs")
        if self.dtype is not None:
            inputs, kernel, bias = _nnx_dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = type(self)._matmul(inputs, kernel, self.fw_codebook, self.bw_codebook,
                               self.bsz, self.bsz2)
        if bias is not None:
            y = (y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))).astype(y.dtype)
        return y


class LinearFP8Mixed(_LinearFP8):
    """``nnx.Linear`` with :func:`fp8core_jax.matmul_fp8_mixed`.

    Forward: inputs quantized blockwise (``bsz``, default
    ``select_block_size(in_features)``), kernel globally, both with ``fw_format``;
    backward: output gradient quantized blockwise with ``bw_format`` (``bsz2``,
    default ``select_block_size(out_features)``), the kernel gradient in full
    precision. Example::

        layer = LinearFP8Mixed(768, 3072, rngs=nnx.Rngs(0))
        out = layer(jnp.ones((32, 128, 768), jnp.float16))   # float16

    Args:
      in_features, out_features: ints ≥ 1.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as ``nnx.Linear``
        (see the module docstring for ``dtype=None``).
      fw_format, bw_format: codebooks (names, :class:`fp8core.Codebook`, tables).
      bsz, bsz2: block sizes, ``None`` for bitsandbytes' rule.

    Raises:
      TypeError / ValueError: bad features, dtypes, formats or block sizes.
    """

    mode: tp.ClassVar[str] = "mixed"
    _matmul = staticmethod(matmul_fp8_mixed)


class LinearFP8Global(_LinearFP8):
    """``nnx.Linear`` with :func:`fp8core_jax.matmul_fp8_global` (one scale per tensor).

    Arguments as :class:`LinearFP8Mixed`; ``bsz``/``bsz2`` are kept for parity and unused.
    """

    mode: tp.ClassVar[str] = "global"
    _matmul = staticmethod(matmul_fp8_global)


_MODES = {"mixed": LinearFP8Mixed, "global": LinearFP8Global}


def _from_linear(linear: nnx.Linear, cls, **fp8_kwargs) -> _LinearFP8:
    """An FP8 layer holding the same ``kernel``/``bias`` Params as ``linear``."""
    # build normally (zero-initialised placeholders), then adopt linear's Params
    new = cls(linear.in_features, linear.out_features, use_bias=linear.use_bias,
              dtype=linear.dtype, param_dtype=linear.param_dtype,
              kernel_init=initializers.zeros_init(), rngs=nnx.Rngs(0), **fp8_kwargs)
    new.kernel = linear.kernel
    new.bias = linear.bias if linear.use_bias else nnx.data(None)
    return new


def convert_to_fp8(
    model: nnx.Module,
    mode: str = "mixed",
    *,
    module_filter_fn: tp.Callable[[nnx.Module, str], bool] | None = None,
    fw_format: tp.Any = "e4m3",
    bw_format: tp.Any = "e5m2",
    bsz: int | None = None,
    bsz2: int | None = None,
) -> nnx.Module:
    """Replace the ``nnx.Linear`` layers of ``model`` by FP8 layers, in place.

    Each replacement keeps the original ``kernel`` and ``bias`` ``nnx.Param``
    objects (no copy; shared references stay shared) and its ``dtype`` /
    ``param_dtype``. Like torchao's ``convert_to_float8_training``,
    ``module_filter_fn(module, fqn)`` (``fqn`` = the dotted attribute path, e.g.
    ``"layers.0"``) returns False for layers to keep as they are. ``bsz``/``bsz2``
    ``None`` pick each layer's sizes from its own features. A model that *is* an
    ``nnx.Linear`` is returned converted (it cannot be replaced in place).

    Returns:
      ``model`` (modified), or the new layer when ``model`` is an ``nnx.Linear``.

    Raises:
      ValueError: unknown ``mode``; TypeError / ValueError: bad formats or block sizes.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
    cls = _MODES[mode]
    kwargs = dict(fw_format=_q._resolve_named(fw_format, "fw_format"),
                  bw_format=_q._resolve_named(bw_format, "bw_format"), bsz=bsz, bsz2=bsz2)

    def wanted(module, fqn):
        return type(module) is nnx.Linear and (module_filter_fn is None or module_filter_fn(module, fqn))

    if wanted(model, ""):
        return _from_linear(model, cls, **kwargs)
    targets = [(path, m) for path, m in nnx.iter_modules(model)
               if path and wanted(m, ".".join(map(str, path)))]
    for path, linear in targets:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        new = _from_linear(linear, cls, **kwargs)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return model
