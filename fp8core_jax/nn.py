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
import fp8core.conversion as _conversion
import fp8core.random
import fp8core.recipe
from fp8core import _validation
from fp8core.conversion import REASONS, LayerRecord
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


class SRStream(nnx.Variable):
    """A stochastic-rounding layer's stream (§14.3): a uint32 counter, not a parameter
    (optimizers over ``nnx.Param`` leave it alone; ``nnx.jit`` / ``nnx.grad`` carry its
    update). Advanced by one per call, as the torch layer's ``sr_stream`` buffer."""


class LinearFP8(nnx.Module):
    """``nnx.Linear`` whose fprop, dgrad and wgrad GEMMs are quantized by ``recipe``
    (:func:`fp8core_jax.matmul_fp8`). Example::

        layer = LinearFP8(768, 3072, recipe="ROWWISE", rngs=nnx.Rngs(0))
        out = layer(jnp.ones((8, 128, 768)))              # (8, 128, 3072)

    Args:
      in_features, out_features: ints ≥ 0 (Python or NumPy integers; 0 gives an empty
        layer whose output is the bias, as ``nn.Linear(0, n)``).
      recipe: an :class:`fp8core.recipe.LinearRecipe` or a preset name (default
        ``"TENSORWISE"``, torchao's default recipe); stored resolved as ``recipe``.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as ``nnx.Linear``
        (see the module docstring for ``dtype=None``).
      seed: for a recipe with stochastic slots (§14.3): an int in ``[0, 2**32)``
        (default 0); the stream is the :class:`SRStream` variable ``sr_stream``, advanced
        by one per call — the torch layer's bits for the same seed and step.

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
        seed: int = 0,
    ):
        in_features = _validation.check_features(in_features, "in_features")
        out_features = _validation.check_features(out_features, "out_features")
        if dtype is not None:
            _validation.check_float_dtype(np.dtype(dtype).name, argname="dtype")
        _validation.check_float_dtype(np.dtype(param_dtype).name, argname="param_dtype")
        recipe = fp8core.recipe.get_recipe(recipe)
        fp8core.random.check_seed(seed)
        shape = (in_features, out_features)
        key = rngs.params()
        # an empty kernel has no values to draw (lecun_normal divides by fan_in = 0)
        self.kernel = nnx.Param(kernel_init(key, shape, param_dtype) if in_features * out_features
                                else jnp.zeros(shape, param_dtype))
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
        self.seed = int(seed)
        if recipe.stochastic_slots:   # §14.3: the stream, advanced by one per call
            self.sr_stream = SRStream(jnp.zeros((), jnp.uint32))
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
        return _apply(inputs, kernel, bias, self.recipe, argname="inputs", key=self._key())

    def _key(self):
        """uint32 ``[seed, stream]`` of a stochastic recipe (the stream then advances), else None."""
        if not self.recipe.stochastic_slots:
            return None
        stream = self.sr_stream[...]
        nxt = stream + jnp.uint32(1)
        if self.sr_stream._can_update:
            self.sr_stream[...] = nxt
        else:
            # a module merged inside a plain jax transform (jax.value_and_grad over
            # nnx.merge, as a functional training step does) holds Variables whose trace
            # flax does not recognise as current; the new value belongs to this trace and
            # leaves it through the caller's nnx.split, so it is set directly
            object.__setattr__(self.sr_stream, "_raw_value", nxt)
        return jnp.stack([jnp.uint32(self.seed), stream])

    def _warn_rows(self, inputs: jax.Array) -> None:
        if self._rows_warned.done or inputs.ndim < 2 or self.in_features * self.out_features == 0:
            return                                 # (an empty layer quantizes nothing)
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
        in_features = _validation.check_features(in_features, "in_features")
        out_features = _validation.check_features(out_features, "out_features")
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
        # an empty layer (0 features) gets the rule's smallest block; it quantizes nothing
        self.bsz = fp8core.select_block_size(max(in_features, 1)) if bsz in (None, -1) else bsz
        self.bsz2 = (fp8core.select_block_size(max(out_features, 1)) if bsz2 in (None, -1)
                     else bsz2)


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
      in_features, out_features: ints ≥ 0, as :class:`LinearFP8`.
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
    include_subclasses: bool = False,
    seed: int = 0,
) -> nnx.Module:
    """Replace the matmul layers of ``model`` by FP8 layers, in place, and report it.

    Converted: every ``nnx.Linear`` (exact type; subclasses only with
    ``include_subclasses=True``, since the swap drops their own ``__call__``) and every
    ``nnx.LinearGeneral`` that contracts the trailing axes without ``batch_axis`` or a
    custom ``dot_general`` — which includes the query/key/value/out projections of
    ``nnx.MultiHeadAttention`` (becomes :class:`LinearGeneralFP8`: the same kernel
    reshaped to ``(prod(in), prod(out))``, bit-identical to a hand-written
    :class:`LinearFP8` on the flattened features). ``nnx.Einsum``, ``nnx.Conv`` /
    ``nnx.ConvTranspose`` and other LinearGeneral layouts stay high precision and are
    reported.

    With ``recipe`` (an :class:`fp8core.recipe.LinearRecipe` or a preset name) the
    layers become :class:`LinearFP8`; otherwise bitsandbytes' layers: ``mode``
    ``"mixed"`` (default) or ``"global"`` with ``fw_format`` / ``bw_format`` (default
    e4m3 / e5m2) and ``bsz`` / ``bsz2`` (``None``: from each layer's own features).
    Each replacement keeps the original ``kernel`` and ``bias`` ``nnx.Param``
    objects (no copy; shared references stay shared) and its ``dtype`` /
    ``param_dtype``. Like torchao's ``convert_to_float8_training``,
    ``module_filter_fn(module, fqn)`` (``fqn`` = the dotted attribute path, e.g.
    ``"layers.0"``; called for candidate layers only: ``nnx.Linear``, or
    ``nnx.LinearGeneral`` whose ``in_features`` / ``out_features`` are tuples) returns
    False for layers to keep as they are. A model that *is* a layer is returned converted (it cannot be replaced
    in place).

    The report (:class:`fp8core.conversion.ConversionReport`) is attached as
    ``model.fp8_conversion_report`` (a static attribute), logged at INFO on the
    ``"fp8core"`` logger, and a ``UserWarning`` names the modules when nothing was
    converted or a module ``module_filter_fn`` did not exclude stays high precision.

    Returns:
      ``model`` (modified), or the new layer when ``model`` is a convertible layer.

    Raises:
      ValueError: unknown ``mode`` or preset; ``recipe`` together with ``mode`` or the
        bitsandbytes options. TypeError: ``model`` not an nnx.Module; ``recipe`` not a
        recipe; ``include_subclasses`` not a bool; bad formats or block sizes.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    _conversion.check_include_subclasses(include_subclasses)
    kind, kwargs = fp8core.recipe.conversion(mode, recipe, fw_format, bw_format, bsz, bsz2)
    cls = LinearFP8 if kind == "recipe" else _MODES[kind]
    if kind != "recipe":  # hashable codebooks, resolved once for every layer
        kwargs.update(fw_format=_q._resolve_named(kwargs["fw_format"], "fw_format"),
                      bw_format=_q._resolve_named(kwargs["bw_format"], "bw_format"))
        general_recipe = _bnb(kind, kwargs["fw_format"], kwargs["bw_format"],
                              -1 if kwargs["bsz"] is None else kwargs["bsz"],
                              -1 if kwargs["bsz2"] is None else kwargs["bsz2"])
    else:
        general_recipe = kwargs["recipe"]
    stochastic = kind == "recipe" and kwargs["recipe"].stochastic_slots
    fp8core.random.check_seed(seed)

    def seeded(fqn: str) -> dict:
        """§14.3: the layer's seed from ``seed`` and its PyTorch module path."""
        if not stochastic:
            return {}
        from fp8core_jax.transfer import _torch_prefix
        path = tuple(int(p) if p.isdigit() else p for p in fqn.split(".")) if fqn else ()
        return {"seed": fp8core.random.layer_seed(seed, _torch_prefix(model, path))}

    converted: list[LayerRecord] = []
    already: list[LayerRecord] = []
    skipped: list[LayerRecord] = []

    def visit(mod: nnx.Module, fqn: str) -> tuple[nnx.Module | None, bool]:
        """(replacement or None, descend into its submodules?)"""
        if isinstance(mod, (LinearFP8, LinearGeneralFP8)):
            already.append(_record(fqn, mod, recipe=mod.recipe.name))
            return None, False
        if isinstance(mod, nnx.Linear):
            if type(mod) is not nnx.Linear and not include_subclasses:
                skipped.append(_record(fqn, mod, reason=REASONS["subclass"].format(base="nnx.Linear")))
                return None, False
            if module_filter_fn is not None and not module_filter_fn(mod, fqn):
                skipped.append(_record(fqn, mod, reason=REASONS["filtered"]))
                return None, False
            new = _from_linear(mod, cls, **kwargs, **seeded(fqn))
            converted.append(_record(fqn, mod, recipe=new.recipe.name))
            return new, False
        if isinstance(mod, nnx.LinearGeneral):
            if not _general_convertible(mod):
                skipped.append(_record(fqn, mod, reason=REASONS["linear_general"].format(
                    axis=mod.axis)))
                return None, False
            if type(mod) is not nnx.LinearGeneral and not include_subclasses:
                skipped.append(_record(fqn, mod, reason=REASONS["subclass"].format(
                    base="nnx.LinearGeneral")))
                return None, False
            if module_filter_fn is not None and not module_filter_fn(mod, fqn):
                skipped.append(_record(fqn, mod, reason=REASONS["filtered"]))
                return None, False
            if stochastic:
                raise ValueError(
                    f"convert_to_fp8: recipe {general_recipe.name} rounds stochastically; "
                    f"LinearGeneralFP8 ({fqn}) takes no seed yet — keep LinearGeneral layers "
                    f"out (module_filter_fn) or use a recipe with nearest rounding")
            new = LinearGeneralFP8.from_linear_general(mod, recipe=general_recipe)
            converted.append(_record(fqn, mod, recipe=new.recipe.name))
            return new, False
        if isinstance(mod, nnx.Einsum):
            skipped.append(_record(fqn, mod, reason=REASONS["einsum"].format(
                einsum=repr(mod.einsum_str))))
            return None, False
        if isinstance(mod, (nnx.Conv, nnx.ConvTranspose)):
            skipped.append(_record(fqn, mod, reason=REASONS["unsupported"].format(kind=_kind(mod))))
            return None, False
        return None, True

    new, descend = visit(model, "")
    if new is not None:
        model = new
    elif descend:
        targets, stop = [], []
        for path, mod in nnx.iter_modules(model):
            if not path or any(path[:len(s)] == s for s in stop):
                continue
            replacement, descend = visit(mod, ".".join(map(str, path)))
            if replacement is not None:
                targets.append((path, replacement))
            if not descend:
                stop.append(path)
        for path, replacement in targets:
            parent = model
            for key in path[:-1]:
                parent = parent[key] if isinstance(key, int) else getattr(parent, key)
            if isinstance(path[-1], int):
                parent[path[-1]] = replacement
            else:
                setattr(parent, path[-1], replacement)
    report = _conversion.ConversionReport("jax", tuple(converted), tuple(already), tuple(skipped))
    model.fp8_conversion_report = report  # static (frozen, hashable)
    _conversion.log(report)
    _conversion.warn_if_incomplete(report)
    return model


def _kind(mod: nnx.Module) -> str:
    t = type(mod)
    return f"nnx.{t.__name__}" if t.__module__.startswith("flax.nnx") else t.__name__


def _record(fqn: str, mod: nnx.Module, **kw: tp.Any) -> LayerRecord:
    kernel = getattr(mod, "kernel", None)
    params = int(np.prod(kernel[...].shape)) if isinstance(kernel, nnx.Variable) else 0
    fin, fout = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
    fin = int(np.prod(fin)) if isinstance(fin, tuple) else fin
    fout = int(np.prod(fout)) if isinstance(fout, tuple) else fout
    return LayerRecord(fqn, _kind(mod), fin, fout, params, **kw)


def _general_convertible(mod: nnx.LinearGeneral) -> bool:
    """Whether a LinearGeneral is a plain matmul over its trailing axes (what
    :class:`LinearGeneralFP8` computes), e.g. every projection of nnx.MultiHeadAttention."""
    n = len(mod.axis)
    return (not mod.batch_axis and mod.dot_general is None and mod.dot_general_cls is None
            and mod.preferred_element_type is None
            and mod.promote_dtype is _nnx_dtypes.promote_dtype
            and all(isinstance(a, (int, np.integer)) for a in mod.axis)
            and tuple(int(a) for a in mod.axis) in (tuple(range(-n, 0)),))


class LinearGeneralFP8(nnx.Module):
    """An ``nnx.LinearGeneral`` over the trailing axes (no ``batch_axis``) whose matmul
    follows ``recipe``: ``inputs`` (..., *in_features) is flattened to (..., K), the
    kernel (*in_features, *out_features) viewed as (K, N), and the result
    ``matmul_fp8(x, kernel, recipe=recipe) + bias`` reshaped to (..., *out_features) —
    bit for bit a :class:`LinearFP8` on the flattened features. Built by
    :func:`convert_to_fp8` from nnx.MultiHeadAttention's projections (their
    ``kernel`` / ``bias`` Params are kept, shapes and names unchanged). Dtype rule as
    :class:`LinearFP8` (the input's dtype when ``dtype`` is None).
    """

    def __init__(self, in_features: tp.Sequence[int], out_features: tp.Sequence[int], *,
                 recipe: tp.Any = "TENSORWISE", use_bias: bool = True,
                 dtype: tp.Any | None = None, param_dtype: tp.Any = jnp.float32,
                 kernel_init: tp.Callable = default_kernel_init,
                 bias_init: tp.Callable = default_bias_init, rngs: nnx.Rngs):
        self.in_features = tuple(int(v) for v in in_features)
        self.out_features = tuple(int(v) for v in out_features)
        k, n = int(np.prod(self.in_features)), int(np.prod(self.out_features))
        _validation.check_features(k, "in_features")
        _validation.check_features(n, "out_features")
        self.recipe = fp8core.recipe.get_recipe(recipe)
        self.kernel = nnx.Param(jnp.reshape(kernel_init(rngs.params(), (k, n), param_dtype),
                                            (*self.in_features, *self.out_features)))
        self.bias: nnx.Param[jax.Array] | None
        self.bias = (nnx.Param(jnp.reshape(bias_init(rngs.params(), (n,), param_dtype),
                                           self.out_features)) if use_bias else nnx.data(None))
        self.axis = tuple(range(-len(self.in_features), 0))
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        self._rows_warned = _Once()

    def __call__(self, inputs: jax.Array, out_sharding: tp.Any = None) -> jax.Array:
        """``FP8(inputs @ kernel) + bias`` over the trailing ``len(in_features)`` axes.

        Raises:
          TypeError: ``inputs`` not floating point. ValueError: its trailing shape is not
            ``in_features``; ``out_sharding`` given (not supported by the FP8 matmul).
        """
        if out_sharding is not None:
            raise ValueError(f"LinearGeneralFP8: out_sharding={out_sharding!r} is not supported "
                             "(the FP8 matmul takes its output sharding from its inputs); pass None")
        if not hasattr(inputs, "dtype"):
            inputs = jnp.asarray(inputs)
        _validation.check_float_dtype(np.dtype(inputs.dtype).name, argname="inputs")
        n_in = len(self.in_features)
        if inputs.ndim < n_in or tuple(inputs.shape[inputs.ndim - n_in:]) != self.in_features:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)}, but LinearGeneralFP8(in_features="
                f"{self.in_features}, out_features={self.out_features}) expects trailing "
                f"dimensions {self.in_features}")
        lead = tuple(inputs.shape[:inputs.ndim - n_in])
        k, n = int(np.prod(self.in_features)), int(np.prod(self.out_features))
        x = jnp.reshape(inputs, (*lead, k))
        kernel = jnp.reshape(self.kernel[...], (k, n))
        bias = jnp.reshape(self.bias[...], (n,)) if self.bias is not None else None
        if self.dtype is not None:
            x, kernel, bias = _nnx_dtypes.promote_dtype((x, kernel, bias), dtype=self.dtype)
        if not self._rows_warned.done and x.ndim >= 2 and k * n:
            msg = self.recipe.rows_warning(int(np.prod(lead)), k, n, type(self).__name__)
            if msg is not None:
                self._rows_warned.done = True
                warnings.warn(msg, UserWarning, stacklevel=2)
        x, kernel, bias = _check_inputs(x, kernel, bias, argname="inputs")
        return jnp.reshape(_apply(x, kernel, bias, self.recipe, argname="inputs"),
                           (*lead, *self.out_features))

    @classmethod
    def from_linear_general(cls, layer: nnx.LinearGeneral, *, recipe: tp.Any) -> "LinearGeneralFP8":
        """A new FP8 layer holding ``layer``'s own ``kernel`` / ``bias`` Params."""
        if not (isinstance(layer, nnx.LinearGeneral) and _general_convertible(layer)):
            raise TypeError("layer must be an nnx.LinearGeneral over its trailing axes without "
                            f"batch_axis or a custom dot_general, got {layer!r:.200}")
        new = cls(layer.in_features, layer.out_features, recipe=recipe, use_bias=layer.use_bias,
                  dtype=layer.dtype, param_dtype=layer.param_dtype,
                  kernel_init=initializers.zeros_init(), rngs=nnx.Rngs(0))
        new.kernel = layer.kernel
        new.bias = layer.bias if layer.use_bias else nnx.data(None)
        return new


__all__ += ["LinearGeneralFP8"]
