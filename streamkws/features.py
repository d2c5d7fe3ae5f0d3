"""The log-Mel front end: one implementation for training, tools and the streaming daemon.

Frames are taken without centre padding (frame ``i`` covers samples
``[i * hop, i * hop + win)``), so a stream can compute each frame as soon as its last
sample arrives and the streaming output equals the batch output exactly, whatever the
chunking. A model bundle stores a :class:`FrontEndConfig`; the daemon refuses a bundle
whose settings differ from the stream's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from streamkws.errors import ConfigError


@dataclass(frozen=True)
class FrontEndConfig:
    sample_rate: int = 16000
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_mels: int = 40
    f_min: float = 20.0
    f_max: float = 7600.0
    log_offset: float = 1e-6
    window_frames: int = 98
    """Frames in one model window: 98 frames of 10 ms hop and 25 ms window span 0.985 s."""
    mel_scale: str = "slaney"
    """``slaney`` (librosa's default) or ``htk``."""
    mel_norm: str = "slaney"
    """``slaney`` (area-normalised triangles, librosa's default) or ``none``."""

    def validate(self, prefix: str = "frontend") -> FrontEndConfig:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}", msg)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # A NaN fails every range check below, but the f_min/f_max ordering check
            # would then blame f_min for a NaN f_max.
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, f"must be a finite number (got {value})")
        if self.sample_rate != 16000:
            raise bad("sample_rate", f"must be 16000 (got {self.sample_rate})")
        if not 5 <= self.window_ms <= 100:
            raise bad("window_ms", f"must be within 5..100 ms (got {self.window_ms})")
        if not 1 <= self.hop_ms <= self.window_ms:
            raise bad("hop_ms", f"must be within 1 ms..window_ms (got {self.hop_ms})")
        for key in ("window_ms", "hop_ms"):
            samples = getattr(self, key) * self.sample_rate / 1000
            if abs(samples - round(samples)) > 1e-9:
                raise bad(key, f"must be a whole number of samples (got {samples:g})")
        if not 1 <= self.n_mels <= 256:
            raise bad("n_mels", f"must be within 1..256 (got {self.n_mels})")
        if not 0 <= self.f_min < self.f_max:
            raise bad("f_min", f"must be >= 0 and below f_max (got f_min = {self.f_min}, "
                               f"f_max = {self.f_max})")
        if self.f_max > self.sample_rate / 2:
            raise bad("f_max", f"must not exceed the Nyquist frequency (got {self.f_max})")
        if not self.log_offset > 0:
            raise bad("log_offset", f"must be positive (got {self.log_offset})")
        if not 1 <= self.window_frames <= 1000:
            raise bad("window_frames", f"must be within 1..1000 (got {self.window_frames})")
        if self.mel_scale not in ("slaney", "htk"):
            raise bad("mel_scale", f"must be 'slaney' or 'htk' (got {self.mel_scale!r})")
        if self.mel_norm not in ("slaney", "none"):
            raise bad("mel_norm", f"must be 'slaney' or 'none' (got {self.mel_norm!r})")
        return self

    @property
    def win_length(self) -> int:
        return round(self.window_ms * self.sample_rate / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.hop_ms * self.sample_rate / 1000)

    @property
    def n_fft(self) -> int:
        return 1 << (self.win_length - 1).bit_length()

    @property
    def window_samples(self) -> int:
        """Audio samples covered by one model window of ``window_frames`` frames."""
        return (self.window_frames - 1) * self.hop_length + self.win_length

    def n_frames(self, n_samples: int) -> int:
        if n_samples < self.win_length:
            return 0
        return 1 + (n_samples - self.win_length) // self.hop_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrontEndConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"frontend.{sorted(unknown)[0]}", "unknown key")
        return cls(**d).validate()


# -- mel filterbank (librosa-compatible) ---------------------------------------------------


def hz_to_mel(f: np.ndarray | float, scale: str = "slaney") -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, lin)


def mel_to_hz(m: np.ndarray | float, scale: str = "slaney") -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    f_min: float,
    f_max: float,
    scale: str = "slaney",
    norm: str = "slaney",
) -> np.ndarray:
    """Triangular mel filters, shape ``(n_mels, n_fft // 2 + 1)``, as ``librosa.filters.mel``."""
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    hz_pts = _mel_points_hz(n_mels, f_min, f_max, scale)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    return weights


def _mel_points_hz(n_mels: int, f_min: float, f_max: float, scale: str) -> np.ndarray:
    """The ``n_mels + 2`` edges of the triangular filters, evenly spaced in mels: filter
    ``i`` rises from point ``i``, peaks at ``i + 1`` and falls to ``i + 2``."""
    return mel_to_hz(np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale),
                                 n_mels + 2), scale)


def mel_centres_hz(c: FrontEndConfig) -> np.ndarray:
    """The centre frequency of each mel band of front end ``c``."""
    return _mel_points_hz(c.n_mels, c.f_min, c.f_max, c.mel_scale)[1:-1]


def warp_bands(centres_hz: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lo, hi, w)`` such that ``x[..., lo] * (1 - w) + x[..., hi] * w`` scales the
    frequency axis of log-Mel ``x`` by ``factor``: band ``i`` takes the value at
    ``centres_hz[i] / factor``, interpolated between the bands around it (the edges repeat)."""
    grid = np.arange(len(centres_hz), dtype=np.float64)
    pos = np.interp(centres_hz / factor, centres_hz, grid)
    lo = np.floor(pos).astype(int)
    return lo, np.minimum(lo + 1, len(grid) - 1), (pos - lo).astype(np.float32)


def warp_factors(r: float, n: int) -> list[float]:
    """``n`` frequency-scaling factors spaced evenly in log between ``1/(1+r)`` and ``1+r``."""
    return [float(f) for f in np.exp(np.linspace(-np.log1p(r), np.log1p(r), n))]


# -- the front end ---------------------------------------------------------------------------


class LogMel:
    """Log-Mel frames from audio; stateless, used for whole clips and batches."""

    def __init__(self, config: FrontEndConfig | None = None) -> None:
        self.config = (config or FrontEndConfig()).validate()
        c = self.config
        # Periodic Hann, the usual STFT window (scipy's get_window('hann', N)).
        n = np.arange(c.win_length)
        self.window = 0.5 - 0.5 * np.cos(2 * np.pi * n / c.win_length)
        self._fb_t = np.ascontiguousarray(
            mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max,
                           c.mel_scale, c.mel_norm).T
        )

    @cached_property
    def filterbank(self) -> np.ndarray:
        return self._fb_t.T

    def frames(self, frames: np.ndarray) -> np.ndarray:
        """Raw sample frames ``(..., win_length)`` -> log-Mel ``(..., n_mels)`` float32."""
        spec = np.fft.rfft(frames * self.window, n=self.config.n_fft)
        power = spec.real**2 + spec.imag**2
        # A 2-D product goes to BLAS; numpy's stacked (3-D) matmul is ~40x slower here.
        mel = power.reshape(-1, power.shape[-1]) @ self._fb_t
        out = np.log(mel + self.config.log_offset).astype(np.float32)
        return out.reshape(*power.shape[:-1], self.config.n_mels)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Audio ``(..., n_samples)`` -> log-Mel ``(..., n_frames, n_mels)``."""
        c = self.config
        audio = np.asarray(audio, dtype=np.float64)
        n = c.n_frames(audio.shape[-1])
        if n == 0:
            return np.zeros((*audio.shape[:-1], 0, c.n_mels), dtype=np.float32)
        audio = np.ascontiguousarray(audio)
        # A hand-made strided view: sliding_window_view's argument checks cost more than
        # the FFT for the few frames a streaming chunk completes, on every chunk.
        step = audio.strides[-1]
        framed = np.lib.stride_tricks.as_strided(
            audio, shape=(*audio.shape[:-1], n, c.win_length),
            strides=(*audio.strides[:-1], step * c.hop_length, step), writeable=False)
        return self.frames(framed)


class StreamingLogMel:
    """Log-Mel frames for a stream: each call computes only the frames its chunk completes.

    Keeps the last ``win_length - hop_length`` samples (the overlap) between calls, so the
    output for any chunking equals ``LogMel`` on the whole stream.
    """

    def __init__(self, config: FrontEndConfig | None = None, logmel: LogMel | None = None):
        self.logmel = logmel or LogMel(config)
        self.config = self.logmel.config
        self._pending = np.zeros(0, dtype=np.float64)
        self.frames_emitted = 0

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float64)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed a chunk; return the new frames ``(n_new, n_mels)`` it completes."""
        c = self.config
        buf = np.concatenate([self._pending, np.asarray(samples, dtype=np.float64)])
        n = c.n_frames(len(buf))
        if n == 0:
            self._pending = buf
            return np.zeros((0, c.n_mels), dtype=np.float32)
        out = self.logmel(buf[: (n - 1) * c.hop_length + c.win_length])
        self._pending = buf[n * c.hop_length :]
        self.frames_emitted += n
        return out


@dataclass(frozen=True, slots=True)
class Window:
    """One model input: ``window_frames`` log-Mel frames and the audio span they cover."""

    features: np.ndarray  # (window_frames, n_mels) float32
    start: int  # stream sample index of the first sample covered
    end: int  # one past the last sample covered

    def times(self, sample_rate: int = 16000) -> tuple[float, float]:
        return self.start / sample_rate, self.end / sample_rate


class Windower:
    """Forms overlapping model windows from a stream of frames, one every ``hop_frames``.

    Frames are kept in a ring of twice the window length so a window is one contiguous
    copy, never a concatenation.
    """

    def __init__(self, config: FrontEndConfig, hop_frames: int = 10) -> None:
        if hop_frames < 1:
            raise ConfigError("windows.hop_frames", f"must be >= 1 (got {hop_frames})")
        self.config = config
        self.hop_frames = hop_frames
        w = config.window_frames
        self._ring = np.zeros((2 * w, config.n_mels), dtype=np.float32)
        self._filled = 0  # frames currently held (<= w)
        self._pos = 0  # write index into the first half of the ring
        self.frame_index = 0  # stream index of the next frame to arrive
        self._next_end = w  # frame count at which the next window completes
        self.origin = 0  # stream sample index of frame 0 (moves on reset after a gap)
        self.last_end: int | None = None
        """Stream sample just past the last window formed (None before the first)."""

    def reset(self, origin_sample: int) -> None:
        """Start over at stream sample ``origin_sample`` (after a gap in the audio)."""
        self._filled = 0
        self._pos = 0
        self.frame_index = 0
        self._next_end = self.config.window_frames
        self.origin = origin_sample

    @property
    def next_start(self) -> int:
        """Stream sample where the next window to form starts."""
        return self.origin + (self._next_end - self.config.window_frames) * \
            self.config.hop_length

    def push(self, frames: np.ndarray) -> list[Window]:
        w = self.config.window_frames
        hop = self.config.hop_length
        out: list[Window] = []
        for row in frames:
            # Each frame is written twice, half a ring apart, so the last w frames are
            # always one contiguous slice.
            self._ring[self._pos] = row
            self._ring[self._pos + w] = row
            self._pos = (self._pos + 1) % w
            self.frame_index += 1
            self._filled = min(self._filled + 1, w)
            if self.frame_index == self._next_end:
                self._next_end += self.hop_frames
                first = self.frame_index - w
                start = self.origin + first * hop
                out.append(Window(self._ring[self._pos : self._pos + w].copy(), start,
                                  start + self.config.window_samples))
                self.last_end = start + self.config.window_samples
        return out


def iter_windows(
    audio: np.ndarray, config: FrontEndConfig, hop_frames: int = 10
) -> Iterator[Window]:
    """All windows of a whole recording, exactly as the streaming path would form them."""
    feats = LogMel(config)(audio)
    w = config.window_frames
    for end in range(w, len(feats) + 1, hop_frames):
        start = (end - w) * config.hop_length
        yield Window(feats[end - w : end], start, start + config.window_samples)
