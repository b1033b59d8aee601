"""Flax NNX layers with FP8-simulated matmuls, mirroring ``flax.nnx.Linear`` (flax 0.12).

:class:`LinearFP8` runs any :class:`fp8core.recipe.LinearRecipe` (or a preset name:
``"TENSORWISE"``, ``"ROWWISE"``, ``"BLOCKWISE_1x128"``, …) through
:func:`fp8core_jax.matmul_fp8`. ``LinearFP8Mixed`` / ``LinearFP8Global`` are
bitsandbytes' removed layers with their call shape (``fw_format``, ``bw_format``,
``bsz``, ``bsz2``): the presets of :func:`fp8core.recipe.bnb_recipe`.

The layers have ``nnx.Linear``'s parameters
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
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as _nnx_dtypes
from flax.nnx.nn import initializers

import fp8core
import fp8core.recipe
from fp8core import _validation
from fp8core_jax import quantize as _q
from fp8core_jax.matmul import _apply, _bnb, _check_inputs

__all__ = ["LinearFP8", "LinearFP8Mixed", "LinearFP8Global", "convert_to_fp8"]

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()


class _Once:
    """A flag shared by a layer and the copies NNX makes of it under ``nnx.jit`` (NNX
    keeps non-Variable attributes in the graph definition by reference), so a layer
    warns once however often it is traced."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class LinearFP8(nnx.Module):
    """``nnx.Linear`` whose fprop, dgrad and wgrad GEMMs are quantized by ``recipe``
    (:func:`fp8core_jax.matmul_fp8`). Example::

        layer = LinearFP8(768, 3072, recipe="ROWWISE", rngs=nnx.Rngs(0))
        out = layer(jnp.ones((8, 128, 768)))              # (8, 128, 3072)

    Args:
      in_features, out_features: ints ≥ 1.
      recipe: an :class:`fp8core.recipe.LinearRecipe` or a preset name (default
        ``"TENSORWISE"``, torchao's default recipe); stored resolved as ``recipe``.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as ``nnx.Linear``
        (see the module docstring for ``dtype=None``).

    A recipe with ``flat()`` blocks for the input or output gradient warns once per
    layer (at trace time) when a block spans rows of a 2-D+ input: tokens then share a
    scale (bitsandbytes' behaviour).

    Raises:
      TypeError / ValueError: bad features or dtypes; a recipe that is not one (the
        message lists the presets).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        recipe: tp.Any = "TENSORWISE",
        use_bias: bool = True,
        dtype: tp.Any | None = None,
        param_dtype: tp.Any = jnp.float32,
        kernel_init: tp.Callable = default_kernel_init,
        bias_init: tp.Callable = default_bias_init,
        rngs: nnx.Rngs,
    ):
        _validation.check_features(in_features, "in_features")
        _validation.check_features(out_features, "out_features")
        if dtype is not None:
            _validation.check_float_dtype(np.dtype(dtype).name, argname="dtype")
        _validation.check_float_dtype(np.dtype(param_dtype).name, argname="param_dtype")
        recipe = fp8core.recipe.get_recipe(recipe)
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
        self.recipe = recipe          # static (frozen, hashable)
        self._rows_warned = _Once()

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``FP8(inputs @ kernel) + bias`` over the last dimension of ``inputs``.

        Raises:
          TypeError: ``inputs`` is not floating point.
          ValueError: ``inputs.shape[-1] != in_features``; a tile granularity for the
            input / grad_output slots of a 1-D input.
        """
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        if not hasattr(inputs, "dtype"):
            inputs = jnp.asarray(inputs)
        _validation.check_float_dtype(np.dtype(inputs.dtype).name, argname="inputs")
        if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
            got = "a 0-d array" if inputs.ndim < 1 else f"{inputs.shape[-1]} features"
            raise ValueError(
                f"inputs has {got} (shape {tuple(inputs.shape)}), but {type(self).__name__}"
                f"(in_features={self.in_features}, out_features={self.out_features}) expects "
                f"{self.in_features} in its last dimension"
            )
        if self.dtype is not None:
            inputs, kernel, bias = _nnx_dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        self._warn_rows(inputs)
        inputs, kernel, bias = _check_inputs(inputs, kernel, bias, argname="inputs")
        return _apply(inputs, kernel, bias, self.recipe, argname="inputs")

    def _warn_rows(self, inputs: jax.Array) -> None:
        if self._rows_warned.done or inputs.ndim < 2:
            return
        msg = self.recipe.rows_warning(int(np.prod(inputs.shape[:-1])), self.in_features,
                                       self.out_features, type(self).__name__)
        if msg is not None:
            self._rows_warned.done = True
            warnings.warn(msg, UserWarning, stacklevel=3)


class _LinearFP8Bnb(LinearFP8):
    """bitsandbytes' call shape over :func:`fp8core.recipe.bnb_recipe`."""

    mode: tp.ClassVar[str]

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
        # hashable, static configuration (resolved and checked once, here)
        fw = _q._resolve_named(fw_format, "fw_format")
        bw = _q._resolve_named(bw_format, "bw_format")
        for name, v in (("bsz", bsz), ("bsz2", bsz2)):
            if v is not None:
                _validation.check_matmul_blocksize(v, name)  # -1: automatic, as the matmuls
        recipe = _bnb(self.mode, fw, bw, -1 if bsz is None else bsz, -1 if bsz2 is None else bsz2)
        super().__init__(in_features, out_features, recipe=recipe, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init,
                         rngs=rngs)
        self.fw_codebook = fw
        self.bw_codebook = bw
        self.bsz = fp8core.select_block_size(in_features) if bsz in (None, -1) else bsz
        self.bsz2 = fp8core.select_block_size(out_features) if bsz2 in (None, -1) else bsz2


class LinearFP8Mixed(_LinearFP8Bnb):
    """``nnx.Linear`` with :func:`fp8core_jax.matmul_fp8_mixed` (recipe ``BNB_MIXED``).

    Forward: inputs quantized blockwise (``bsz``, default
    ``select_block_size(in_features)``), kernel globally, both with ``fw_format``;
    backward: output gradient quantized blockwise with ``bw_format`` (``bsz2``,
    default ``select_block_size(out_features)``), the kernel gradient in full
    precision. Blocks run over the row-major flattening, so when ``in_features`` is
    not a multiple of ``bsz`` a block spans rows (tokens): the layer warns once when
    that happens (bitsandbytes' behaviour). Example::

        layer = LinearFP8Mixed(768, 3072, rngs=nnx.Rngs(0))
        out = layer(jnp.ones((32, 128, 768), jnp.float16))   # float16

    Args:
      in_features, out_features: ints ≥ 1.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as ``nnx.Linear``
        (see the module docstring for ``dtype=None``).
      fw_format, bw_format: codebooks (names, :class:`fp8core.Codebook`, tables).
      bsz, bsz2: block sizes, ``None`` (or -1) for bitsandbytes' rule.

    Raises:
      TypeError / ValueError: bad features, dtypes, formats or block sizes.
    """

    mode: tp.ClassVar[str] = "mixed"


class LinearFP8Global(_LinearFP8Bnb):
    """``nnx.Linear`` with :func:`fp8core_jax.matmul_fp8_global` (recipe ``BNB_GLOBAL``:
    one scale per tensor). Arguments as :class:`LinearFP8Mixed`; ``bsz``/``bsz2`` are
    kept for parity and unused.
    """

    mode: tp.ClassVar[str] = "global"


_MODES = {"mixed": LinearFP8Mixed, "global": LinearFP8Global}


def _from_linear(linear: nnx.Linear, cls, **fp8_kwargs) -> LinearFP8:
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
    mode: str | None = None,
    *,
    recipe: tp.Any = None,
    module_filter_fn: tp.Callable[[nnx.Module, str], bool] | None = None,
    fw_format: tp.Any = None,
    bw_format: tp.Any = None,
    bsz: int | None = None,
    bsz2: int | None = None,
) -> nnx.Module:
    """Replace the ``nnx.Linear`` layers of ``model`` by FP8 layers, in place.

    With ``recipe`` (an :class:`fp8core.recipe.LinearRecipe` or a preset name) the
    layers become :class:`LinearFP8`; otherwise bitsandbytes' layers: ``mode``
    ``"mixed"`` (default) or ``"global"`` with ``fw_format`` / ``bw_format`` (default
    e4m3 / e5m2) and ``bsz`` / ``bsz2`` (``None``: from each layer's own features).
    Each replacement keeps the original ``kernel`` and ``bias`` ``nnx.Param``
    objects (no copy; shared references stay shared) and its ``dtype`` /
    ``param_dtype``. Like torchao's ``convert_to_float8_training``,
    ``module_filter_fn(module, fqn)`` (``fqn`` = the dotted attribute path, e.g.
    ``"layers.0"``) returns False for layers to keep as they are. A model that *is* an
    ``nnx.Linear`` is returned converted (it cannot be replaced in place).

    Returns:
      ``model`` (modified), or the new layer when ``model`` is an ``nnx.Linear``.

    Raises:
      ValueError: unknown ``mode`` or preset; ``recipe`` together with ``mode`` or the
        bitsandbytes options. TypeError: ``recipe`` not a recipe; bad formats or block sizes.
    """
    kind, kwargs = fp8core.recipe.conversion(mode, recipe, fw_format, bw_format, bsz, bsz2)
    cls = LinearFP8 if kind == "recipe" else _MODES[kind]
    if kind != "recipe":  # hashable codebooks, resolved once for every layer
        kwargs.update(fw_format=_q._resolve_named(kwargs["fw_format"], "fw_format"),
                      bw_format=_q._resolve_named(kwargs["bw_format"], "bw_format"))

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
