"""Voice-activity detection: a cheap gate in front of the keyword model.

Two detectors share one interface (:class:`EnergyVAD`, :class:`WebRtcVAD`): ``process``
takes float32 16 kHz audio in chunks of any length, keeps the unfinished frame for the next
call and returns one decision per completed frame, hangover already applied. Decisions
depend only on the audio, never on how it was chunked.

:class:`VadGate` ties a detector to stream positions: it records each frame's decision with
the stream sample where the frame starts (a few seconds of history, no more) and answers
whether a model window ``[start, end)`` holds at least ``min_speech_ms`` of speech. The
pipeline runs the model only on windows the gate opens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.audio.chunk import Chunk
from streamkws.errors import ConfigError

KINDS = ("webrtc", "energy", "off")
FRAME_MS = (10, 20, 30)

_EPS = 1e-12  # energy of digital silence: -120 dBFS
SPEECH_BAND_HZ = (100.0, 4000.0)
_NEVER = -(1 << 62)  # start of an empty slot in the gate's ring


@dataclass(frozen=True)
class VadConfig:
    """Settings of the ``vad`` config section.

    The defaults were tuned with ``python -m streamkws.tools.vad_report`` on the real
    Speech Commands clips and background-noise recordings; that tool prints what they give.
    """

    kind: str = "webrtc"
    """``webrtc`` (WebRTC's GMM detector plus the level and speech-band checks),
    ``energy`` (level and speech-band checks only) or ``off`` (the gate is always open)."""
    aggressiveness: int = 3
    """WebRTC mode 0-3; higher rejects more non-speech (and a little more speech)."""
    frame_ms: int = 30
    """Length of one decision: 10, 20 or 30 ms (the frame lengths WebRTC accepts)."""
    hangover_ms: int = 90
    """Speech is held this long after the last speech frame (bridges stops and weak ends)."""
    min_speech_ms: int = 150
    """Speech (hangover included) a window must contain for the gate to open it. With the
    default hangover one lone speech frame (30 + 90 ms) is not enough: a click cannot open
    the gate, two speech frames can."""
    energy_margin_db: float = 7.0
    """Speech must be this far above the adaptive noise floor."""
    energy_floor_dbfs: float = -55.0
    """Absolute minimum frame level of speech. The noise floor starts at, and never drops
    below, ``energy_floor_dbfs - energy_margin_db``, so a stream that opens with speech
    still fires and digital silence does not drag the floor down to nothing."""
    energy_rise_db_per_s: float = 6.0
    """How fast the noise floor climbs towards louder frames (slowly: words are short)."""
    energy_fall_db_per_s: float = 60.0
    """How fast the noise floor drops towards quieter frames (fast: the noise stopped)."""
    speech_band_ratio: float = 0.8
    """Speech frames must have at least this share of their energy in 100-4000 Hz, where
    voiced speech puts almost all of it; broadband noise (white, pink, hiss, a running tap)
    puts half or less there. 0 turns the check off."""
    webrtc_energy_check: bool = True
    """With ``kind = webrtc``, also require the level and speech-band checks (see
    :class:`WebRtcVAD` for why)."""
    history_ms: int = 3000
    """Decisions the gate keeps; must cover the longest window the pipeline asks about."""

    def validate(self) -> VadConfig:
        """Raise :class:`ConfigError` naming ``vad.<field>`` for the first bad value."""
        for f in fields(self):
            value = getattr(self, f.name)
            key = f"vad.{f.name}"
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(key, f"expected an integer, got {value!r}")
            elif f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(key, f"expected a number, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(key, f"expected a finite number, got {value!r}")
            elif f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ConfigError(key, f"expected true or false, got {value!r}")
            elif f.type in ("str", str) and not isinstance(value, str):
                raise ConfigError(key, f"expected a string, got {value!r}")

        if self.kind not in KINDS:
            raise ConfigError("vad.kind", f"unknown VAD {self.kind!r}; use one of {KINDS}")
        if not 0 <= self.aggressiveness <= 3:
            raise ConfigError("vad.aggressiveness", f"must be 0-3, got {self.aggressiveness}")
        if self.frame_ms not in FRAME_MS:
            raise ConfigError("vad.frame_ms", f"must be 10, 20 or 30, got {self.frame_ms}")
        if not 0 <= self.hangover_ms <= 2000:
            raise ConfigError("vad.hangover_ms", f"must be 0-2000, got {self.hangover_ms}")
        if not 0 <= self.min_speech_ms <= 1000:
            raise ConfigError(
                "vad.min_speech_ms", f"must be 0-1000 (a window is 1 s), got {self.min_speech_ms}"
            )
        if not 0 < self.energy_margin_db <= 60:
            raise ConfigError(
                "vad.energy_margin_db", f"must be in (0, 60] dB, got {self.energy_margin_db}"
            )
        if not -120 <= self.energy_floor_dbfs <= 0:
            raise ConfigError(
                "vad.energy_floor_dbfs", f"must be -120 to 0 dBFS, got {self.energy_floor_dbfs}"
            )
        for name in ("energy_rise_db_per_s", "energy_fall_db_per_s"):
            value = getattr(self, name)
            if not 0 < value <= 1000:
                raise ConfigError(f"vad.{name}", f"must be in (0, 1000] dB/s, got {value}")
        if not 0 <= self.speech_band_ratio < 1:
            raise ConfigError(
                "vad.speech_band_ratio", f"must be in [0, 1), got {self.speech_band_ratio}"
            )
        if not 1000 <= self.history_ms <= 60000:
            raise ConfigError("vad.history_ms", f"must be 1000-60000, got {self.history_ms}")
        return self


# -- detectors ---------------------------------------------------------------------------


class _FramedVAD:
    """Frames a sample stream and applies hangover; subclasses decide whole frames.

    Frames are cut at fixed multiples of ``frame_samples`` from the first sample seen, and
    every per-frame measure depends on that frame's samples alone (plus state carried from
    frame to frame), so decisions do not depend on how the stream was chunked.
    """

    def __init__(self, frame_ms: int, hangover_ms: int) -> None:
        if frame_ms not in FRAME_MS:
            raise ValueError(f"frame_ms must be one of {FRAME_MS}")
        self.frame_ms = frame_ms
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000
        self.hangover_frames = math.ceil(hangover_ms / frame_ms)
        self._pending = np.zeros(0, np.float32)
        self._hold = 0
        self.last_raw = np.zeros(0, bool)
        """The decisions of the last ``process`` call before hangover (speech heard)."""

    def reset(self) -> None:
        """Forget all state, as if the stream started anew."""
        self._pending = np.zeros(0, np.float32)
        self._hold = 0
        self.last_raw = np.zeros(0, bool)

    def discard_pending(self) -> None:
        """Drop the unfinished frame (the stream jumped); adaptive state is kept."""
        self._pending = np.zeros(0, np.float32)

    @property
    def pending_samples(self) -> int:
        """Samples buffered towards the next frame (always fewer than ``frame_samples``)."""
        return len(self._pending)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed audio; return a bool per frame completed by it (hangover applied)."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        fs = self.frame_samples
        if len(self._pending) + len(x) < fs:
            self._pending = np.concatenate((self._pending, x))
            self.last_raw = np.zeros(0, bool)
            return np.zeros(0, bool)
        buf = np.concatenate((self._pending, x)) if len(self._pending) else x
        n = len(buf) // fs
        self._pending = buf[n * fs :].copy()
        frames = buf[: n * fs].reshape(n, fs)
        # Remove each frame's DC offset: some microphones (and some Speech Commands
        # clips, up to 0.06 = -24 dBFS) carry one, and it would swamp both the level
        # and the speech-band measure.
        frames = frames - frames.mean(axis=1, keepdims=True)
        raw = self.last_raw = self._decide(frames)
        out = np.empty(n, bool)
        hold = self._hold
        for i, speech in enumerate(raw.tolist()):
            if speech:
                hold = self.hangover_frames + 1
            out[i] = hold > 0
            hold = max(hold - 1, 0)
        self._hold = hold
        return out

    def _decide(self, frames: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _LevelCheck:
    """The energy conditions shared by both detectors.

    * level: frame energy above an adaptive noise floor plus a margin, and above an
      absolute minimum. The floor drops fast towards quieter frames and climbs slowly
      towards louder ones, so it settles on steady noise within seconds while a word
      (well under a second) barely moves it. It never goes below ``floor_dbfs -
      margin_db``, where the absolute minimum decides anyway; starting there means speech
      at the very start of a stream is not absorbed.
    * speech band: at least ``band_ratio`` of the frame's energy in 100-4000 Hz.
    """

    def __init__(self, cfg: VadConfig) -> None:
        self.margin_db = float(cfg.energy_margin_db)
        self.floor_dbfs = float(cfg.energy_floor_dbfs)
        self.lowest = self.floor_dbfs - self.margin_db
        self.rise = cfg.energy_rise_db_per_s * cfg.frame_ms / 1000.0
        self.fall = cfg.energy_fall_db_per_s * cfg.frame_ms / 1000.0
        self.band_ratio = float(cfg.speech_band_ratio)
        n = SAMPLE_RATE * cfg.frame_ms // 1000
        self._nfft = 1 << (n - 1).bit_length()
        self._window = np.hanning(n).astype(np.float32)
        freqs = np.fft.rfftfreq(self._nfft, 1.0 / SAMPLE_RATE)
        self._band = (freqs >= SPEECH_BAND_HZ[0]) & (freqs < SPEECH_BAND_HZ[1])
        self.level = self.lowest
        """Current noise floor estimate, dBFS."""

    def reset(self) -> None:
        self.level = self.lowest

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Both conditions for each (DC-free) frame, judged against the floor before it."""
        energy = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frames.shape[1]
        e_db = (10.0 * np.log10(energy + _EPS)).tolist()
        out = np.empty(len(e_db), bool)
        level, lowest, rise, fall = self.level, self.lowest, self.rise, self.fall
        margin, absmin = self.margin_db, self.floor_dbfs
        for i, e in enumerate(e_db):
            out[i] = e > level + margin and e > absmin
            level = min(e, level + rise) if e > level else max(e, level - fall, lowest)
        self.level = level
        if self.band_ratio > 0 and out.any():
            spec = np.fft.rfft(frames * self._window, self._nfft, axis=1)
            power = spec.real**2 + spec.imag**2
            in_band = power[:, self._band].sum(axis=1)
            out &= in_band > self.band_ratio * (power.sum(axis=1) + 1e-20)
        return out


class EnergyVAD(_FramedVAD):
    """Speech = frame level above the adaptive noise floor plus a margin and above an
    absolute minimum, with most of its energy in the speech band; then hangover."""

    def __init__(self, cfg: VadConfig | None = None) -> None:
        cfg = (cfg or VadConfig(kind="energy")).validate()
        super().__init__(cfg.frame_ms, cfg.hangover_ms)
        self.check = _LevelCheck(cfg)

    def reset(self) -> None:
        super().reset()
        self.check.reset()

    def _decide(self, frames: np.ndarray) -> np.ndarray:
        return self.check(frames)


class WebRtcVAD(_FramedVAD):
    """WebRTC's GMM voice detector on int16 frames, AND-ed (by default) with the level and
    speech-band checks of :class:`EnergyVAD`.

    Why the extra checks: WebRTC models subband levels in absolute terms and its noise
    model cannot follow loud noise. Steady white or pink noise at -20 dBFS is "speech" in
    every frame, in every mode, for as long as it lasts (measured over 60 s of the
    ``noise/`` recordings), and mode 3 alone still opens 86 % of the windows of the
    Speech Commands ``_silence_`` clips. The adaptive level check removes steady noise
    once the floor has settled; the speech-band check removes broadband noise at once,
    including right after it starts, where no level tracker can help. Together they bring
    ``_silence_`` under the 25 % target while keeping more than 99 % of the keywords
    (see ``python -m streamkws.tools.vad_report --ablation``).
    """

    def __init__(self, cfg: VadConfig | None = None) -> None:
        import webrtcvad

        cfg = (cfg or VadConfig(kind="webrtc")).validate()
        super().__init__(cfg.frame_ms, cfg.hangover_ms)
        self.aggressiveness = cfg.aggressiveness
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self.check = _LevelCheck(cfg) if cfg.webrtc_energy_check else None

    def reset(self) -> None:
        import webrtcvad

        super().reset()
        self._vad = webrtcvad.Vad(self.aggressiveness)
        if self.check is not None:
            self.check.reset()

    def _decide(self, frames: np.ndarray) -> np.ndarray:
        pcm = np.clip(np.rint(frames * 32768.0), -32768, 32767).astype("<i2")
        is_speech = self._vad.is_speech
        # WebRTC sees every frame, even where the other checks already failed: its noise
        # model adapts frame by frame and must follow the whole stream.
        out = np.fromiter((is_speech(f.tobytes(), SAMPLE_RATE) for f in pcm), bool, len(pcm))
        if self.check is not None:
            out &= self.check(frames)
        return out


def make_vad(cfg: VadConfig) -> EnergyVAD | WebRtcVAD | None:
    """The detector for ``cfg.kind``; None for ``off``."""
    cfg.validate()
    if cfg.kind == "webrtc":
        return WebRtcVAD(cfg)
    if cfg.kind == "energy":
        return EnergyVAD(cfg)
    return None


# -- gate ---------------------------------------------------------------------------------


class VadGate:
    """Per-frame VAD decisions at their stream positions, asked about model windows.

    Memory is a fixed ring of ``history_ms`` of decisions, however long the stream runs.
    A frame counts for a window when its centre lies in the window. A jump in
    ``Chunk.start`` (lost audio) drops the unfinished frame and restarts framing at the new
    position; audio that overlaps what was already pushed is skipped. With ``kind = off``
    there is no detector and every window is open.
    """

    def __init__(
        self, vad: EnergyVAD | WebRtcVAD | None, min_speech_ms: int = 150,
        history_ms: int = 3000,
    ) -> None:  # fmt: skip
        self.vad = vad
        self.min_speech_ms = min_speech_ms
        self.frames_seen = 0
        """Frames decided since the start (or ``reset``)."""
        self.speech_frames = 0
        """Of those, frames that were speech (hangover included)."""
        frame_ms = vad.frame_ms if vad is not None else 30
        self._frame = SAMPLE_RATE * frame_ms // 1000
        self._frame_ms = frame_ms
        # At least one frame, even for min_speech_ms = 0: an empty window never opens.
        self._need = max(1, math.ceil(min_speech_ms / frame_ms))
        self._cap = math.ceil(history_ms / frame_ms) if vad is not None else 1
        self._starts = np.full(self._cap, _NEVER, np.int64)
        self._flags = np.zeros(self._cap, bool)  # speech, hangover included
        self._heard = np.zeros(self._cap, bool)  # speech before hangover
        self._n = 0  # frames ever stored
        self._next: int | None = None  # stream position of the next sample expected
        self._frame_pos = 0  # stream position where the pending frame starts

    @classmethod
    def from_config(cls, cfg: VadConfig) -> VadGate:
        cfg.validate()
        return cls(make_vad(cfg), cfg.min_speech_ms, cfg.history_ms)

    @property
    def always_open(self) -> bool:
        return self.vad is None

    @property
    def history_frames(self) -> int:
        """Capacity of the decision ring (fixed at construction)."""
        return self._cap

    def reset(self) -> None:
        """Forget the stream: detector state, decisions and counters."""
        if self.vad is not None:
            self.vad.reset()
        self.frames_seen = self.speech_frames = self._n = 0
        self._starts.fill(_NEVER)
        self._flags.fill(False)
        self._heard.fill(False)
        self._next = None

    def push(self, chunk: Chunk) -> None:
        """Feed the next audio of the stream."""
        samples, start = chunk.samples, chunk.start
        if self._next is None:
            self._next = self._frame_pos = start
        elif start != self._next:
            if start < self._next:  # overlap: keep only the new part
                samples = samples[self._next - start :]
                start = self._next
            else:  # gap: the unfinished frame is lost
                if self.vad is not None:
                    self.vad.discard_pending()
                self._frame_pos = start
        if len(samples) == 0:
            return
        self._next = start + len(samples)
        if self.vad is None:
            return
        decisions = self.vad.process(samples)
        n = len(decisions)
        if n == 0:
            return
        heard = self.vad.last_raw
        starts = self._frame_pos + self._frame * np.arange(n, dtype=np.int64)
        self._frame_pos += n * self._frame
        self.frames_seen += n
        self.speech_frames += int(np.count_nonzero(decisions))
        if n > self._cap:
            keep = slice(n - self._cap, n)
            starts, decisions, heard = starts[keep], decisions[keep], heard[keep]
            self._n += n - self._cap
            n = self._cap
        idx = (self._n + np.arange(n)) % self._cap
        self._starts[idx] = starts
        self._flags[idx] = decisions
        self._heard[idx] = heard
        self._n += n

    @property
    def decided_until(self) -> float:
        """Every frame whose centre lies before this stream position has been decided.

        A window ending at or before it can be judged; one ending later may still gain a
        speech frame from audio not yet pushed (the frame straddling its end)."""
        if self.vad is None:
            return math.inf
        if self._next is None:
            return -math.inf
        return self._frame_pos + self._frame // 2

    def _inside(self, start: int, end: int) -> np.ndarray:
        centres = self._starts + self._frame // 2
        return (centres >= start) & (centres < end)

    def speech_ms(self, start: int, end: int) -> int:
        """Milliseconds of speech (hangover included) recorded in ``[start, end)``."""
        if self.vad is None:
            return 0
        n = np.count_nonzero(self._inside(start, end) & self._flags)
        return int(n) * self._frame_ms

    def is_open(self, start: int, end: int) -> bool:
        """Does the window of stream samples ``[start, end)`` hold enough speech?"""
        if self.vad is None:
            return True
        return int(np.count_nonzero(self._inside(start, end) & self._flags)) >= self._need

    def speech_span(self, start: int, end: int) -> tuple[int, int] | None:
        """Where in ``[start, end)`` the detector heard speech (hangover left out): from the
        first speech frame's start to the last one's end, clipped to the range. None when
        it heard none there, the range is older than the history, or there is no detector.
        """
        if self.vad is None:
            return None
        hit = self._inside(start, end) & self._heard
        if not hit.any():
            return None
        starts = self._starts[hit]
        return max(start, int(starts.min())), min(end, int(starts.max()) + self._frame)
