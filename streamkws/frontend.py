"""The stage between the ring buffer and the model: features, windows and the VAD gate.

The daemon's processing thread, ``stream-eval`` and the benchmarks all drive this one class,
so what is measured offline is exactly what runs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamkws.audio.chunk import Chunk
from streamkws.features import FrontEndConfig, LogMel, StreamingLogMel, Window, Windower
from streamkws.vad import VadConfig, VadGate


@dataclass(frozen=True, slots=True)
class GatedWindow:
    window: Window
    open: bool
    """Whether the VAD gate says the model should look at this window."""


class FrontEnd:
    """Chunks in, gated model windows out.

    A jump in ``Chunk.start`` (audio lost before it reached us) restarts the feature and
    window state at the new position: a window never straddles missing audio.
    """

    def __init__(
        self,
        frontend: FrontEndConfig,
        vad: VadConfig,
        hop_frames: int = 10,
        logmel: LogMel | None = None,
    ) -> None:
        self.config = frontend
        self.features = StreamingLogMel(frontend, logmel)
        self.windower = Windower(frontend, hop_frames)
        self.gate = VadGate.from_config(vad)
        self._expected = 0
        self.gaps = 0
        self.windows = 0
        self.windows_open = 0

    def resume_at(self, position: int) -> None:
        """Continue a stream at ``position`` (a replacement front end after a reload)."""
        self._expected = position
        self.windower.reset(position)

    @property
    def position(self) -> int:
        """Stream position just past the last sample processed."""
        return self._expected

    def process(self, chunk: Chunk) -> list[GatedWindow]:
        if chunk.start != self._expected:
            self.gaps += 1
            self.features.reset()
            self.windower.reset(chunk.start)
        self._expected = chunk.end
        self.gate.push(chunk)
        out = []
        for w in self.windower.push(self.features.process(chunk.samples)):
            is_open = self.gate.is_open(w.start, w.end)
            self.windows += 1
            self.windows_open += is_open
            out.append(GatedWindow(w, is_open))
        return out
