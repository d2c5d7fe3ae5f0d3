"""Microphone capture: device lookup, the callback's conversion, and real capture via PulseAudio.

The ``pulse`` tests play real speech into a private PulseAudio null sink and capture its
monitor through PortAudio exactly as the daemon captures a microphone, then check that what
came back is the same audio at the same level. Audio: Speech Commands dataset, P. Warden,
2018, arXiv:1804.03209, CC BY 4.0, read in place from ``../shared/data`` through the
``speech_dir`` fixture of ``conftest.py`` (skips locally, fails under CI when missing).
"""

from __future__ import annotations

import builtins
import sys
import time
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from streamkws import SAMPLE_RATE
from streamkws.audio.chunk import Chunk
from streamkws.audio.mic import (
    InputDevice,
    MicSource,
    list_input_devices,
    refresh_devices,
    resolve_device,
)
from streamkws.audio.ring import RingBuffer
from streamkws.audio.wav import load_audio
from streamkws.errors import AudioError

pytest_plugins = ["pulse"]  # the session-wide PulseAudio server fixture, tests/pulse.py


@pytest.fixture
def sd() -> types.ModuleType:
    try:
        import sounddevice
    except OSError as exc:
        pytest.skip(f"PortAudio not available: {exc}")
    return sounddevice


def _ok() -> types.SimpleNamespace:
    return types.SimpleNamespace(input_overflow=False)


# -- device lookup ---------------------------------------------------------------------------

_FAKE_DEVICES = [
    {"name": "HDA Intel PCH: ALC892 Analog (hw:0,0)", "hostapi": 0, "max_input_channels": 2},
    {"name": "HDA Intel PCH: HDMI 0 (hw:0,3)", "hostapi": 0, "max_input_channels": 0},
    {"name": "USB PnP Sound Device: Audio (hw:1,0)", "hostapi": 0, "max_input_channels": 1},
    {"name": "pulse", "hostapi": 0, "max_input_channels": 32},
    {"name": "default", "hostapi": 0, "max_input_channels": 32},
]


@pytest.fixture
def fake_devices(sd: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    devices = [
        dict(d, index=i, default_samplerate=44100.0 if i < 3 else 16000.0)
        for i, d in enumerate(_FAKE_DEVICES)
    ]

    def query_devices(device: object = None, kind: str | None = None) -> object:
        if kind == "input":
            return devices[4]
        assert device is None and kind is None
        return devices

    monkeypatch.setattr(sd, "query_devices", query_devices)
    monkeypatch.setattr(sd, "query_hostapis", lambda index=None: {"name": "ALSA"})
    return devices


def test_list_input_devices_skips_output_only_devices(fake_devices: list[dict]) -> None:
    devices = list_input_devices()
    assert [d.index for d in devices] == [0, 2, 3, 4]
    assert devices[1] == InputDevice(2, _FAKE_DEVICES[2]["name"], 1, 44100.0, "ALSA", False)
    assert [d.name for d in devices if d.is_default] == ["default"]


def test_resolve_device_by_default_index_and_name(fake_devices: list[dict]) -> None:
    assert resolve_device(None).name == "default"
    assert resolve_device("").name == "default"
    assert resolve_device(2).index == 2
    assert resolve_device(" 3 ").name == "pulse"
    assert resolve_device("usb pnp").index == 2  # case-insensitive substring
    assert resolve_device("PULSE").index == 3
    assert resolve_device("alc892").index == 0


def test_resolve_device_unknown_name_lists_available_devices(fake_devices: list[dict]) -> None:
    with pytest.raises(AudioError) as info:
        resolve_device("blue yeti")
    msg = str(info.value)
    assert "'blue yeti'" in msg
    for d in _FAKE_DEVICES:
        if d["max_input_channels"] > 0:
            assert d["name"] in msg
    assert "HDMI" not in msg  # output-only devices are no answer to "which input?"
    assert "\n" not in msg


def test_resolve_device_bad_index_and_no_devices(
    fake_devices: list[dict], monkeypatch: pytest.MonkeyPatch, sd: types.ModuleType
) -> None:
    with pytest.raises(AudioError, match=r"no audio input device with index 1\b.*'pulse'"):
        resolve_device(1)  # exists, but is output-only
    monkeypatch.setattr(sd, "query_devices", lambda device=None, kind=None: [])
    with pytest.raises(AudioError, match="^no audio input devices found$"):
        resolve_device("anything")


def test_missing_portaudio_is_a_clear_audio_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_portaudio(name: str, *args: object, **kwargs: object) -> object:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    with pytest.raises(AudioError, match="PortAudio library not found: install libportaudio2"):
        list_input_devices()


# -- the callback, driven directly -----------------------------------------------------------


def test_callback_mixes_down_and_resamples_48k_stereo() -> None:
    mic = MicSource(device="fake")
    chunks: list[Chunk] = []
    mic._prepare(chunks.append, rate=48000, channels=2)
    block = 960  # 20 ms at 48 kHz
    t = np.arange(48000 * 2) / 48000
    tone = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
    stereo = np.stack([0.5 * tone, 0.1 * tone], axis=1)  # mono mix is 0.3 * tone
    for i in range(0, len(stereo), block):
        indata = stereo[i : i + block].copy()
        mic._callback(indata, block, None, _ok())
        indata[:] = 9.0  # PortAudio reuses its buffer; what we delivered must not change
    assert mic.error is None and not mic.finished.is_set()
    assert chunks
    for prev, cur in zip(chunks, chunks[1:], strict=False):
        assert cur.start == prev.end  # contiguous, strictly increasing positions
    assert all(c.samples.dtype == np.float32 and c.samples.ndim == 1 for c in chunks)
    out = np.concatenate([c.samples for c in chunks])
    assert mic.samples_delivered == chunks[-1].end == len(out)
    # 2 s of 48 kHz in, about 2 s of 16 kHz out (less what the filter still holds).
    assert 2 * SAMPLE_RATE - 1000 <= len(out) <= 2 * SAMPLE_RATE
    steady = out[SAMPLE_RATE // 2 :]
    assert np.max(np.abs(steady)) < 1.0
    assert abs(np.sqrt(np.mean(steady**2)) - 0.3 / np.sqrt(2)) < 0.01
    spectrum = np.abs(np.fft.rfft(steady))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(steady) - 440.0) < 2.0


def test_callback_16k_mono_passes_samples_through_and_counts_overflows() -> None:
    mic = MicSource()
    assert mic.name == "mic"
    chunks: list[Chunk] = []
    mic._prepare(chunks.append, rate=SAMPLE_RATE, channels=1)
    rng = np.random.default_rng(0)
    blocks = [rng.uniform(-1, 1, (320, 1)).astype(np.float32) for _ in range(5)]
    for i, b in enumerate(blocks):
        indata = b.copy()
        mic._callback(indata, 320, None, types.SimpleNamespace(input_overflow=i in (1, 3)))
        indata[:] = 0.0
    assert [c.start for c in chunks] == [0, 320, 640, 960, 1280]
    np.testing.assert_array_equal(
        np.concatenate([c.samples for c in chunks]), np.concatenate(blocks)[:, 0]
    )
    assert mic.input_overflows == 2


def test_callback_never_raises_when_the_sink_does() -> None:
    mic = MicSource(device=3)
    assert mic.name == "mic:3"
    calls = []

    def sink(chunk: Chunk) -> None:
        calls.append(chunk.start)
        if len(calls) == 2:
            raise RuntimeError("consumer bug")

    mic._prepare(sink, rate=48000, channels=2)
    indata = np.zeros((960, 2), np.float32)
    for _ in range(10):
        mic._callback(indata, 960, None, _ok())  # must not raise
    assert isinstance(mic.error, RuntimeError) and str(mic.error) == "consumer bug"
    assert mic.finished.is_set()
    assert len(calls) == 2  # fail-stop: nothing more is handed to a broken sink
    mic.stop()
    assert isinstance(mic.error, RuntimeError)  # stop() does not hide why it ended


def test_unexpected_stream_end_is_an_error_but_stop_is_not() -> None:
    mic = MicSource(device="pulse")
    mic._prepare(lambda c: None, rate=SAMPLE_RATE, channels=1)
    mic._on_finished()  # PortAudio gave up on the stream on its own
    assert isinstance(mic.error, AudioError) and "stopped unexpectedly" in str(mic.error)
    assert mic.finished.is_set()

    mic._prepare(lambda c: None, rate=SAMPLE_RATE, channels=1)
    mic.stop()
    mic._on_finished()
    mic.stop()  # idempotent
    assert mic.error is None and mic.finished.is_set()


# -- real capture through PulseAudio ---------------------------------------------------------


@pytest.fixture(scope="module")
def speech_wav(
    speech_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray]:
    """About 3 s of real speech (three clips) as a 16 kHz int16 WAV, and its samples."""
    files = sorted((speech_dir / "yes").glob("*.wav"))[:3]
    assert len(files) == 3, f"expected speech clips under {speech_dir / 'yes'}"
    audio = np.concatenate([load_audio(f) for f in files])
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return path, pcm.astype(np.float32) / 32768.0


def _capture_while_playing(
    pulse_server, wav: Path, **mic_kwargs: object
) -> tuple[MicSource, np.ndarray]:
    ring = RingBuffer(SAMPLE_RATE * 30)
    mic = MicSource(device=pulse_server.device, **mic_kwargs)
    mic.start(ring.write)
    try:
        deadline = time.monotonic() + 5.0
        while mic.samples_delivered == 0:  # playback must not start before capture runs
            assert time.monotonic() < deadline, "no audio from the capture stream"
            assert mic.error is None, mic.error
            time.sleep(0.01)
        player = pulse_server.play(wav)
        _, err = player.communicate(timeout=15)
        assert player.returncode == 0, f"paplay failed: {err.decode(errors='replace')}"
        time.sleep(0.5)  # what paplay drained into the sink is still on its way to us
    finally:
        mic.stop()
    assert mic.error is None, mic.error
    chunks = []
    while (c := ring.read()) is not None:
        chunks.append(c)
    assert ring.overruns == 0 and ring.gap_samples == 0
    for prev, cur in zip(chunks, chunks[1:], strict=False):
        assert cur.start == prev.end
    return mic, np.concatenate([c.samples for c in chunks])


def _align(captured: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(normalised correlation peak, level ratio in dB, delay) of ``ref`` inside ``captured``.

    The delay is found to a fraction of a sample: when the server converts 16 kHz to the
    capture rate and we convert back, the round trip may shift the audio by a part of a
    16 kHz sample (a third of one at 48 kHz), which whole-sample alignment would count as
    distortion (a correlation near 0.97 instead of 1.0).
    """
    assert len(captured) > len(ref) + 2, "captured less audio than was played"
    nfft = 1 << int(np.ceil(np.log2(len(captured) + len(ref))))
    spec = np.fft.rfft(captured, nfft) * np.conj(np.fft.rfft(ref, nfft))
    corr = np.fft.irfft(spec, nfft)[: len(captured) - len(ref) + 1]
    lag = min(max(int(np.argmax(corr)), 1), len(captured) - len(ref) - 1)
    seg = captured[lag - 1 : lag + len(ref) + 1].astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(seg) + 64)))
    ref_spec = np.fft.rfft(ref.astype(np.float64), n)
    freqs = np.fft.rfftfreq(n)
    best = (-2.0, 0.0, 0.0)
    for frac in np.linspace(-1.0, 1.0, 33):
        # ref delayed by 1 + frac samples, band-limited (exact for a 16 kHz signal)
        shifted = np.fft.irfft(ref_spec * np.exp(-2j * np.pi * freqs * (1 + frac)), n)[: len(seg)]
        peak = float(np.dot(seg, shifted) / (np.linalg.norm(seg) * np.linalg.norm(shifted)))
        if peak > best[0]:
            ratio = np.linalg.norm(seg[1:-1]) / np.linalg.norm(ref)
            best = (peak, float(20 * np.log10(ratio)), lag + float(frac))
    return best


@pytest.mark.pulse
def test_pulse_device_is_listed(pulse_server) -> None:
    dev = resolve_device(pulse_server.device)
    assert dev.name == "pulse" and dev.channels > 0


@pytest.mark.pulse
def test_capture_16k_matches_what_was_played(pulse_server, speech_wav) -> None:
    wav, ref = speech_wav
    mic, captured = _capture_while_playing(pulse_server, wav)
    assert mic.samplerate == SAMPLE_RATE and mic.channels == 1  # no conversion needed
    peak, ratio_db, delay = _align(captured, ref)
    assert peak >= 0.9, f"correlation {peak:.3f} at delay {delay:.2f}"
    assert abs(ratio_db) <= 3.0, f"level off by {ratio_db:+.2f} dB"


@pytest.mark.pulse
def test_capture_48k_is_resampled_to_match_what_was_played(pulse_server, speech_wav) -> None:
    wav, ref = speech_wav
    mic, captured = _capture_while_playing(pulse_server, wav, capture_rate=48000)
    assert mic.samplerate == 48000
    peak, ratio_db, delay = _align(captured, ref)
    assert peak >= 0.9, f"correlation {peak:.3f} at delay {delay:.2f}"
    assert abs(ratio_db) <= 3.0, f"level off by {ratio_db:+.2f} dB"


@pytest.mark.pulse
def test_refresh_devices_keeps_pulse_visible(pulse_server) -> None:
    refresh_devices()
    assert any(d.name == "pulse" for d in list_input_devices())
