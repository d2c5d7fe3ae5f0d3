"""The log-Mel front end: matches librosa, and streaming equals batch for any chunking."""

import librosa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkws.errors import ConfigError
from streamkws.features import (
    FrontEndConfig,
    LogMel,
    StreamingLogMel,
    Windower,
    iter_windows,
    mel_filterbank,
)


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax", "htk", "norm"),
    [
        (16000, 512, 40, 20.0, 7600.0, False, "slaney"),
        (16000, 512, 40, 20.0, 7600.0, True, None),
        (16000, 1024, 80, 0.0, 8000.0, False, "slaney"),
        (16000, 512, 64, 125.0, 7500.0, True, "slaney"),
    ],
)
def test_filterbank_equals_librosa(sr, n_fft, n_mels, fmin, fmax, htk, norm):
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                              htk=htk, norm=norm)
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, "htk" if htk else "slaney",
                          "slaney" if norm else "none")
    assert np.abs(ours - ref).max() <= 1e-5


def test_log_mel_equals_librosa_on_real_speech(speech_stream):
    cfg = FrontEndConfig()
    ours = LogMel(cfg)(speech_stream)
    # librosa centres the 400-sample window inside the 512-point frame; padding by the
    # difference lines its frames up with ours.
    pad = (cfg.n_fft - cfg.win_length) // 2
    ref = librosa.feature.melspectrogram(
        y=np.pad(speech_stream.astype(np.float64), pad), sr=16000, n_fft=cfg.n_fft,
        hop_length=cfg.hop_length, win_length=cfg.win_length, window="hann", center=False,
        power=2.0, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max,
    )
    ref = np.log(ref.T + cfg.log_offset)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def _stream(audio: np.ndarray, sizes: list[int]) -> np.ndarray:
    s = StreamingLogMel(FrontEndConfig())
    out, i, k = [], 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        out.append(s.process(audio[i : i + n]))
        i, k = i + n, k + 1
    return np.concatenate(out)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=16000), min_size=1, max_size=8))
def test_streaming_equals_batch_for_any_chunking(speech_stream, sizes):
    audio = speech_stream[:40000]
    if sum(sizes) < 200:  # keep 1-sample chunkings from taking minutes
        audio = audio[:3000]
    batch = LogMel(FrontEndConfig())(audio)
    streamed = _stream(audio, sizes)
    assert streamed.shape == batch.shape
    assert np.abs(streamed - batch).max() <= 1e-4


@pytest.mark.parametrize("size", [1, 160, 400, 16000])
def test_streaming_equals_batch_at_edge_chunk_sizes(speech_stream, size):
    audio = speech_stream[:6000] if size == 1 else speech_stream
    assert np.abs(_stream(audio, [size]) - LogMel(FrontEndConfig())(audio)).max() <= 1e-4


def test_streaming_computes_only_new_frames(speech_stream):
    cfg = FrontEndConfig()
    s = StreamingLogMel(cfg)
    assert s.process(speech_stream[:399]).shape == (0, 40)
    assert s.process(speech_stream[399:400]).shape == (1, 40)
    assert s.process(speech_stream[400:1600]).shape == (7, 40)
    # The state is only the overlap: it never grows with the stream.
    s.process(speech_stream)
    assert len(s._pending) < cfg.win_length


def test_windows_are_one_second_and_emitted_every_hop(speech_stream):
    cfg = FrontEndConfig()
    assert cfg.window_frames == 98 and cfg.window_samples == 15920
    w = Windower(cfg, hop_frames=10)
    s = StreamingLogMel(cfg)
    windows = []
    for i in range(0, len(speech_stream), 320):
        windows += w.push(s.process(speech_stream[i : i + 320]))
    starts = [x.start for x in windows]
    assert starts[0] == 0 and np.all(np.diff(starts) == 1600)
    assert all(x.features.shape == (98, 40) and x.end - x.start == 15920 for x in windows)
    batch = list(iter_windows(speech_stream, cfg, hop_frames=10))
    assert len(batch) == len(windows)
    for a, b in zip(windows, batch, strict=True):
        assert a.start == b.start and np.array_equal(a.features, b.features)


@pytest.mark.parametrize("frames", [98, 99, 101])
def test_window_length_is_configurable(speech_stream, frames):
    cfg = FrontEndConfig(window_frames=frames)
    first = next(iter_windows(speech_stream, cfg))
    assert first.features.shape == (frames, 40)
    assert first.end == (frames - 1) * 160 + 400


def test_windower_restarts_at_a_gap():
    cfg = FrontEndConfig()
    w = Windower(cfg, hop_frames=10)
    frames = np.zeros((150, 40), np.float32)
    assert len(w.push(frames)) == 6
    w.reset(origin_sample=100_000)
    out = w.push(frames)
    assert out[0].start == 100_000


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_mels", 0), ("hop_ms", 50.0), ("f_max", 9000.0), ("window_ms", 25.03),
     ("mel_scale", "bark"), ("log_offset", 0.0), ("sample_rate", 8000)],
)
def test_bad_front_end_settings_name_their_key(field, value):
    with pytest.raises(ConfigError, match=rf"frontend\.{field}"):
        FrontEndConfig(**{field: value}).validate()
