"""DS-CNN: the depthwise-separable CNN of the MLPerf Tiny keyword-spotting benchmark."""

from __future__ import annotations

import torch
from torch import nn

from streamkws.models.registry import KWSNet, check_float, check_int, register


def _ds_block(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


@register("dscnn")
class DSCNN(KWSNet):
    """``ds_cnn`` of MLPerf Tiny (``benchmark/training/keyword_spotting/keras_model.py``).

    Input ``(B, T, F)`` is viewed as ``(B, 1, T, F)``; kernels are (time, freq)::

        Conv2d(1, C, (10, 4), stride 2, pad (4, 1)) -> BN -> ReLU -> Dropout(0.2)
        blocks x [depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 C -> BN -> ReLU]
        Dropout(0.4) -> global average pool -> Linear(C, n_classes)

    With ``channels=64`` and ``blocks=4`` this is the reference network (ARM's DS-CNN-S);
    ``channels=172`` is roughly DS-CNN-M. Differences from the Keras model: convolutions
    followed by BatchNorm have no bias (redundant; fusion recreates one), padding is
    symmetric instead of TF 'same' (the map is globally pooled, so only edge alignment
    differs), and the final pool is global so any number of frames works.
    """

    def __init__(
        self,
        n_classes: int = 12,
        n_frames: int = 98,
        n_mels: int = 40,
        channels: int = 64,
        blocks: int = 4,
        dropout: float = 0.4,
        freq_stride: int = 2,
    ) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        check_int("channels", channels)
        check_int("freq_stride", freq_stride)
        check_int("blocks", blocks, 0)
        check_float("dropout", dropout, 0.0, 0.95)
        self.stem = nn.Sequential(
            # freq_stride 4 gives the reference's 10 frequency rows on 40 mel bins (it
            # reads 10 MFCCs), a quarter of the compute of stride 2 here.
            nn.Conv2d(1, channels, (10, 4), stride=(2, freq_stride), padding=(4, 1), bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        )
        self.blocks = nn.Sequential(*[_ds_block(channels) for _ in range(blocks)])
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, n_classes),
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
