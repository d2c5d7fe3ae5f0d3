"""Live capture from a sound card (or PulseAudio/PipeWire through ALSA) via PortAudio.

``sounddevice`` is imported lazily so that the rest of the package (file replay, tools,
tests) works on machines without the PortAudio library; only opening a microphone needs it.

Capture prefers 16 kHz mono float32, which most ALSA ``plug``/``pulse`` devices accept. Raw
hardware devices often refuse it, so we fall back to the device's native rate and channel
count, then mix down and resample in the callback: both are cheap next to the model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from streamkws import SAMPLE_RATE
from streamkws.audio.base import AudioSource, Sink
from streamkws.audio.chunk import Chunk
from streamkws.audio.wav import StreamResampler, to_mono
from streamkws.errors import AudioError

log = logging.getLogger(__name__)


def _sounddevice() -> ModuleType:
    try:
        import sounddevice
    except OSError as exc:  # sounddevice raises OSError when libportaudio cannot be loaded
        raise AudioError(f"PortAudio library not found: install libportaudio2 ({exc})") from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    default_samplerate: float
    hostapi: str
    is_default: bool

    def describe(self) -> str:
        return f"[{self.index}] {self.name} ({self.hostapi}, {self.channels} ch)"


def load_portaudio() -> None:
    """Raise :class:`AudioError` now if PortAudio is missing (no retry can mend that)."""
    _sounddevice()


def refresh_devices() -> None:
    """Re-scan the audio devices.

    PortAudio enumerates devices once, when ``sounddevice`` is imported, so a device that
    appears later (a USB microphone plugged in, PulseAudio started after import) stays
    invisible until PortAudio is re-initialised. This invalidates every open stream, so
    call it only while no :class:`MicSource` is running.
    """
    sd = _sounddevice()
    # Not initialised means an earlier re-scan failed half-way; initialising mends that.
    with contextlib.suppress(sd.PortAudioError):
        sd._terminate()
    sd._initialize()


def list_input_devices() -> list[InputDevice]:
    """Every device PortAudio can capture from, in PortAudio index order."""
    sd = _sounddevice()
    try:
        default_index = sd.query_devices(kind="input")["index"]
    except (sd.PortAudioError, ValueError, KeyError, TypeError):
        default_index = None  # no default input device: not an error for listing
    devices = []
    for index, info in enumerate(sd.query_devices()):
        if info["max_input_channels"] <= 0:
            continue
        devices.append(
            InputDevice(
                index=info.get("index", index),
                name=info["name"],
                channels=int(info["max_input_channels"]),
                default_samplerate=float(info["default_samplerate"]),
                hostapi=sd.query_hostapis(info["hostapi"])["name"],
                is_default=info.get("index", index) == default_index,
            )
        )
    return devices


def _available(devices: list[InputDevice]) -> str:
    return ", ".join(f"'{d.name}' ({d.index})" for d in devices)


def resolve_device(spec: str | int | None) -> InputDevice:
    """Find the input device a user named.

    ``None`` or ``""`` is the system default; an integer (or a string of digits) is a
    PortAudio index; anything else matches device names case-insensitively, an exact name
    first, else the first name containing it (so ``pulse`` never picks ``pulse_monitor``
    over a device called exactly ``pulse``).
    """
    devices = list_input_devices()
    if not devices:
        raise AudioError("no audio input devices found")
    if isinstance(spec, str):
        spec = spec.strip()
    if spec is None or spec == "":
        for d in devices:
            if d.is_default:
                return d
        raise AudioError(f"no default audio input device; choose one of: {_available(devices)}")
    if isinstance(spec, int) or spec.isdigit():
        index = int(spec)
        for d in devices:
            if d.index == index:
                return d
        raise AudioError(
            f"no audio input device with index {index}; available: {_available(devices)}"
        )
    wanted = spec.lower()
    for d in devices:
        if d.name.lower() == wanted:
            return d
    for d in devices:
        if wanted in d.name.lower():
            return d
    raise AudioError(f"no audio input device matches '{spec}'; available: {_available(devices)}")


class MicSource(AudioSource):
    """Captures from an input device and delivers 16 kHz mono chunks from the PortAudio callback.

    ``name`` is ``mic`` for the default device and ``mic:<spec>`` otherwise, using what the
    user typed (a name or an index) so messages match the command line; the device actually
    opened is in :attr:`device` once started.

    ``capture_rate`` forces the rate the device is opened at (the stream is still resampled
    to 16 kHz); it exists to exercise the resampling path on devices that would accept 16 kHz.
    """

    blocks_on_full_ring = False

    def __init__(
        self,
        device: str | int | None = None,
        block_ms: int = 20,
        latency: str | float = "low",
        capture_rate: int | None = None,
    ) -> None:
        super().__init__()
        if block_ms <= 0:
            raise ValueError("block_ms must be positive")
        self.spec = device
        self.name = "mic" if device is None or device == "" else f"mic:{device}"
        self.block_ms = block_ms
        self.latency = latency
        self.capture_rate = capture_rate
        self.device: InputDevice | None = None
        self.samplerate: int | None = None
        """The rate the device was opened at."""
        self.channels: int | None = None
        """The channel count the device was opened with (mixed down to mono)."""
        self.input_overflows = 0
        """Blocks for which PortAudio reported lost input (the callback or system was late),
        since the source was made: a reopen after an outage does not reset it."""
        self._stream: Any = None
        self._sink: Sink | None = None
        self._resampler: StreamResampler | None = None
        self._position = 0
        self._failed = False
        self._stopping = False
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------

    def _choose_format(self, sd: ModuleType, dev: InputDevice) -> tuple[int, int]:
        """Pick (rate, channels): 16 kHz mono if possible, else what the device offers."""
        native = int(round(dev.default_samplerate)) or SAMPLE_RATE
        rates = [self.capture_rate] if self.capture_rate else [SAMPLE_RATE, native]
        channel_options = sorted({1, min(2, dev.channels), dev.channels})
        last_error: Exception | None = None
        for rate in dict.fromkeys(rates):
            for channels in channel_options:
                try:
                    sd.check_input_settings(
                        device=dev.index, channels=channels, dtype="float32", samplerate=rate
                    )
                except (sd.PortAudioError, ValueError) as exc:
                    last_error = exc
                    continue
                return rate, channels
        raise AudioError(
            f"audio device {dev.describe()} supports no usable capture format "
            f"(tried {', '.join(map(str, dict.fromkeys(rates)))} Hz with "
            f"{'/'.join(map(str, channel_options))} channels): {last_error}"
        )

    def start(self, sink: Sink) -> None:
        sd = _sounddevice()
        with self._lock:
            if self._stream is not None:
                raise RuntimeError(f"{self.name} is already started")
            dev = resolve_device(self.spec)
            rate, channels = self._choose_format(sd, dev)
            self.device = dev
            self._prepare(sink, rate, channels)
            try:
                stream = sd.InputStream(
                    device=dev.index,
                    samplerate=rate,
                    channels=channels,
                    dtype="float32",
                    blocksize=max(1, rate * self.block_ms // 1000),
                    latency=self.latency,
                    callback=self._callback,
                    finished_callback=self._on_finished,
                )
            except (sd.PortAudioError, ValueError) as exc:
                raise AudioError(f"cannot open audio device {dev.describe()}: {exc}") from None
            try:
                stream.start()
            except sd.PortAudioError as exc:
                stream.close(ignore_errors=True)
                raise AudioError(f"cannot start audio device {dev.describe()}: {exc}") from None
            self._stream = stream
        log.info(
            "capturing from %s at %d Hz, %d channel(s)%s",
            dev.describe(),
            rate,
            channels,
            ", resampling to 16 kHz" if self._resampler else "",
        )

    def _prepare(self, sink: Sink, rate: int, channels: int) -> None:
        """Reset the conversion state for a stream of ``rate`` Hz and ``channels`` channels."""
        self.samplerate, self.channels = rate, channels
        self._resampler = StreamResampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
        self._sink = sink
        self._position = 0
        self.samples_delivered = 0
        self.samples_read = 0
        self._failed = False
        self._stopping = False
        self.error = None
        self.finished.clear()

    # -- the capture context -------------------------------------------------------------

    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        # Runs on PortAudio's audio thread: an exception here would be printed and lost by
        # sounddevice and abort the stream, so everything is caught and reported via .error.
        try:
            if status.input_overflow:
                self.input_overflows += 1
            if self._failed:
                return
            mono = to_mono(indata)
            if self._resampler is not None:
                mono = self._resampler.process(mono)
            elif np.may_share_memory(mono, indata):
                # PortAudio reuses indata after we return, and the sink may keep the array.
                mono = mono.copy()
            if len(mono) == 0:
                return  # the resampler is still filling its filter
            chunk = Chunk(mono, self._position)
            self._position = chunk.end
            self.samples_read = chunk.end
            sink = self._sink
            if sink is not None:
                sink(chunk)
            self.samples_delivered = chunk.end
        except BaseException as exc:  # nothing may escape to PortAudio (see above)
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        # Fail-stop, like ThreadedSource: a sink that raised once cannot be trusted with the
        # rest of the stream, and the consumer learns of it through .finished/.error.
        if not self._failed:
            self._failed = True
            self.error = exc
            log.error("audio source %s failed: %r", self.name, exc)
            self.finished.set()

    def _on_finished(self) -> None:
        # PortAudio calls this whenever the stream stops, including our own stop(); only a
        # stop we did not ask for (device unplugged, server gone) is an error. It is logged
        # by whoever watches .finished (the daemon retries quietly), not here.
        if not self._stopping and not self._failed:
            self._failed = True
            self.error = AudioError(f"audio device {self._device_label()} stopped unexpectedly")
            log.debug("%s", self.error)
        self.finished.set()

    def _device_label(self) -> str:
        return self.device.describe() if self.device is not None else self.name

    # -- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """Close the device. Must not be called from the sink (it would wait on itself)."""
        with self._lock:
            stream, self._stream = self._stream, None
            self._stopping = True
        if stream is not None:
            try:
                stream.close(ignore_errors=True)
            except Exception as exc:  # a vanished device may fail to close; nothing to keep
                log.debug("closing %s: %r", self.name, exc)
        self.finished.set()
