"""The small CNN of the Speech Commands / quantization tutorials."""

from __future__ import annotations

import torch
from torch import nn

from streamkws.models.registry import KWSNet, check_float, check_int, register


def _same_pad(kernel: tuple[int, int]) -> nn.ZeroPad2d:
    """TensorFlow-style 'same' padding for stride 1: the odd pixel goes after.

    Explicit padding rather than ``Conv2d(padding='same')`` because an even kernel needs
    asymmetric padding, which the quantized conv cannot express; ZeroPad2d runs on
    quantized tensors.
    """
    kt, kf = kernel
    return nn.ZeroPad2d(((kf - 1) // 2, kf // 2, (kt - 1) // 2, kt // 2))


@register("tutorial_cnn")
class TutorialCNN(KWSNet):
    """Two conv layers and a two-layer classifier over the whole (time, freq) map.

    Input ``(B, T, F)`` is viewed as a one-channel image ``(B, 1, T, F)``; kernels are given
    as (time, freq)::

        ZeroPad2d(t 3+4, f 9+10) -> Conv2d(1, 32, (8, 20)) -> BN -> ReLU   (B, 32, T, F)
        MaxPool2d(2)                                                   (B, 32, T/2, F/2)
        ZeroPad2d(t 1+2, f 4+5)  -> Conv2d(32, 8, (4, 10)) -> BN -> ReLU   (B, 8, T/2, F/2)
        Flatten -> Linear(8 * T/2 * F/2, 128) -> ReLU -> Dropout -> Linear(128, n_classes)

    (``/2`` rounds down.) The TensorFlow tutorial's first kernel is 20 frames x 8 bins;
    this project's layout is 8 frames x 20 bins. Convolutions have no bias because the
    BatchNorm after each one makes it redundant.

    The flattening FC ties the model to exactly ``n_frames`` frames and holds almost all
    of its parameters (about 1.0 M for 98 x 40), which is why dynamic quantization of
    ``nn.Linear`` shrinks this model about fourfold.

    ``conv1_channels`` and ``conv2_channels`` (32 and 8 above) and ``hidden`` set the three
    widths; structured pruning records its result through them.
    """

    fixed_frames = True

    def __init__(
        self,
        n_classes: int = 12,
        n_frames: int = 98,
        n_mels: int = 40,
        hidden: int = 128,
        dropout: float = 0.5,
        conv1_channels: int = 32,
        conv2_channels: int = 8,
    ) -> None:
        super().__init__(n_classes, n_frames, n_mels)
        check_int("hidden", hidden)
        check_float("dropout", dropout, 0.0, 0.95)
        c1 = check_int("conv1_channels", conv1_channels)
        c2 = check_int("conv2_channels", conv2_channels)
        # The max-pool halves both axes; a single frame or bin would leave nothing to flatten.
        check_int("n_frames", n_frames, 2)
        check_int("n_mels", n_mels, 2)
        self.features = nn.Sequential(
            _same_pad((8, 20)),
            nn.Conv2d(1, c1, (8, 20), bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _same_pad((4, 10)),
            nn.Conv2d(c1, c2, (4, 10), bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
        )
        flat = c2 * (n_frames // 2) * (n_mels // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
