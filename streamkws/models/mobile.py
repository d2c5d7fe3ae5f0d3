"""A small MobileNetV2 for one-channel spectrograms.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
scaled down for keyword spotting. Written here because torchvision is not a dependency.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from streamkws.models.registry import KWSNet, check_float, register

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

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
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
    """

    def __init__(
        self,
        n_classes: int = 12,
        n_frames: int = 98,
        n_mels: int = 40,
        width: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        check_float("width", width, 0.25, 4.0)
        check_float("dropout", dropout, 0.0, 0.95)
        stem = _divisible(_STEM * width)
        self.stem = nn.Sequential(*_conv_bn(1, stem, 3, 2))
        blocks: list[nn.Module] = []
        in_ch = stem
        for t, c, n, s in _SETTINGS:
            out_ch = _divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        # Like torchvision, the final feature width never shrinks below its default: it is
        # the classifier's input and cheap at T/8 x F/8.
        last = _divisible(_LAST * max(1.0, width))
        self.head = nn.Sequential(
            *_conv_bn(in_ch, last, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(last, n_classes),
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
