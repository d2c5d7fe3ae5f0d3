"""A small MobileNetV2 for one-channel spectrograms.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
scaled down for keyword spotting. Written here because torchvision is not a dependency.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from streamkws.errors import StreamKWSError
from streamkws.models.registry import KWSNet, check_float, check_int, register

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2
# but four stages deep and narrow: a 98 x 40 map is 13 x 5 after the last stride.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (4, 24, 2, 2),
    (4, 32, 2, 2),
    (4, 48, 1, 1),
)
_STEM = 16
_LAST = 128


def _divisible(v: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of 8 (SIMD-friendly), never 10% below ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if out < 0.9 * v:
        out += divisor
    return out


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        # ReLU, not the paper's ReLU6: conv+BN+ReLU fuses for quantization and ReLU6's
        # clipping is redundant once activations are int8 with an observed range.
        layers.append(nn.ReLU())
    return layers


class InvertedResidual(nn.Module):
    """1x1 expand -> ReLU -> 3x3 depthwise -> ReLU -> 1x1 linear projection [+ input]."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int,
                 hidden: int | None = None) -> None:
        super().__init__()
        # ``hidden`` overrides the expanded width (structured pruning); without an expansion
        # conv the depthwise conv runs on the input itself, so its width is fixed.
        hidden = in_ch * expansion if hidden is None or expansion == 1 else hidden
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(in_ch, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        # No activation after the projection: the paper's linear bottleneck.
        layers += _conv_bn(hidden, out_ch, 1, relu=False)
        self.conv = nn.Sequential(*layers)
        # Created only when used: an idle FloatFunctional's observer never sees data and
        # makes convert() warn.
        self.add = FloatFunctional() if stride == 1 and in_ch == out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add is not None:
            return self.add.add(x, self.conv(x))
        return self.conv(x)


@register("mobilenetv2")
class MobileNetV2(KWSNet):
    """MobileNetV2 with a width multiplier, on ``(B, 1, T, F)`` (kernels square).

    ::

        Conv2d(1, 16w, 3, stride 2) -> BN -> ReLU                        T/2 x F/2
        inverted residuals (t, c, n, s): (1, 16, 1, 1), (4, 24, 2, 2),
                                         (4, 32, 2, 2), (4, 48, 1, 1)    T/8 x F/8
        Conv2d(48w, 128 * max(1, w), 1) -> BN -> ReLU
        global average pool -> Dropout -> Linear(128 * max(1, w), n_classes)

    Widths ``c * w`` are rounded to multiples of 8. Differences from the ImageNet network:
    one input channel, four bottleneck stages instead of seven, expansion 4 instead of 6,
    ReLU instead of ReLU6. Global pooling makes any number of frames work.

    ``inner_channels`` (one integer per inverted residual, 6 blocks) overrides the expanded
    (inner) width of each block; a block without expansion (the first) must keep its input
    width. ``last_channels`` overrides the final 1x1 conv's width. Structured pruning
    records its result through them; block input/output widths are tied by the residual
    additions and stay as ``width`` makes them.
    """

    def __init__(
        self,
        n_classes: int = 12,
        n_frames: int = 98,
        n_mels: int = 40,
        width: float = 1.0,
        dropout: float = 0.2,
        inner_channels: list[int] | None = None,
        last_channels: int | None = None,
    ) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        check_float("width", width, 0.25, 4.0)
        check_float("dropout", dropout, 0.0, 0.95)
        n_blocks = sum(n for _, _, n, _ in _SETTINGS)
        if inner_channels is not None:
            if not isinstance(inner_channels, list | tuple) or len(inner_channels) != n_blocks:
                raise StreamKWSError(
                    f"model option 'inner_channels' must be a list of {n_blocks} integers "
                    f"(got {inner_channels!r})"
                )
            for c in inner_channels:
                check_int("inner_channels", c)
        if last_channels is not None:
            check_int("last_channels", last_channels)
        stem = _divisible(_STEM * width)
        self.stem = nn.Sequential(*_conv_bn(1, stem, 3, 2))
        blocks: list[nn.Module] = []
        in_ch = stem
        for t, c, n, s in _SETTINGS:
            out_ch = _divisible(c * width)
            for i in range(n):
                hidden = None
                if inner_channels is not None:
                    hidden = inner_channels[len(blocks)]
                    if t == 1 and hidden != in_ch:
                        raise StreamKWSError(
                            f"model option 'inner_channels': block {len(blocks)} has no "
                            f"expansion, so its inner width is its input width {in_ch} "
                            f"(got {hidden})"
                        )
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, hidden))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        # Like torchvision, the final feature width never shrinks below its default: it is
        # the classifier's input and cheap at T/8 x F/8. (Only pruning narrows it, through
        # last_channels, and only as far as the accuracy allows.)
        last = last_channels or _divisible(_LAST * max(1.0, width))
        self.head = nn.Sequential(
            *_conv_bn(in_ch, last, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(last, n_classes),
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
