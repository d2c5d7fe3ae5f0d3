"""The unit of audio that flows from a source to the ring buffer."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Chunk:
    """Mono float32 samples at 16 kHz and where they sit in the stream.

    ``start`` counts samples since the stream began, so audio time survives dropped
    audio: a consumer that sees ``start`` jump knows exactly how much went missing.
    """

    samples: np.ndarray
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.samples)
