"""BC-ResNet: broadcasted residual learning for keyword spotting.

Kim, Chang, Lee, Sung, "Broadcasted Residual Learning for Efficient Keyword Spotting",
Interspeech 2021, following the structure of Qualcomm's reference implementation
(github.com/Qualcomm-AI-research/bcresnet). Each block splits its work between a
frequency-wise depthwise conv on the 2-D map (with SubSpectral Normalisation) and a
temporal depthwise conv on the frequency-averaged 1-D map, whose output is broadcast back
over frequency and added, plus the identity shortcut.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from streamkws.models.registry import (
    FloatIsland,
    KWSNet,
    check_bool,
    check_float,
    register,
)

_SUB_BANDS = 5
_BLOCKS_PER_STAGE = (2, 2, 4, 4)
_STRIDED_STAGES = (1, 2)


class SubSpectralNorm(nn.Module):
    """BatchNorm with separate statistics and affine per frequency sub-band.

    Input ``(B, C, H, W)`` with frequency along ``H``. The paper splits ``H`` into 5 equal
    sub-bands; here the split is as equal as ``torch.tensor_split`` makes it, so any number
    of mel bins works (for ``H`` divisible by 5 it is exactly the paper's SSN), and the
    number of bands drops to ``H`` when fewer than 5 bins are left.

    One ``BatchNorm2d(C)`` per band rather than the reference's reshape into
    ``BatchNorm2d(C * 5)``: the reshape needs equal bands, and separate BNs convert to
    quantized BatchNorm under static quantization, so SSN runs in int8 too.
    """

    def __init__(self, channels: int, n_freq: int, sub_bands: int = _SUB_BANDS) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.sub_bands = max(1, min(sub_bands, n_freq))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(self.sub_bands))
        self.cat = FloatFunctional() if self.sub_bands > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cat is None:
            return self.norms[0](x)
        bands = torch.tensor_split(x, self.sub_bands, dim=2)
        return self.cat.cat([norm(b) for norm, b in zip(self.norms, bands, strict=True)], dim=2)


class BCResBlock(nn.Module):
    """One broadcasted-residual block (``BCResBlock`` of the reference).

    ``f2``: [1x1 conv -> BN -> ReLU, when the width changes] -> depthwise (3, 1) conv over
    frequency (stride 2 on the first block of a strided stage) -> SSN.
    ``f1``: average over frequency -> depthwise (1, 3) conv over time, dilated by
    ``dilation`` -> BN -> SiLU -> 1x1 conv -> Dropout2d.
    Output: ReLU(f1 broadcast + f2 [+ input, unless the width or resolution changes]).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        n_freq_in: int,
        stride: int,
        dilation: int,
        swish: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.transition = in_ch != out_ch
        layers: list[nn.Module] = []
        if self.transition:
            layers += [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
        n_freq = (n_freq_in - 1) // stride + 1
        layers += [
            nn.Conv2d(
                out_ch, out_ch, (3, 1), stride=(stride, 1), padding=(1, 0), groups=out_ch,
                bias=False,
            ),
            SubSpectralNorm(out_ch, n_freq),
        ]
        self.f2 = nn.Sequential(*layers)
        self.freq_pool = nn.AdaptiveAvgPool2d((1, None))
        # SiLU has no quantized kernel; the island keeps it in float after static
        # quantization. swish=False swaps in ReLU, which fuses and stays int8.
        act: nn.Module = FloatIsland(nn.SiLU()) if swish else nn.ReLU()
        self.f1 = nn.Sequential(
            nn.Conv2d(
                out_ch, out_ch, (1, 3), padding=(0, dilation), dilation=(1, dilation),
                groups=out_ch, bias=False,
            ),
            nn.BatchNorm2d(out_ch),
            act,
            nn.Conv2d(out_ch, out_ch, 1, bias=False),
            nn.Dropout2d(dropout),
        )
        # The reference skips the identity shortcut only on width changes; the first block
        # of a strided stage always changes width there, but a shape mismatch must never
        # reach the add whatever the widths.
        shortcut = not self.transition and stride == 1
        # One FloatFunctional per add, each observing its own output range; none where
        # unused, since an observer that never sees data makes convert() warn.
        self.broadcast_add = FloatFunctional()
        self.residual_add = FloatFunctional() if shortcut else None
        self.n_freq_out = n_freq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = self.f2(x)
        y = self.f1(self.freq_pool(aux))
        if self.residual_add is None:
            return self.broadcast_add.add_relu(aux, y)
        return self.residual_add.add_relu(self.broadcast_add.add(aux, y), x)


def _widths(scale: float) -> list[int]:
    base = int(8 * scale)
    return [base * 2, base, int(base * 1.5), base * 2, int(base * 2.5), base * 4]


@register("bcresnet")
class BCResNet(KWSNet):
    """BC-ResNet-``scale`` (scale 1, 1.5, 2, 3, 6, 8 in the paper; base width ``8 * scale``).

    Input ``(B, T, F)`` is transposed to ``(B, 1, F, T)`` as in the reference, so the
    network's height is frequency and its width is time::

        Conv2d(1, 2c, 5, stride (2, 1)) -> BN -> ReLU            F/2
        stage 0: 2 blocks, width c,    dilation 1
        stage 1: 2 blocks, width 1.5c, dilation 2, stride 2      F/4
        stage 2: 4 blocks, width 2c,   dilation 4, stride 2      F/8
        stage 3: 4 blocks, width 2.5c, dilation 8
        depthwise (5, 5) conv, no frequency padding -> 1x1 conv to 4c -> BN -> ReLU
        global average pool -> Linear(4c, n_classes)

    With 40 mel bins the last stages see 5 frequency rows, which the (5, 5) classifier
    kernel collapses exactly as in the reference; with fewer than 5 rows left (``F <= 32``)
    the kernel shrinks to the rows there are. Time is never strided, so any number of
    frames works. The reference's final 1x1 conv on the pooled map is an equivalent
    ``nn.Linear`` here (same parameters) so that dynamic quantization covers it.

    Static quantization: everything runs in int8, SubSpectralNorm included, except the
    SiLU in each block's temporal branch (no quantized kernel; it is dequantized around
    it). ``swish=False`` uses ReLU there instead and is fully int8, at some accuracy cost.
    """

    def __init__(
        self,
        n_classes: int = 12,
        n_frames: int = 98,
        n_mels: int = 40,
        scale: float = 1.0,
        swish: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        check_float("scale", scale, 0.25, 16.0)
        check_float("dropout", dropout, 0.0, 0.95)
        check_bool("swish", swish)
        c = _widths(scale)
        self.widths = c
        self.head = nn.Sequential(
            nn.Conv2d(1, c[0], 5, stride=(2, 1), padding=2, bias=False),
            nn.BatchNorm2d(c[0]),
            nn.ReLU(),
        )
        n_freq = math.ceil(n_mels / 2)
        blocks: list[BCResBlock] = []
        for stage, n_blocks in enumerate(_BLOCKS_PER_STAGE):
            for i in range(n_blocks):
                in_ch = c[stage] if i == 0 else c[stage + 1]
                stride = 2 if stage in _STRIDED_STAGES and i == 0 else 1
                block = BCResBlock(in_ch, c[stage + 1], n_freq, stride, 2**stage, swish, dropout)
                n_freq = block.n_freq_out
                blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        k_freq = min(5, n_freq)
        self.classifier = nn.Sequential(
            nn.Conv2d(c[-2], c[-2], (k_freq, 5), padding=(0, 2), groups=c[-2], bias=False),
            nn.Conv2d(c[-2], c[-1], 1, bias=False),
            nn.BatchNorm2d(c[-1]),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c[-1], n_classes),
        )

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).unsqueeze(1).contiguous()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.head(x)))


def _alias(name: str, scale: float) -> None:
    def factory(
        n_classes: int = 12,
        n_frames: int = 98,
        n_mels: int = 40,
        swish: bool = True,
        dropout: float = 0.1,
    ) -> BCResNet:
        return BCResNet(n_classes, n_frames, n_mels, scale=scale, swish=swish, dropout=dropout)

    factory.__name__ = name
    factory.__doc__ = f"BC-ResNet-{scale:g} (:class:`BCResNet` with ``scale={scale:g}``)."
    register(name)(factory)


for _scale in (1, 2, 3):
    _alias(f"bcresnet{_scale}", float(_scale))
