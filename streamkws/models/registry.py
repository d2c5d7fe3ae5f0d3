"""The architecture registry and the contract every keyword-spotting model follows.

A model maps normalised log-Mel features ``(B, T, F)`` (float32, ``T`` frames, ``F`` mel
bins) to logits ``(B, n_classes)``. Models are built by name through :func:`build_model`,
which records the architecture name and the complete constructor arguments on the model
(``arch_name``, ``arch_kwargs``) so a checkpoint can be rebuilt from JSON alone::

    model = build_model("bcresnet", n_classes=12, n_frames=98, n_mels=40, scale=2)
    twin = build_model(model.arch_name, **model.arch_kwargs)

Every single network derives from :class:`KWSNet` (``ensemble`` is a container of such
networks, each with its own stubs), which makes it ready for eager-mode static
quantization: a ``QuantStub``/``DeQuantStub`` pair around the quantizable body (identities
in float) and a :meth:`KWSNet.fuse_model` that fuses the conv+BN(+ReLU) and linear+ReLU
runs laid out in plain ``nn.Sequential`` containers.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

from streamkws.errors import StreamKWSError

ModelFactory = Callable[..., nn.Module]
_Factory = TypeVar("_Factory", bound=ModelFactory)

ARCHITECTURES: dict[str, ModelFactory] = {}
"""Architecture name -> factory taking ``n_classes``, ``n_frames``, ``n_mels`` and options."""

_REQUIRED = ("n_classes", "n_frames", "n_mels")


def register(name: str) -> Callable[[_Factory], _Factory]:
    """Register a model factory under ``name`` (a class or a function returning a model)."""

    def deco(factory: _Factory) -> _Factory:
        if name in ARCHITECTURES:
            # Two families claiming one name would make checkpoints load the wrong network.
            raise ValueError(f"architecture {name!r} is already registered")
        params = inspect.signature(factory).parameters
        missing = [p for p in _REQUIRED if p not in params]
        if missing:
            raise TypeError(f"factory for {name!r} must accept {', '.join(missing)}")
        ARCHITECTURES[name] = factory
        return factory

    return deco


def _ensure_registered() -> None:
    # The families register themselves on import; importing them here means
    # ``registry.build_model`` works even when only this module was imported.
    from streamkws.models import (  # noqa: F401
        bcresnet,
        cnn,
        dscnn,
        ensemble,
        mobile,
        speech_embedding,
    )


def build_model(arch: str, n_classes: int, n_frames: int, n_mels: int, **kwargs: Any) -> nn.Module:
    """Build architecture ``arch`` and record how to rebuild it.

    Raises :class:`StreamKWSError` for an unknown architecture, an option the architecture
    does not take, an option that cannot be stored as JSON, or sizes it cannot handle.
    """
    _ensure_registered()
    factory = ARCHITECTURES.get(arch)
    if factory is None:
        known = ", ".join(sorted(ARCHITECTURES))
        close = difflib.get_close_matches(str(arch), ARCHITECTURES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise StreamKWSError(f"unknown model architecture {arch!r}{hint}; known: {known}")

    sig = inspect.signature(factory)
    accepted = [p for p in sig.parameters if p not in _REQUIRED]
    for key in kwargs:
        if key not in sig.parameters or key in _REQUIRED:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            options = ", ".join(accepted) if accepted else "none"
            raise StreamKWSError(
                f"model architecture {arch!r} has no option {key!r}{hint}; options: {options}"
            )
    for key, value in (("n_classes", n_classes), ("n_frames", n_frames), ("n_mels", n_mels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StreamKWSError(f"model {key} must be a positive integer (got {value!r})")

    bound = sig.bind(n_classes=n_classes, n_frames=n_frames, n_mels=n_mels, **kwargs)
    # Defaults are recorded too, so a checkpoint survives a later change of a default.
    bound.apply_defaults()
    arch_kwargs = dict(bound.arguments)
    try:
        # Round-trip so the recorded kwargs are exactly what a JSON checkpoint gives back.
        arch_kwargs = json.loads(json.dumps(arch_kwargs))
    except (TypeError, ValueError) as exc:
        raise StreamKWSError(f"model options for {arch!r} must be JSON values: {exc}") from exc

    model = factory(**arch_kwargs)
    model.arch_name = arch
    model.arch_kwargs = arch_kwargs
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, frozen ones included (buffers such as BN stats are not).

    Quantized modules keep their weights in packed form, outside ``parameters()``; count the
    float model.
    """
    return sum(p.numel() for p in model.parameters())


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer model option (JSON configs can carry strings or floats)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StreamKWSError(
            f"model option {name!r} must be an integer >= {minimum} (got {value!r})"
        )
    return value


def check_float(name: str, value: Any, low: float, high: float) -> float:
    """Validate a real model option within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise StreamKWSError(f"model option {name!r} must be within {low}..{high} (got {value!r})")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Validate a true/false model option (JSON configs can carry 0/1 or strings)."""
    if not isinstance(value, bool):
        raise StreamKWSError(f"model option {name!r} must be true or false (got {value!r})")
    return value


def check_features(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse anything but log-Mel features ``(B, T, model.n_mels)``, naming the layout."""
    if x.dim() != 3 or x.shape[2] != model.n_mels:
        raise StreamKWSError(
            f"{type(model).__name__} expects features (batch, frames, {model.n_mels}); "
            f"got shape {tuple(x.shape)}"
        )


def fusion_groups(root: nn.Module) -> list[list[str]]:
    """Names of the module runs inside plain ``nn.Sequential`` containers that eager-mode
    quantization can fuse: Conv2d+BatchNorm2d(+ReLU), Conv2d+ReLU, Linear+ReLU."""
    patterns: list[tuple[type[nn.Module], ...]] = [
        (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
        (nn.Conv2d, nn.BatchNorm2d),
        (nn.Conv2d, nn.ReLU),
        (nn.Linear, nn.ReLU),
    ]
    groups: list[list[str]] = []
    for prefix, seq in root.named_modules():
        # Exact type only: fused intrinsic modules subclass Sequential and must not be
        # matched again, which also makes fuse_model() idempotent.
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        mods = list(seq._modules.values())
        i = 0
        while i < len(mods):
            for pat in patterns:
                run = mods[i : i + len(pat)]
                matched = len(run) == len(pat) and all(
                    type(m) is t for m, t in zip(run, pat, strict=True)
                )
                if matched:
                    base = f"{prefix}." if prefix else ""
                    groups.append([base + n for n in names[i : i + len(pat)]])
                    i += len(pat)
                    break
            else:
                i += 1
    return groups


class KWSNet(nn.Module):
    """Base class: input checks, quant stubs and fusion shared by every architecture.

    Subclasses set up their layers and implement :meth:`body`, which maps the (possibly
    quantized) image ``(B, 1, H, W)`` from :meth:`to_image` to logits ``(B, n_classes)``.
    """

    arch_name: str
    arch_kwargs: dict[str, Any]
    fixed_frames: bool = False
    """True when the network only accepts exactly ``n_frames`` frames (a flattening FC)."""
    min_frames: int = 1
    """The shortest window it can be built for (a fixed receptive field needs more)."""
    prunable: bool = True
    """False when pruning would damage it (pretrained, frozen weights)."""
    statically_quantizable: bool = True
    """False when :meth:`fuse_model` refuses: parts of it cannot run in int8."""

    def __init__(self, n_classes: int, n_frames: int, n_mels: int) -> None:
        super().__init__()
        self.n_classes = check_int("n_classes", n_classes)
        self.n_frames = check_int("n_frames", n_frames)
        self.n_mels = check_int("n_mels", n_mels)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features -> (B, 1, T, F); done in float, before the quant stub."""
        return x.unsqueeze(1)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(self, x)
        if self.fixed_frames and x.shape[1] != self.n_frames:
            raise StreamKWSError(
                f"{type(self).__name__} was built for {self.n_frames} frames; "
                f"got {x.shape[1]}"
            )
        x = self.quant(self.to_image(x))
        return self.dequant(self.body(x))

    def fuse_model(self) -> None:
        """Fuse conv+BN(+ReLU) and linear+ReLU in place, for static quantization.

        Needs eval mode: folding BN into the conv uses its running statistics.
        """
        if self.training:
            raise RuntimeError("fuse_model() folds BatchNorm statistics; call model.eval() first")
        groups = fusion_groups(self)
        if groups:
            fuse_modules(self, groups, inplace=True)


class FloatIsland(nn.Module):
    """Runs ``module`` in float inside a statically quantized network.

    For ops with no quantized kernel (SiLU, for one): the stubs are identities in float and
    become dequantize/quantize after ``convert``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.module = module
        self.quant = QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.module(self.dequant(x)))


class KWSModel(nn.Module):
    """Feature normalisation followed by the network: log-Mel ``(B, T, F)`` -> logits.

    The per-bin mean and scale are fitted on the training data and travel with the bundle,
    so callers feed raw front-end output.
    """

    def __init__(self, net: nn.Module, mean: torch.Tensor, inv_std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("inv_std", inv_std.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * self.inv_std)
