"""The sculpt-jax model zoo (layer 1): Flax Linen CNNs and ViTs with a name registry.

Every model is an `nn.Module` with ``__call__(x, train: bool = False) -> logits [B, num_classes]``
on NHWC float32 input; BatchNorm statistics live in the "batch_stats" collection (update them with
``model.apply(variables, x, train=True, mutable=["batch_stats"])``) and VGG-ImageNet / ViT dropout
needs a "dropout" rng when ``train=True``.

    model = get_model("resnet20")                       # CIFAR-10 ResNet-20, option-A shortcuts
    spec = model_spec("resnet20")                       # input_shape (32, 32, 3), 10 classes
    variables = init_model(model, jax.random.key(0), spec.input_shape)
    logits = model.apply(variables, x)                  # x: [B, 32, 32, 3] float32

Family modules are imported lazily, so `list_models` / `model_spec` cost nothing. The core of
sculpt-jax never imports this package; tests, experiments and the CLI choose models by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of a registered model.

    Attributes:
      name: registry name (lowercase).
      family: "resnet_cifar", "vgg", "mobilenet", "resnet_imagenet" or "vit".
      input_shape: default per-example input shape (H, W, C); callers may use another (CIFAR CNNs
        take any H, W >= 8 and C in {1, 3}; ImageNet models and ViTs need H, W divisible by their
        total stride / patch size).
      num_classes: default number of classes.
      description: one line (architecture, source of the published parameter count).
    """

    name: str
    family: str
    input_shape: tuple[int, int, int]
    num_classes: int
    description: str


@dataclasses.dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    module: str  # module under sculpt_jax.models
    factory: str  # attribute: a Module class or a partial of one, called with num_classes=...
    kwargs: tuple[tuple[str, Any], ...] = ()
    obj: Callable[..., nn.Module] | None = None  # user models: the factory itself


_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)
_REGISTRY: dict[str, _Entry] = {}


def _register(
    name: str,
    family: str,
    module: str,
    factory: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    description: str,
    **kwargs: Any,
) -> None:
    spec = ModelSpec(name, family, input_shape, num_classes, description)
    _REGISTRY[name] = _Entry(spec, module, factory, tuple(sorted(kwargs.items())))


_CIFAR_RESNET_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M"}
for _depth, _p in _CIFAR_RESNET_PARAMS.items():
    _register(
        f"resnet{_depth}",
        "resnet_cifar",
        "resnet_cifar",
        f"resnet{_depth}",
        _CIFAR,
        10,
        f"CIFAR ResNet-{_depth} (He et al. 2016), option-A zero-pad shortcuts, {_p} params",
        shortcut="A",
    )
    _register(
        f"resnet{_depth}_b",
        "resnet_cifar",
        "resnet_cifar",
        f"resnet{_depth}",
        _CIFAR,
        10,
        f"CIFAR ResNet-{_depth}, option-B 1x1 conv + BN projection shortcuts",
        shortcut="B",
    )
_register(
    "resnet8_tiny",
    "resnet_cifar",
    "resnet_cifar",
    "resnet8_tiny",
    _CIFAR,
    10,
    "test-size CIFAR ResNet-8: 1 block per stage, widths 4/8/16, option A",
    shortcut="A",
)

_register(
    "vgg16", "vgg", "vgg", "vgg16_cifar", _CIFAR, 10, "VGG-16-BN, CIFAR head (512 -> classes)"
)
_register(
    "vgg19", "vgg", "vgg", "vgg19_cifar", _CIFAR, 10, "VGG-19-BN, CIFAR head (512 -> classes)"
)
_register(
    "vgg16_imagenet",
    "vgg",
    "vgg",
    "vgg16_imagenet",
    _IMAGENET,
    1000,
    "VGG-16-BN, ImageNet head 7x7x512 -> 4096 -> 4096 -> classes, 138.37M params",
)
_register(
    "vgg19_imagenet",
    "vgg",
    "vgg",
    "vgg19_imagenet",
    _IMAGENET,
    1000,
    "VGG-19-BN, ImageNet head 7x7x512 -> 4096 -> 4096 -> classes, 143.68M params",
)
_register("vgg_tiny", "vgg", "vgg", "vgg_tiny", _CIFAR, 10, "test-size VGG-BN (4 convs, 8-16 ch)")

_register(
    "mobilenet_v1",
    "mobilenet",
    "mobilenet",
    "mobilenet_v1_cifar",
    _CIFAR,
    10,
    "MobileNet-V1 with a CIFAR stem (stride-1 stem, 32x32 -> 2x2)",
)
_register(
    "mobilenet_v2",
    "mobilenet",
    "mobilenet",
    "mobilenet_v2_cifar",
    _CIFAR,
    10,
    "MobileNet-V2 with a CIFAR stem (stride-1 stem and first stages, 32x32 -> 4x4)",
)
_register(
    "mobilenet_v1_imagenet",
    "mobilenet",
    "mobilenet",
    "mobilenet_v1_imagenet",
    _IMAGENET,
    1000,
    "MobileNet-V1 1.0-224 (Howard et al. 2017), 4.23M params",
)
_register(
    "mobilenet_v2_imagenet",
    "mobilenet",
    "mobilenet",
    "mobilenet_v2_imagenet",
    _IMAGENET,
    1000,
    "MobileNet-V2 1.0-224 (Sandler et al. 2018, torchvision layout), 3.50M params",
)
_register(
    "mobilenet_v1_tiny",
    "mobilenet",
    "mobilenet",
    "mobilenet_v1_tiny",
    _CIFAR,
    10,
    "test-size MobileNet-V1 (3 depthwise-separable blocks)",
)
_register(
    "mobilenet_v2_tiny",
    "mobilenet",
    "mobilenet",
    "mobilenet_v2_tiny",
    _CIFAR,
    10,
    "test-size MobileNet-V2 (3 inverted residual blocks)",
)

_register(
    "resnet50",
    "resnet_imagenet",
    "resnet_imagenet",
    "resnet50",
    _IMAGENET,
    1000,
    "ResNet-50 (torchvision layout, bottleneck, 1x1 projection shortcuts), 25.56M params",
)
_register(
    "resnet50_tiny",
    "resnet_imagenet",
    "resnet_imagenet",
    "resnet50_tiny",
    _CIFAR,
    10,
    "test-size bottleneck ResNet (1 block per stage, 4-32 ch, ImageNet-style stem)",
)

_register(
    "vit_b16",
    "vit",
    "vit",
    "vit_b16",
    _IMAGENET,
    1000,
    "ViT-B/16 (Dosovitskiy et al. 2021): patch 16, dim 768, depth 12, 12 heads, 86.57M params",
)
_register(
    "vit_small",
    "vit",
    "vit",
    "vit_small",
    _CIFAR,
    10,
    "small ViT for 32x32: patch 4, dim 192, depth 6, 3 heads, MLP 768",
)
_register(
    "vit_tiny", "vit", "vit", "vit_tiny", _CIFAR, 10, "test-size ViT: patch 8, dim 16, 2 blocks"
)


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_REGISTRY)


def register_model(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    description: str = "",
) -> None:
    """Adds a user model to the registry, so configs, the CLI and reports can name it.

    Args:
      name: the registry name (lowercase; must not shadow a zoo model).
      factory: a Linen Module class (or a function returning a module) called as
        ``factory(num_classes=n)``; the module's ``__call__(x, train: bool = False)`` returns logits.
      input_shape / num_classes: defaults (H, W, C) and logits size, as for the zoo.
      description: one line for `info` and reports.
    """
    key = name.lower()
    if key in _REGISTRY and _REGISTRY[key].spec.family != "user":
        raise ValueError(f"register_model: {name!r} is a zoo model; pick another name")
    spec = ModelSpec(key, "user", tuple(input_shape), int(num_classes), description or name)
    _REGISTRY[key] = _Entry(spec, "", "", (), factory)


def _import_factory(name: str) -> Callable[..., nn.Module]:
    """The object named by ``"package.module:Attribute"`` (ValueError saying what is missing)."""
    mod, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"model {name!r}: cannot import module {mod!r} ({e}); put it on "
                         "PYTHONPATH or install it") from e  # fmt: skip
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: {mod} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r}: {attr} is not a Module class or factory function")
    return obj


def _user_entry(name: str) -> _Entry:
    """A ``"package.module:Factory"`` model: its class name, and no default input shape (the
    dataset's is used; `info` needs --input-shape)."""
    factory = _import_factory(name)
    spec = ModelSpec(name, "user", (), -1, f"user model {name}")
    return _Entry(spec, "", "", (), factory)


def _entry(name: str) -> _Entry:
    if isinstance(name, str) and ":" in name:
        return _user_entry(name)
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        names = list_models()
        close = difflib.get_close_matches(str(name).lower(), names, n=5, cutoff=0.4)
        rest = [n for n in names if n not in close]
        raise ValueError(
            f"unknown model {name!r} (a zoo name, or your own Linen module as "
            f"package.module:ClassName); valid names (closest first): {', '.join(close + rest)}"
        )
    return _REGISTRY[name.lower()]


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a registered model (ValueError listing valid names if unknown).

    A user model named ``"package.module:Factory"`` has ``input_shape == ()`` and
    ``num_classes == -1`` (unknown: the dataset's apply)."""
    return _entry(name).spec


def _call_factory(factory: Callable, name: str, n: int, attrs: dict) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {"num_classes": None}
    takes_n = "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    try:
        model = factory(num_classes=n, **attrs) if takes_n else factory(**attrs)
    except TypeError as e:
        raise ValueError(
            f"bad keyword for model {name!r}: {e}; pass only attributes of "
            f"{getattr(factory, 'func', factory).__name__} (see its docstring)"
        ) from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} built a {type(model).__name__}, not a flax.linen Module "
                         "(NNX modules: use the Python API, sculpt_jax.prune)")  # fmt: skip
    call = inspect.signature(type(model).__call__).parameters
    if "train" not in call and not any(p.kind == p.VAR_KEYWORD for p in call.values()):
        raise ValueError(f"model {name!r}: __call__ must accept train: bool = False (it switches "
                         "BatchNorm and dropout), as every zoo model does")  # fmt: skip
    return model


def get_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A fresh Flax Linen module for registered model `name`.

    Args:
      name: a name from `list_models()` (case-insensitive), or a user model as
        ``"package.module:ClassName"`` (a Linen Module class or factory; ``num_classes`` is passed
        when it takes one).
      num_classes: logits size; defaults to `model_spec(name).num_classes`.
      **kwargs: extra module attributes overriding the registry's (e.g. ``shortcut="B"``,
        ``dropout_rate=0.0``).
    Returns:
      the module; host-only (construction), its `apply` is jittable.
    """
    entry = _entry(name)
    factory: Callable[..., nn.Module] = entry.obj or getattr(
        importlib.import_module(f"sculpt_jax.models.{entry.module}"), entry.factory
    )
    n = entry.spec.num_classes if num_classes is None else int(num_classes)
    if n < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _call_factory(factory, name, n, {**dict(entry.kwargs), **kwargs})


def init_model(
    model: nn.Module, key: jax.Array, input_shape: tuple[int, ...], batch: int = 1
) -> dict[str, Any]:
    """Initialises `model` on zeros of shape [batch, *input_shape] (float32) with train=False.

    Jitted; host-callable. Returns the Linen variables dict ({"params": ..., "batch_stats": ...}
    for BN models), deterministic in `key`. Use
    `jax.eval_shape(lambda k: init_model(model, k, shape), key)` for shapes only.

    The random draws use the non-partitionable threefry layout (`jax.threefry_partitionable(False)`,
    scoped to this call, the same setting `sculpt_jax.config.use_fast_prng` makes global): XLA:CPU
    compiles a model's init 5-6x faster with it (ResNet-8-tiny: 3.3 s vs 17-21 s on the 2-core dev
    machine under load). So the values equal `model.init(key, x)` under that setting and differ
    from it under JAX's default; they are identical on every backend.
    """
    x = jnp.zeros((batch, *tuple(input_shape)), jnp.float32)
    with jax.threefry_partitionable(False):
        return jax.jit(lambda k, x: model.init(k, x, train=False))(key, x)


__all__ = ["ModelSpec", "get_model", "init_model", "list_models", "model_spec", "register_model"]
