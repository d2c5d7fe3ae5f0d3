"""``streamkws run``: the always-on daemon.

Two threads: the source's capture context writes the ring buffer and nothing else; the
processing thread (this module's loop, on the main thread so it also receives signals)
drains the ring through :class:`Pipeline` and publishes. When inference falls behind a
live source, whole windows are skipped and counted; the ring keeps every sample, so audio
time and the front end's state stay exact.

A microphone that fails, vanishes or stalls does not end the daemon: the loop's
:class:`SourceSupervisor` reopens it with backoff while status reports the outage. stdin
that stalls is reported (:class:`StallWatch`) and waited for. Files and stdin still end
the run on an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from streamkws import SAMPLE_RATE
from streamkws.audio.base import AudioSource
from streamkws.audio.chunk import Chunk
from streamkws.audio.mic import MicSource, load_portaudio, refresh_devices, resolve_device
from streamkws.audio.ring import RingBuffer
from streamkws.audio.sources import open_source
from streamkws.audio.stall import STALLED, StallWatch
from streamkws.audio.supervisor import RETRYING, SourceSupervisor
from streamkws.bundle import Bundle, load_bundle
from streamkws.config import AudioConfig, Config, ModelConfig, load_default
from streamkws.detect import Detection, Smoother
from streamkws.errors import AudioError, ConfigError, StreamKWSError, os_error_message
from streamkws.frontend import FrontEnd, GatedWindow
from streamkws.signals import SignalRelay, StopFlag
from streamkws.stdio import LineEcho

log = logging.getLogger(__name__)


class LatencyLog:
    """The most recent inference durations, for percentiles in status and benchmarks.

    A fixed array (not a growing list) so an always-on daemon's memory stays flat.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._ms = np.zeros(capacity)
        self.count = 0

    def add(self, ms: float) -> None:
        self._ms[self.count % len(self._ms)] = ms
        self.count += 1

    def percentile(self, q: float) -> float | None:
        n = min(self.count, len(self._ms))
        return float(np.percentile(self._ms[:n], q)) if n else None


class Pipeline:
    """Front end -> VAD gate -> model -> smoother, for one stream; no threads, no I/O.

    ``process`` takes a chunk and returns the detections it completes. ``newest`` (the
    stream position captured so far) lets it skip inference when it falls behind.
    ``trace``, when set to a list, receives ``(start, end, probs or None)`` for every
    window, so ``stream-eval`` can re-decide a recording at other thresholds without
    running the model again.
    """

    def __init__(self, cfg: Config, bundle: Bundle) -> None:
        bundle.check_frontend(cfg.frontend)
        cfg = cfg.replace(detect=cfg.detect.for_model(bundle.threshold))
        self.cfg = cfg
        self.bundle = bundle
        self.frontend = FrontEnd(cfg.frontend, cfg.vad, cfg.windows.hop_frames(cfg.frontend))
        self.smoother = Smoother(bundle.labels, cfg.detect)
        self.max_lag = int(cfg.model.max_lag_ms * SAMPLE_RATE / 1000)
        self.inferences = 0
        self.dropped_windows = 0
        self.samples = 0
        self.latency = LatencyLog()
        self.trace: list[tuple[int, int, np.ndarray | None]] | None = None
        # The latest audio, so that a pipeline replacing this one (a reload) can rebuild
        # the features and VAD state of the windows still to come instead of waiting for a
        # window's worth of new audio, and losing any word spoken across the reload.
        self._recent = np.zeros(0, np.float32)
        self._recent_end = 0
        self._recent_keep = max(cfg.frontend.window_samples,
                                int(cfg.vad.history_ms * SAMPLE_RATE / 1000))

    def process(self, chunk: Chunk, newest: int | None = None) -> list[Detection]:
        """Feed a chunk of any length; ``newest`` is the stream position captured so far
        (for dropping)."""
        self.samples += len(chunk.samples)
        self._remember(chunk)
        # A window hop at a time, as the daemon reads: the VAD keeps only a few seconds of
        # decisions, so windows at the start of a minute-long chunk would be judged
        # without theirs.
        step = self.frontend.windower.hop_frames * self.cfg.frontend.hop_length
        out = []
        for i in range(0, max(len(chunk.samples), 1), step):
            piece = Chunk(chunk.samples[i : i + step], chunk.start + i)
            out += self._decide(self.frontend.process(piece), newest)
        return out

    def _remember(self, chunk: Chunk) -> None:
        if chunk.start != self._recent_end:  # a gap: what came before is not continuous
            self._recent = np.zeros(0, np.float32)
        self._recent = np.concatenate([self._recent, chunk.samples])[-self._recent_keep:]
        self._recent_end = chunk.end

    def take_over(self, old: Pipeline) -> list[Detection]:
        """Continue ``old``'s stream from where it stopped (a reload), so that a word
        spoken across the reload is still heard once: no window is lost or decided twice,
        and the counters carry on. Returns the detections this completes (normally none).

        With the same front end, VAD and window settings, ``old``'s front end simply moves
        over with its held windows. Otherwise ``old`` decides what it holds, and the new
        front end rebuilds its features and VAD state from the latest audio, so its first
        window is the one ``old`` would have formed next.
        """
        same = all(getattr(self.cfg, k) == getattr(old.cfg, k)
                   for k in ("frontend", "vad", "windows"))
        # Before anything moves over: deciding them adds to old's counters and smoother.
        out = [] if same else old.flush()
        self.inferences, self.dropped_windows = old.inferences, old.dropped_windows
        self.samples, self.latency = old.samples, old.latency
        self._recent, self._recent_end = old._recent, old._recent_end
        self.smoother.carry_over(old.smoother)
        if same:
            self.frontend = old.frontend
            return []
        fe, recent, end = self.frontend, old._recent, old._recent_end
        begin = end - len(recent)
        start = old.frontend.next_window_start
        if start < begin:  # no audio that far back (just after a gap): start from what is
            start = begin
        else:  # the earliest window start on the new grid that the audio covers
            step = fe.windower.hop_frames * fe.config.hop_length
            start -= (start - begin) // step * step
        if start > begin:  # the VAD also hears what came before, as the old one did
            fe.gate.push(Chunk(recent[: start - begin], begin))
        fe.resume_at(start, formed_until=old.frontend.formed_until)
        fe.windows, fe.windows_open = old.frontend.windows, old.frontend.windows_open
        fe.gaps, fe.invalid_samples = old.frontend.gaps, old.frontend.invalid_samples
        if start < end:
            out += self._decide(fe.process(Chunk(recent[start - begin:], start)), None)
        return out

    def flush(self) -> list[Detection]:
        """Decide the windows the front end still holds (before a reload, which goes on
        with the stream; at its end, :meth:`finish`)."""
        return self._decide(self.frontend.flush(), None)

    def finish(self) -> list[Detection]:
        """The end of the stream: decide its last windows as if silence followed, then all
        that is held. A word in the last second is otherwise never decided: the windows
        that would see it whole, and confirm it, need audio after it to be formed. The
        silence is not counted as audio heard."""
        pad = np.zeros(self.cfg.frontend.window_samples, np.float32)
        out = self._decide(self.frontend.process(Chunk(pad, self._recent_end)), None)
        return out + self.flush()

    def _decide(self, windows: list[GatedWindow], newest: int | None) -> list[Detection]:
        out = []
        for gw in windows:
            w = gw.window
            probs = None
            if gw.open:
                if newest is not None and newest - w.end > self.max_lag:
                    self.dropped_windows += 1
                else:
                    t0 = time.perf_counter()
                    probs = self.bundle.predict(w.features)
                    self.latency.add((time.perf_counter() - t0) * 1000.0)
                    self.inferences += 1
            if self.trace is not None:
                self.trace.append((w.start, w.end, probs))
            det = self.smoother.push(probs, w.start, w.end)
            if det is not None:
                out.append(self._locate(det))
        return out

    def _locate(self, det: Detection) -> Detection:
        """Tighten the window-intersection estimate to the speech the VAD heard in it."""
        span = self.frontend.gate.speech_span(det.start, det.end)
        if span is None:
            return det
        return Detection(det.keyword, det.score, span[0], span[1], det.emit)

    @property
    def windows(self) -> int:
        return self.frontend.windows

    @property
    def vad_active_ratio(self) -> float:
        return self.frontend.windows_open / max(1, self.frontend.windows)

    def stats(self) -> dict:
        """What this pipeline has done, unrounded: the daemon's status reports these
        (rounded, all but ``windows``) and ``Spotter.stats`` all of them as they are."""
        return {"audio_seconds": self.samples / SAMPLE_RATE, "windows": self.windows,
                "inferences": self.inferences, "vad_active_ratio": self.vad_active_ratio,
                "inference_ms_p50": self.latency.percentile(50),
                "inference_ms_p99": self.latency.percentile(99)}


@dataclass
class Overrides:
    """Command-line values that win over the config file."""

    source: str | None = None
    model: str | None = None
    publish: str | None = None
    realtime: bool | None = None


def apply_overrides(cfg: Config, o: Overrides) -> Config:
    import dataclasses

    audio, model, publish = cfg.audio, cfg.model, cfg.publish
    if o.source is not None:
        audio = dataclasses.replace(audio, source=o.source)
    if o.realtime is not None:
        audio = dataclasses.replace(audio, realtime=o.realtime)
    if o.model is not None:
        model = dataclasses.replace(model, name=o.model)
    if o.publish is not None:
        publish = dataclasses.replace(publish, endpoint=o.publish)
    try:
        return cfg.replace(audio=audio, model=model, publish=publish)
    except ConfigError as exc:
        # A value typed on the command line is that option's, not a config key's.
        given = {"audio.source": ("--source", o.source), "model.name": ("--model", o.model),
                 "publish.endpoint": ("--publish", o.publish)}
        flag, value = given.get(exc.key, ("", None))
        if value is None:
            raise
        raise StreamKWSError(f"{flag}: {exc.reason}") from None


@contextlib.contextmanager
def _naming(key: str, from_file: bool) -> Iterator[None]:
    """An error about a value a config file gave becomes an error about its key. A value
    typed on the command line the user has just seen, and a built-in default is ours."""
    try:
        yield
    except StreamKWSError as exc:
        if not from_file:
            raise
        raise ConfigError(key, str(exc)) from None


def load_model(cfg: Config, overrides: Overrides) -> Bundle:
    """The bundle ``model.name`` names, an error about it naming the key when a config
    file gave it (start-up, reload and ``run --check`` alike)."""
    with _naming("model.name", overrides.model is None and cfg.model.name != ModelConfig.name):
        bundle = load_bundle(cfg.model.name)
    # Not an error: swapping models on purpose is allowed, but thresholds tuned for another
    # network's posteriors may miss every word or fire on every other one.
    if why := cfg.detect.calibration_mismatch(cfg.model.name, bundle.name, bundle.sha256):
        log.warning("%s", why)
    return bundle


def open_audio(cfg: Config, overrides: Overrides) -> AudioSource:
    """The source ``audio.source`` names (not yet started), as :func:`load_model` names
    its key; a microphone needs PortAudio, whose absence is a start-up error, not an
    outage to wait out."""
    with _naming("audio.source",
                 overrides.source is None and cfg.audio.source != AudioConfig.source):
        source = open_source(cfg.audio.source, cfg.audio.realtime, cfg.audio.block_ms,
                             cfg.audio.stdin_live)
    if isinstance(source, MicSource):
        load_portaudio()
    return source


def check(cfg: Config, overrides: Overrides) -> str:
    """Read and check all that ``run`` reads at start-up, without opening the device or
    binding the socket (``run --check``): what an admin runs before ``systemctl reload``,
    which cannot report a rejected config, or before a restart, which would go down on it.
    Returns one line saying what ``run`` would use."""
    from streamkws.publish import load_curve_keys

    bundle = load_model(cfg, overrides)
    Pipeline(cfg, bundle)  # a front end the model cannot be fed with is refused here
    source = open_audio(cfg, overrides)
    where = ""
    if isinstance(source, MicSource):
        # Which device it names, looked up in PortAudio's list rather than opened (the
        # running daemon may hold it; ALSA may then leave a held hw: device out of the
        # list). One not listed is no error, as run waits for it, but worth saying.
        try:
            where = f" ({resolve_device(source.spec).describe()})"
        except AudioError as exc:
            where = (f" (not listed by PortAudio now: {exc}; unplugged, or held by another "
                     "program; run would wait for it)")
    elif source.reports_stalls:  # stdin: how it is taken is worth a word
        where = " (live)" if not source.blocks_on_full_ring else " (replayed in full)"
    curve = ""
    if cfg.publish.curve_secret_key:
        load_curve_keys(cfg.publish)
        curve = " with CURVE"
    return (f"model {bundle.name} ({bundle.sha256[:12]}), "
            f"{cfg.detect.describe(bundle.threshold)}; source {source.name}{where}; publishing on "
            f"{cfg.publish.endpoint}{curve}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class StatusSchedule:
    """When the next status message is due: every ``interval`` seconds on a fixed grid, so
    that one published a little late does not push all later ones back (the contract says
    "at least every 5 s"), and after a stall longer than the interval one status follows,
    not a burst of them. A status sent early (news, a greeting) starts the grid again from
    itself: never a longer gap than ``interval``."""

    GREETING_GAP_S = 0.5
    """A burst of subscribers is greeted with one status per this long, not one each."""

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self.next = now + interval
        self.last = -math.inf

    def wait(self, now: float) -> float:
        """How long the loop may sleep before a status is due."""
        return max(0.0, self.next - now)

    def at_once(self, now: float) -> None:
        self.next = now

    def greet(self, now: float) -> None:
        """A subscriber to status arrived: one soon, but no more than one per
        :attr:`GREETING_GAP_S` however many come."""
        self.next = min(self.next, max(now, self.last + self.GREETING_GAP_S))

    def due(self, now: float) -> bool:
        """Whether a status is due at ``now``; if so, the next one is scheduled."""
        if now < self.next:
            return False
        self.last = now
        self.next += self.interval
        if self.next <= now:  # a stall: start the grid again from now
            self.next = now + self.interval
        return True


class Daemon:
    def __init__(
        self,
        cfg: Config,
        config_path: str | Path | None = None,
        overrides: Overrides | None = None,
        echo: TextIO | None = sys.stdout,
        wait_subscribers: int = 0,
        wait_timeout: float = 30.0,
        stop_requested: StopFlag | threading.Event | None = None,
    ) -> None:
        from streamkws.publish import Publisher
        from streamkws.sdnotify import Notifier

        # A stop request (a signal, stdout's reader leaving) ends the loop; the end of the
        # loop, for whatever reason, must also free a source blocked on a full ring.
        self._stop = threading.Event()
        self._sink_stop = threading.Event()
        self._reload = threading.Event()
        self._output_failure: str | None = None
        # Before the slow part (loading the model): systemd may send SIGHUP or SIGTERM as
        # soon as the process exists, and their default actions would kill it outright.
        self._signals = self._install_signals()
        if stop_requested is not None and stop_requested.is_set():  # before we listened
            self.request_stop()
        try:
            self.cfg = cfg
            self.config_path = config_path
            self.overrides = overrides or Overrides()
            self.echo = None if echo is None else LineEcho(echo, on_closed=self._output_closed)
            self.wait_subscribers = wait_subscribers
            self.wait_timeout = wait_timeout
            torch.set_num_threads(cfg.model.threads)
            self.bundle = load_model(cfg, self.overrides)
            self.pipeline = Pipeline(cfg, self.bundle)
            self.source = open_audio(cfg, self.overrides)
            self.supervisor: SourceSupervisor | None = None
            self.stall: StallWatch | None = None
            self.ring = RingBuffer(int(cfg.audio.ring_seconds * SAMPLE_RATE))
            self.publisher = Publisher(cfg.publish)
            self.notifier = Notifier.from_env()
            self.detections = 0
            self._loss_warned: dict[str, tuple[float, int]] = {}  # kind: (when, count then)
            self.started = time.monotonic()
            # Live sources (microphones, paced replay) must keep up; a fast replay waits for
            # us instead, so nothing is ever dropped there.
            self.live = not self.source.blocks_on_full_ring or getattr(self.source, "realtime",
                                                                       False)
        except BaseException:
            self._restore_signals()  # no daemon to stop: the old handlers apply again
            if getattr(self, "echo", None) is not None:
                self.echo.close()
            raise

    # -- control ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._sink_stop.set()
        self._wake()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake()

    def _output_closed(self, error: OSError | None) -> None:
        """Standard output's reader left (``error`` None: a clean stop, as a pipeline's
        producer does) or writing to it failed (a full disk: a failed run)."""
        if error is not None:
            self._output_failure = f"standard output failed: {os_error_message(error)}"
            log.error("%s; stopping", self._output_failure)
        self.request_stop()

    def _wake(self) -> None:
        ring = getattr(self, "ring", None)  # a signal may arrive while __init__ still runs
        if ring is not None:
            ring.wake()

    def _install_signals(self) -> SignalRelay | None:
        """Route SIGTERM/SIGINT to a stop and SIGHUP to a reload (none off the main thread,
        where Python cannot install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        return SignalRelay({signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop,
                            signal.SIGHUP: self.request_reload})

    def _restore_signals(self) -> None:
        # The old handlers apply again; off the main thread, where that cannot be done,
        # ours stay (a later call from the main thread can still restore them).
        if self._signals is not None and self._signals.close():
            self._signals = None

    def reload(self) -> bool:
        """Re-read the config and model; on any error keep running the old ones."""
        self.notifier.reloading()
        try:
            loaded = apply_overrides(load_default(self.config_path), self.overrides)
            # The device and the socket stay open, so their settings stay too.
            new = loaded.replace(audio=self.cfg.audio, publish=self.cfg.publish)
            bundle = load_model(new, self.overrides)
            pipeline = Pipeline(new, bundle)
        except StreamKWSError as exc:
            log.error("reload rejected, still running the previous configuration: %s", exc)
            self.notifier.ready("reload rejected: " + str(exc)[:200])
            return False
        for section in ("audio", "publish"):
            if getattr(loaded, section) != getattr(self.cfg, section):
                log.warning("[%s] changes take effect only after a restart; still running "
                            "the previous [%s]", section, section)
        for det in pipeline.take_over(self.pipeline):
            self._publish_detection(det)
        torch.set_num_threads(new.model.threads)
        self.cfg, self.bundle, self.pipeline = new, bundle, pipeline
        log.info("reloaded configuration; model %s (%s), %s", bundle.name, bundle.sha256[:12],
                 new.detect.describe(bundle.threshold))
        self.notifier.ready(self._status_line())
        return True

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the source ends or a stop is requested; then, whatever happened
        (a bug in processing included), close the device and the socket after a final
        status, so subscribers and systemd always hear how it ended."""
        error = None
        self._source_failure: str | None = None
        try:
            rc = self._serve()
            return 1 if self._output_failure else rc
        except Exception as exc:
            log.exception("processing failed, stopping")
            error = f"{type(exc).__name__}: {exc}"
            return 1
        finally:
            # A source that broke (a file cut short, a pipe that failed) ends the run as a
            # failure too: subscribers must not read its last status as a clean end.
            error = error or self._source_failure or self._output_failure
            self._sink_stop.set()  # after a failure in processing no stop request did
            self.notifier.stopping()
            if self.supervisor is not None:
                self.supervisor.stop()
            stopped_at = time.monotonic()  # stop() may wait 1 s on a reader in read()
            self.source.stop()
            if self.stall is not None:  # a quiet producer that then closed: not stalled
                self.stall.poll(stopped_at)
            self._publish_status(final=True, error=error)
            self.publisher.close()
            if self.echo is not None:  # while a stop request still reaches us
                self.echo.close(stop=self._stop)
            self._restore_signals()
            if error is None:  # a failure has said so already, with its traceback
                log.info("stopped; %s", self._status_line())

    def _short_of_subscribers(self) -> str:
        want, pub = self.wait_subscribers, self.publisher
        # Connections, not subscriptions: one subscriber to two topics sends two.
        if pub.subscribers < want:
            return f"only {pub.subscribers} of {want} subscribers connected"
        return (f"{pub.subscribers} subscribers connected but only {pub.subscriptions} "
                f"subscriptions of the {want} needed")

    def _serve(self) -> int:
        if self._stop.is_set():  # asked to stop while the model was loading
            return 0
        sink_block = self.source.blocks_on_full_ring

        def sink(chunk: Chunk) -> None:
            self.ring.write(chunk, block=sink_block, stop=self._sink_stop)

        if self.wait_subscribers and not self.publisher.wait_for_subscribers(
                self.wait_subscribers, self.wait_timeout, stop=self._stop):
            if self._stop.is_set():
                return 0
            log.warning("%s after %.0f s; starting anyway", self._short_of_subscribers(),
                        self.wait_timeout)
        if isinstance(self.source, MicSource):
            # A device that cannot open now may appear later (a USB microphone plugged in,
            # the sound server still starting): retried like an outage, never fatal.
            self.supervisor = SourceSupervisor(
                self.source, sink, retry_max_s=self.cfg.audio.retry_max_s,
                stall_timeout_s=self.cfg.audio.stall_timeout_s, rescan=refresh_devices)
            self.supervisor.start()
        else:
            self.source.on_finished = self.ring.wake
            if self.source.reports_stalls and self.cfg.audio.stall_timeout_s > 0:
                self.stall = StallWatch(self.source, self.cfg.audio.stall_timeout_s)
            self.source.start(sink)
        log.info("listening on %s with model %s, %s; publishing on %s", self.source.name,
                 self.bundle.name, self.cfg.detect.describe(self.bundle.threshold),
                 self.publisher.endpoint)
        self.notifier.ready(self._status_line())
        self._publish_status()
        statuses = StatusSchedule(self.cfg.publish.status_interval_s, time.monotonic())
        watchdog = self._watchdog_pacer()
        # Audio (a window hop's worth), stop and reload requests and the end of a file
        # all wake the read below; its timeout only paces status messages, the watchdog
        # and the polling of a microphone being retried.
        idle_wait = min(1.0, self.cfg.publish.status_interval_s)
        if watchdog is not None:
            idle_wait = min(idle_wait, watchdog.interval / 2)
        rc = 0
        while not self._stop.is_set():
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            hop = self.cfg.windows.hop_ms * SAMPLE_RATE // 1000  # a reload may change it
            # A live stream is read a window hop at a time: windows cannot complete
            # sooner, and waking for every capture block would cost more than the work.
            whole_hops = self.live and not self.source.finished.is_set()
            retrying = self.supervisor is not None and self.supervisor.state == RETRYING
            wait = min(idle_wait, 0.25) if retrying else idle_wait
            wait = min(wait, statuses.wait(time.monotonic()))  # a status may be due first
            chunk = self.ring.read(max_samples=hop, min_samples=hop if whole_hops else 1,
                                   timeout=wait)
            if chunk is not None:
                newest = self.ring.write_position if self.live else None
                for det in self.pipeline.process(chunk, newest):
                    self._publish_detection(det)
            elif (self.supervisor is None and self.source.finished.is_set()
                  and self.ring.available == 0):
                for det in self.pipeline.finish():
                    self._publish_detection(det)
                if self.source.error is not None:
                    self._source_failure = f"audio source stopped: {self.source.error}"
                    log.error("%s", self._source_failure)
                    rc = 1
                break
            now = time.monotonic()
            if self.supervisor is not None and self.supervisor.poll(now):
                statuses.at_once(now)  # subscribers hear of an outage (or its end) at once
            if self.stall is not None and self.stall.poll(now):
                statuses.at_once(now)
            if self.publisher.poll():
                statuses.greet(now)
            if statuses.due(now):
                self._publish_status()
            self._warn_of_lost_audio(now)
            if watchdog is not None and watchdog.due(now):
                self.notifier.watchdog()
        return rc

    LOSS_WARNING_GAP_S = 60.0

    def _warn_of_lost_audio(self, now: float) -> None:
        """Audio lost to a full ring, or in a microphone's driver, is counted in status; the
        log says so too, once a minute at most for each."""
        lost = self.ring.overrun_samples
        if self._is_news("ring", lost, now):
            hint = ""
            if not self.source.blocks_on_full_ring and self.supervisor is None:
                hint = " (audio.stdin_live is on: is stdin fed faster than real time?)"
            log.warning("processing fell %g s behind %s: %.2f s of audio lost so far%s",
                        self.cfg.audio.ring_seconds, self.source.name, lost / SAMPLE_RATE,
                        hint)
        overflows = getattr(self.source, "input_overflows", 0)
        if self._is_news("driver", overflows, now):
            # PortAudio says some input was lost, not how much: audio time closes up over
            # the loss, so t_* may fall behind the wall clock by as much.
            log.warning("the audio driver of %s lost input %d time(s) so far (the system was "
                        "too busy to take it in time)", self.source.name, overflows)

    def _is_news(self, kind: str, count: int, now: float) -> bool:
        when, seen = self._loss_warned.get(kind, (-math.inf, 0))
        if count == seen or now - when < self.LOSS_WARNING_GAP_S:
            return False
        self._loss_warned[kind] = (now, count)
        return True

    def _watchdog_pacer(self):
        from streamkws.sdnotify import WatchdogPacer

        interval = self.notifier.watchdog_interval()
        return WatchdogPacer(interval) if interval else None

    # -- messages -----------------------------------------------------------------------------

    def _publish_detection(self, det: Detection) -> None:
        from streamkws.publish import detection_message

        msg = detection_message(
            keyword=det.keyword, score=det.score, t_start=det.start / SAMPLE_RATE,
            t_end=det.end / SAMPLE_RATE, t_emit=det.emit / SAMPLE_RATE,
            source=self.source.name, model=self.bundle.name, model_sha256=self.bundle.sha256,
        )
        self.publisher.publish("detection", msg)
        self.detections += 1
        if self.echo is not None:
            # A fast replay may wait for a slow reader, as it waits for the model.
            self.echo.put(json.dumps(msg) + "\n", wait=not self.live, stop=self._stop)

    def counters(self) -> dict:
        p = self.pipeline
        st = p.stats()
        p50, p99 = st["inference_ms_p50"], st["inference_ms_p99"]
        return {
            "uptime": round(time.monotonic() - self.started, 3),
            "audio_seconds": round(st["audio_seconds"], 3),
            "inferences": st["inferences"],
            "vad_active_ratio": round(st["vad_active_ratio"], 4),
            "overruns": self.ring.overruns,
            "dropped_windows": p.dropped_windows,
            "detections": self.detections,
            # Process CPU time lets `streamkws bench` measure steady-state cost without
            # counting interpreter start-up and model loading.
            "cpu_seconds": round(time.process_time(), 3),
            "inference_ms_p50": None if p50 is None else round(p50, 3),
            "inference_ms_p99": None if p99 is None else round(p99, 3),
            **self._source_health(),
        }

    def _source_health(self) -> dict:
        """The source's state for status: a microphone's (reopened when it fails) or
        stdin's (waited for when it stalls); empty for files."""
        sup, stall = self.supervisor, self.stall
        if sup is not None:
            return {"source_state": sup.state, "source_error": sup.error,
                    "source_retries": sup.retries,
                    "source_overflows": getattr(self.source, "input_overflows", 0)}
        if stall is not None:
            return {"source_state": stall.state, "source_error": stall.error}
        return {}

    def _publish_status(self, final: bool = False, error: str | None = None) -> None:
        from streamkws.publish import status_message

        c = self.counters()
        if final:
            c["final"] = True
        if error is not None:
            c["error"] = error[:500]
        self.publisher.publish("status", status_message(**c))
        self.notifier.status(self._status_line())

    def _status_line(self) -> str:
        c = self.counters()
        counts = (f"{c['audio_seconds']:.0f} s audio, {c['detections']} detections, "
                  f"{c['dropped_windows']} dropped windows")
        # Audio lost is the exception worth a word: the warnings were once a minute at most.
        if self.ring.overrun_samples:
            counts += f", {self.ring.overrun_samples / SAMPLE_RATE:.2f} s audio lost to overruns"
        if c.get("source_overflows"):
            counts += f", input lost in the driver {_count(c['source_overflows'], 'time')}"
        sup = self.supervisor
        if sup is not None and sup.state == RETRYING:
            # What `systemctl status` shows: why nothing is heard comes first.
            why = f"unavailable, retrying ({_count(sup.retries, 'attempt')}): {sup.error}"[:200]
            return f"{self.source.name}: {why}; {counts}"
        if self.stall is not None and self.stall.state == STALLED:
            return f"{self.stall.error} (producer stuck?); {counts}"
        return f"{self.source.name}: {counts}"
