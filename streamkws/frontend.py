"""The stage between the ring buffer and the model: features, windows and the VAD gate.

The daemon's processing thread, ``stream-eval`` and the benchmarks all drive this one class,
so what is measured offline is exactly what runs on the device.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from streamkws.audio.chunk import Chunk
from streamkws.features import FrontEndConfig, LogMel, StreamingLogMel, Window, Windower
from streamkws.vad import VadConfig, VadGate

log = logging.getLogger(__name__)

SAMPLE_LIMIT = 1e6
"""Samples beyond +-SAMPLE_LIMIT (full scale is 1) are clipped there: nonsense anyway, and
float32 sums in the VAD would overflow into NaN on values near the float32 maximum."""


@dataclass(frozen=True, slots=True)
class GatedWindow:
    window: Window
    open: bool
    """Whether the VAD gate says the model should look at this window."""


class FrontEnd:
    """Chunks in, gated model windows out.

    Windows come out once the VAD has decided all of their frames (at most one VAD frame
    after their features complete); ``flush`` releases the rest at the end of a stream. A
    jump in ``Chunk.start`` (audio lost before it reached us) restarts the feature and
    window state at the new position: a window never straddles missing audio. NaN or
    infinite samples (a misbehaving device or decoder) are replaced by silence, absurdly
    large ones clipped to ``SAMPLE_LIMIT``, and both counted in ``invalid_samples``: one NaN
    would otherwise turn every frame and posterior it touches into NaN.
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
        self.invalid_samples = 0
        # A window is judged once the VAD has decided every frame centred in it. The frame
        # straddling its end may need audio from the next chunk; judging early would make
        # the gate's answer depend on where chunks happen to end.
        self._held: deque[Window] = deque()
        # Windows ending here or before were the replaced front end's to judge (a reload).
        self._predecessor_formed_until = -1

    def resume_at(self, position: int, formed_until: int | None = None) -> None:
        """Continue a stream at ``position`` (a replacement front end after a reload),
        leaving out the windows that end at or before ``formed_until``: the front end it
        replaces formed those already."""
        self._expected = position
        self.windower.reset(position)
        self._predecessor_formed_until = -1 if formed_until is None else formed_until

    @property
    def next_window_start(self) -> int:
        """Stream sample where the next window to form starts."""
        return self.windower.next_start

    @property
    def formed_until(self) -> int | None:
        """Stream sample just past the last window formed."""
        return self.windower.last_end

    @property
    def position(self) -> int:
        """Stream position just past the last sample processed."""
        return self._expected

    def process(self, chunk: Chunk) -> list[GatedWindow]:
        # One cheap pass; NaN propagates through max, so it fails the test too.
        if not np.abs(chunk.samples).max(initial=0.0) <= SAMPLE_LIMIT:
            chunk = self._sanitize(chunk)
        out = []
        if chunk.start != self._expected:
            # The audio the held windows were waiting for is lost: judge them as they are.
            out += self.flush()
            self.gaps += 1
            self.features.reset()
            self.windower.reset(chunk.start)
        self._expected = chunk.end
        self.gate.push(chunk)
        self._held.extend(w for w in self.windower.push(self.features.process(chunk.samples))
                          if w.end > self._predecessor_formed_until)
        limit = self.gate.decided_until
        while self._held and self._held[0].end <= limit:
            out.append(self._judge(self._held.popleft()))
        return out

    def flush(self) -> list[GatedWindow]:
        """Judge the windows still waiting for VAD decisions (the stream ended or broke)."""
        out = [self._judge(w) for w in self._held]
        self._held.clear()
        return out

    def _judge(self, w: Window) -> GatedWindow:
        is_open = self.gate.is_open(w.start, w.end)
        self.windows += 1
        self.windows_open += is_open
        return GatedWindow(w, is_open)

    def _sanitize(self, chunk: Chunk) -> Chunk:
        x = chunk.samples
        finite = np.isfinite(x)
        n_bad = int(np.count_nonzero(~finite | (np.abs(np.where(finite, x, 0)) > SAMPLE_LIMIT)))
        if self.invalid_samples == 0:
            log.warning("invalid audio samples (NaN, infinite or beyond +-%g) at %.2f s: NaN "
                        "and infinities replaced by silence, the rest clipped (warned once)",
                        SAMPLE_LIMIT, chunk.start / self.config.sample_rate)
        self.invalid_samples += n_bad
        # A new array: the source or the ring may still hold the original.
        clean = np.clip(np.where(finite, x, 0.0), -SAMPLE_LIMIT, SAMPLE_LIMIT)
        return Chunk(clean.astype(np.float32), chunk.start)
