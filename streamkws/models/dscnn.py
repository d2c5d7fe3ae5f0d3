"""DS-CNN: the depthwise-separable CNN of the MLPerf Tiny keyword-spotting benchmark."""

from __future__ import annotations

import torch
from torch import nn

from streamkws.errors import StreamKWSError
from streamkws.models.registry import KWSNet, check_float, check_int, register


def _ds_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
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

    ``widths`` (``blocks + 1`` integers) overrides ``channels`` per layer: ``widths[0]`` is
    the stem's output, ``widths[i + 1]`` block ``i``'s pointwise output (a depthwise conv
    keeps the width of its input). Structured pruning records its result this way.
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
        widths: list[int] | None = None,
    ) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        check_int("channels", channels)
        check_int("freq_stride", freq_stride)
        check_int("blocks", blocks, 0)
        check_float("dropout", dropout, 0.0, 0.95)
        if widths is None:
            widths = [channels] * (blocks + 1)
        if not isinstance(widths, list | tuple) or len(widths) != blocks + 1:
            raise StreamKWSError(
                f"model option 'widths' must be a list of blocks + 1 = {blocks + 1} "
                f"integers (got {widths!r})"
            )
        for w in widths:
            check_int("widths", w)
        self.stem = nn.Sequential(
            # freq_stride 4 gives the reference's 10 frequency rows on 40 mel bins (it
            # reads 10 MFCCs), a quarter of the compute of stride 2 here.
            nn.Conv2d(1, widths[0], (10, 4), stride=(2, freq_stride), padding=(4, 1),
                      bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        )
        self.blocks = nn.Sequential(*[_ds_block(widths[i], widths[i + 1])
                                      for i in range(blocks)])
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], n_classes),
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
