"""Keyword spotting inside your own program, without the daemon.

::

    from streamkws.spotter import Spotter

    spotter = Spotter()                    # the bundled default model and settings
    for block in blocks:                   # mono audio: int16, or float in [-1, 1]
        for hit in spotter.feed(block):
            print(hit.keyword, hit.score, hit.t_start, hit.t_end)

It is the daemon's own pipeline (front end, VAD gate, model, smoother) with no threads,
sockets or devices, so the same audio gives the same detections as ``streamkws run``
publishes (a test replays a recording both ways). ``feed`` runs the model in the calling
thread, only for windows the VAD lets through, so silence costs little; blocks of any
length work, and the answer does not depend on how the audio is cut into them. Times are
seconds of audio since the first sample fed (or since :meth:`Spotter.reset`);
:attr:`Spotter.stats` counts what it did, as the daemon's status does.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.audio.chunk import Chunk
from streamkws.config import Config, load

log = logging.getLogger(__name__)

MAX_CHANNELS = 32
"""More columns than this is taken for audio laid out (channels, frames), as torchaudio and
librosa lay it out, and refused rather than averaged into noise."""


def _as_argument(exc: Exception) -> Exception:
    """A bad threshold given as an argument, named as the argument, not as a config key."""
    from streamkws.errors import StreamKWSError

    key, reason = getattr(exc, "key", ""), getattr(exc, "reason", str(exc))
    if key == "detect.threshold":
        return StreamKWSError(f"threshold: {reason}")
    if key.startswith("detect.thresholds."):
        return StreamKWSError(f"thresholds[{key.removeprefix('detect.thresholds.')!r}]: {reason}")
    return exc


@dataclass(frozen=True)
class Hit:
    """One detection: the fields of the daemon's ``detection`` message that describe it."""

    keyword: str
    score: float
    """The highest smoothed posterior of the utterance when it was decided (at least the
    threshold), as the daemon publishes it."""
    t_start: float
    """Seconds of audio where the spoken word starts (the voiced part the VAD heard)."""
    t_end: float
    """Where it ends."""
    t_emit: float
    """Where the decision was made: the end of the window that decided it."""


@dataclass(frozen=True)
class Window:
    """One window the model was asked about, or would have been."""

    t_start: float
    t_end: float
    scores: dict[str, float] | None
    """The model's posteriors for this window, before smoothing; None when the VAD kept
    the window shut (no speech in it), so the model did not run."""


@dataclass(frozen=True)
class Stats:
    """What a :class:`Spotter` has done since it started or was reset: the counters of the
    daemon's ``status`` message that apply in-process."""

    audio_seconds: float
    """Audio fed, at 16 kHz (after resampling)."""
    windows: int
    """Windows formed (one per ``windows.hop_ms`` of audio; after :meth:`Spotter.flush`
    also those over the silence it pads the end with). Not in the daemon's status."""
    inferences: int
    """Windows the model ran on; the rest the VAD kept shut."""
    vad_active_ratio: float
    """The share of windows the VAD let through, each a model run (the daemon's status
    has the same ratio, though a daemon behind a live source may skip some of them)."""
    inference_ms_p50: float | None
    """Median time per model run (ms, the last 4096 runs); None before the first."""
    inference_ms_p99: float | None


class Spotter:
    """Feed audio, get :class:`Hit` s.

    ``model``: a bundle path or a bundled name (``default``, ``default-float``,
    ``accurate``); default, the config's ``model.name``. ``config``: a daemon config (a
    TOML path or a :class:`~streamkws.config.Config`) whose ``[frontend]``, ``[vad]``,
    ``[windows]``, ``[detect]`` and ``model.name`` apply (the rest is the daemon's own);
    default, the built-in one. ``sample_rate``: the rate of the audio fed; other than
    16 kHz it is resampled as the daemon resamples a microphone. ``threshold`` and
    ``thresholds`` (per keyword, e.g. ``{"yes": 0.8}``) replace the config's
    ``detect.threshold`` and ``detect.thresholds``. torch's thread count is left as the
    program has it (the daemon sets ``model.threads``), and no window is skipped: the
    caller sets the pace.

    Calls are serialised by a lock, so another thread may :meth:`reset` or :meth:`flush`
    while one feeds (a feed after a flush still raises until the reset). ``windows``
    belongs to whichever call came last. ``feed`` runs the model: give it blocks from a
    thread of your own, not from an audio callback, which must never wait.
    """

    def __init__(self, model: str | None = None, config: str | Path | Config | None = None,
                 sample_rate: int = SAMPLE_RATE, threshold: float | None = None,
                 thresholds: dict[str, float] | None = None) -> None:
        from streamkws.daemon import Overrides, load_model
        from streamkws.errors import ConfigError, StreamKWSError

        try:
            rate = operator.index(sample_rate)  # numpy integers too; 16000.0 is no count
        except TypeError:
            rate = None
        if isinstance(sample_rate, bool) or rate is None or not 1000 <= rate <= 384_000:
            raise StreamKWSError(f"sample_rate must be a whole number of Hz within "
                                 f"1000..384000 (got {sample_rate!r})")
        cfg = config if isinstance(config, Config) else \
            load(config) if config is not None else Config()
        cfg = cfg.validate()
        if model is not None:
            cfg = cfg.replace(model=dataclasses.replace(cfg.model, name=str(model)))
        if threshold is not None or thresholds is not None:
            detect = dataclasses.replace(
                cfg.detect,
                threshold=cfg.detect.threshold if threshold is None else float(threshold),
                thresholds=cfg.detect.thresholds if thresholds is None else
                {str(k): float(v) for k, v in thresholds.items()})
            try:
                cfg = cfg.replace(detect=detect)
            except ConfigError as exc:
                raise _as_argument(exc) from None
        self.config = cfg
        # As the daemon loads it: warned of thresholds calibrated for another model.
        self.bundle = load_model(cfg, Overrides(model=model))
        self.sample_rate = rate
        # soxr's resampler runs without the GIL: two threads in it at once crash the process.
        self._lock = threading.Lock()
        try:
            self.reset()  # the model's labels check the per-keyword thresholds
        except ConfigError as exc:
            raise (_as_argument(exc) if thresholds is not None else exc) from None

    @property
    def keywords(self) -> list[str]:
        """The labels that can be reported (the model's, less ``detect.ignore``)."""
        return [lb for lb in self.bundle.labels if lb not in self.config.detect.ignore]

    @property
    def threshold(self) -> float:
        """The threshold in force for keywords without their own (``detect.thresholds``)."""
        return float(self._pipeline.cfg.detect.threshold)

    @property
    def stats(self) -> Stats:
        """Counters of this stream (since start or :meth:`reset`), e.g. to see what the
        VAD saves: ``spotter.stats.vad_active_ratio``."""
        with self._lock:
            return Stats(**self._pipeline.stats())

    def reset(self) -> None:
        """Start a new stream: times from 0 again, nothing of the old audio remembered."""
        from streamkws.audio.wav import StreamResampler
        from streamkws.daemon import Pipeline

        pipeline = Pipeline(self.config, self.bundle)
        pipeline.trace = []
        resampler = (StreamResampler(self.sample_rate)
                     if self.sample_rate != SAMPLE_RATE else None)
        with self._lock:
            self._pipeline = pipeline
            self.windows: list[Window] = []
            """The windows the last :meth:`feed` or :meth:`flush` decided, in order: for a
            program with its own decision logic (openWakeWord's users score frames)."""
            self._resampler = resampler
            self._position = 0
            self._warned_nan = self._warned_scale = False
            self._ended = False

    def feed(self, audio: np.ndarray) -> list[Hit]:
        """Take the next block of the stream and return the detections it completes.

        ``audio``: int16 samples, or float32/float64 in [-1, 1]; one channel, or an array
        of shape (frames, channels), whose channels are averaged.
        """
        from streamkws.errors import StreamKWSError

        with self._lock:
            if self._ended:
                raise StreamKWSError("the stream ended with flush(); reset() starts another")
            x = self._as_float(audio)
            if self._resampler is not None:
                x = np.clip(self._resampler.process(x), -1.0, 1.0)
            hits = self._push(x)
            self._take_windows()
            return hits

    def flush(self) -> list[Hit]:
        """The end of the stream: its last second is decided as if silence followed, as
        the daemon does at the end of a file, so a word right at the end (or a lone 1-s
        clip) is still heard. Calling it again returns nothing; :meth:`reset` starts a new
        stream."""
        with self._lock:
            if self._ended:
                self.windows = []
                return []
            self._ended = True
            hits = []
            if self._resampler is not None:
                tail = self._resampler.process(np.zeros(0, np.float32), last=True)
                hits += self._push(np.clip(tail, -1.0, 1.0))
            hits += [self._hit(d) for d in self._pipeline.finish()]
            self._take_windows()
            return hits

    def _take_windows(self) -> None:
        trace, labels = self._pipeline.trace, self.bundle.labels
        assert trace is not None
        self.windows = [Window(start / SAMPLE_RATE, end / SAMPLE_RATE,
                               None if probs is None else
                               {lb: float(p) for lb, p in zip(labels, probs, strict=True)})
                        for start, end, probs in trace]
        trace.clear()  # kept per call, so a stream of days holds no more than a block's

    def _push(self, x: np.ndarray) -> list[Hit]:
        chunk = Chunk(x, self._position)
        self._position += len(x)
        return [self._hit(d) for d in self._pipeline.process(chunk)]

    @staticmethod
    def _hit(d) -> Hit:
        return Hit(d.keyword, float(d.score), d.start / SAMPLE_RATE, d.end / SAMPLE_RATE,
                   d.emit / SAMPLE_RATE)

    def _as_float(self, audio: np.ndarray) -> np.ndarray:
        from streamkws.errors import StreamKWSError

        a = np.asarray(audio)
        if a.ndim not in (1, 2) or (a.ndim == 2 and not 1 <= a.shape[1] <= MAX_CHANNELS):
            raise StreamKWSError(f"audio must be one channel, or (frames, channels) with at "
                                 f"most {MAX_CHANNELS} channels; got shape {a.shape} (for "
                                 "(channels, frames), pass its transpose)")
        if a.dtype == np.int16:
            x = a.astype(np.float32) / 32768.0
        elif a.dtype.kind == "f":
            x = a.astype(np.float32)
        else:
            raise StreamKWSError(f"audio must be int16, or float in [-1, 1]; got {a.dtype} "
                                 "(scale other integers to float yourself: their full "
                                 "scale is theirs to know)")
        if x.ndim == 2:
            x = x.mean(axis=1, dtype=np.float32)
        bad = ~np.isfinite(x)
        peak = float(np.abs(np.where(bad, 0.0, x)).max(initial=0.0))
        if peak > 2 and not self._warned_scale:
            # Floats holding int16 values: clipped to +-1 they are noise, and nothing fires.
            log.warning("float samples up to %.0f: floats must be within [-1, 1] (int16 "
                        "values as floats: divide by 32768, or pass the int16 array)", peak)
            self._warned_scale = True
        if bad.any():
            # As the daemon does with such a file: silence, said once.
            if not self._warned_nan:
                log.warning("NaN or infinite samples replaced by silence")
                self._warned_nan = True
            x = np.where(bad, 0.0, x).astype(np.float32)
        return np.clip(x, -1.0, 1.0)
