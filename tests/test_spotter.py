"""``streamkws.spotter``: the daemon's pipeline inside a program, fed block by block."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from streamkws.audio.sources import DEMO_WAV
from streamkws.audio.wav import load_audio
from streamkws.errors import ConfigError, StreamKWSError
from streamkws.spotter import Hit, Spotter


@pytest.fixture(scope="module")
def demo() -> np.ndarray:
    """The bundled demo recording (real speech, ten keywords), as the WAV holds it."""
    x = load_audio(DEMO_WAV)
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def feed_in_pieces(spotter: Spotter, audio: np.ndarray, seed: int = 0) -> list[Hit]:
    rng = np.random.default_rng(seed)
    hits, i = [], 0
    while i < len(audio):
        n = int(rng.integers(1, 5000))
        hits += spotter.feed(audio[i : i + n])
        i += n
    return hits + spotter.flush()


def as_published(hits: list[Hit]) -> list[tuple]:
    return [(h.keyword, round(h.score, 4), round(h.t_start, 3), round(h.t_end, 3),
             round(h.t_emit, 3)) for h in hits]


def test_the_spotter_reports_what_the_daemon_publishes_however_the_audio_is_cut(demo):
    r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--source", "demo",
                        "--fast"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    published = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(published) >= 5
    daemon = [(m["keyword"], m["score"], m["t_start"], m["t_end"], m["t_emit"])
              for m in published]
    spotter = Spotter()
    assert as_published(feed_in_pieces(spotter, demo, seed=1)) == daemon
    spotter.reset()  # a new stream: times from 0 again, the same answer
    assert as_published(feed_in_pieces(spotter, demo, seed=2)) == daemon
    # Whole, and in 10-s blocks: the VAD keeps seconds, not minutes, of decisions, so a
    # long block must be taken in the daemon's steps.
    spotter.reset()
    assert as_published(spotter.feed(demo) + spotter.flush()) == daemon
    spotter.reset()
    tens = [h for i in range(0, len(demo), 160000) for h in spotter.feed(demo[i : i + 160000])]
    assert as_published(tens + spotter.flush()) == daemon


def test_a_word_at_the_very_end_is_heard_by_the_spotter_and_the_daemon_alike(demo, tmp_path):
    """The windows that confirm a word need audio after it; at the end of a stream both
    decide the last second as if silence followed."""
    from tests.conftest import write_wav

    cut = demo[: int(24.30 * 16000)]  # "go" ends at 24.27 s
    path = write_wav(tmp_path / "cut.wav", cut.astype(np.float32) / 32768.0)
    r = subprocess.run([sys.executable, "-m", "streamkws", "run", "--source", f"wav:{path}",
                        "--fast"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    daemon = [json.loads(line)["keyword"] for line in r.stdout.splitlines()]
    assert daemon[-1] == "go"
    spotter = Spotter()
    assert [h.keyword for h in spotter.feed(cut) + spotter.flush()] == daemon


def test_a_lone_one_second_clip_is_heard_once_flushed(speech_dir):
    clips = sorted((speech_dir / "yes").glob("*.wav"))[:5]
    heard = 0
    for clip in clips:
        spotter = Spotter()
        hits = spotter.feed(load_audio(clip)) + spotter.flush()
        heard += [h.keyword for h in hits] == ["yes"]
    assert heard >= 3


def test_flush_ends_the_stream_and_reset_starts_another(demo):
    for spotter in (Spotter(), Spotter(sample_rate=48000)):
        spotter.feed(np.zeros(8000, np.int16))
        spotter.flush()
        assert spotter.flush() == []  # twice, as a finally: block may
        with pytest.raises(StreamKWSError, match=r"ended with flush\(\); reset\(\) starts"):
            spotter.feed(np.zeros(10, np.int16))
        spotter.reset()
        assert spotter.feed(np.zeros(10, np.int16)) == []


def test_float_int16_and_stereo_blocks_are_heard_alike(demo):
    ints = as_published(feed_in_pieces(Spotter(), demo))
    floats = demo.astype(np.float32) / 32768.0
    assert as_published(feed_in_pieces(Spotter(), floats)) == ints
    stereo = np.stack([floats, floats], axis=1)
    assert as_published(feed_in_pieces(Spotter(), stereo)) == ints


def test_audio_at_another_rate_is_resampled_as_a_microphones_is(demo):
    import soxr

    ints = feed_in_pieces(Spotter(), demo)
    at_48k = soxr.resample(demo.astype(np.float32) / 32768.0, 16000, 48000)
    hits = feed_in_pieces(Spotter(sample_rate=48000), at_48k)
    assert [h.keyword for h in hits] == [h.keyword for h in ints]
    assert all(abs(a.t_start - b.t_start) <= 0.05 and abs(a.t_emit - b.t_emit) <= 0.05
               for a, b in zip(hits, ints, strict=True))


def test_a_config_sets_model_and_thresholds_and_a_bad_one_names_its_key(demo, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text("[detect]\nthreshold = 0.97\n[audio]\nsource = \"wav:nowhere.wav\"\n")
    spotter = Spotter(config=strict)  # [audio] is the daemon's: never opened here
    assert spotter.threshold == 0.97
    hits = feed_in_pieces(spotter, demo)
    assert hits and all(h.score >= 0.97 for h in hits)
    assert len(hits) < len(feed_in_pieces(Spotter(), demo))
    assert Spotter(model="default-float").bundle.name == "default-float"
    assert "_silence_" not in spotter.keywords and "yes" in spotter.keywords
    strict.write_text("[detect]\nthreshhold = 0.97\n")
    with pytest.raises(ConfigError, match="detect.threshhold"):
        Spotter(config=strict)


@pytest.mark.parametrize(("audio", "message"), [
    (np.zeros(100, np.int32), "must be int16, or float in \\[-1, 1\\]; got int32"),
    (np.zeros((2, 2, 2), np.float32), "one channel, or \\(frames, channels\\)"),
    (np.zeros((10, 0), np.float32), "one channel, or \\(frames, channels\\)"),
    (np.zeros((2, 16000), np.float32), "for \\(channels, frames\\), pass its transpose"),
])
def test_audio_of_a_kind_it_cannot_read_is_refused_saying_what_it_takes(audio, message):
    with pytest.raises(StreamKWSError, match=message):
        Spotter().feed(audio)


def test_a_numpy_integer_is_a_sample_rate():
    assert Spotter(sample_rate=np.int64(16000)).sample_rate == 16000


@pytest.mark.parametrize("rate", [0, 16000.0, True, 10**6])
def test_a_sample_rate_that_is_no_rate_is_refused(rate):
    with pytest.raises(StreamKWSError, match="sample_rate must be a whole number of Hz"):
        Spotter(sample_rate=rate)


def test_non_finite_samples_are_silence_said_once(caplog):
    spotter = Spotter()
    block = np.full(1600, np.nan, np.float32)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert spotter.feed(block) == []
    assert caplog.text.count("NaN or infinite samples replaced by silence") == 1


def test_floats_on_the_int16_scale_are_said_to_be_out_of_range(demo, caplog):
    with caplog.at_level("WARNING"):
        Spotter().feed(demo[:16000].astype(np.float32))
    assert "floats must be within [-1, 1]" in caplog.text and "divide by 32768" in caplog.text


def test_every_window_is_offered_with_its_scores_for_a_programs_own_logic(demo):
    """openWakeWord's users score frames themselves: each feed leaves the windows it
    decided, one hop apart, with the model's posteriors, or None where the VAD heard no
    speech and the model did not run."""
    spotter = Spotter()
    windows, hits = [], []
    for i in range(0, len(demo), 8000):
        hits += spotter.feed(demo[i : i + 8000])
        windows += spotter.windows
    hits += spotter.flush()
    windows += spotter.windows
    starts = np.array([w.t_start for w in windows])
    assert starts[0] == 0.0 and np.allclose(np.diff(starts), 0.1)
    assert all(w.t_end - w.t_start == pytest.approx(1.0, abs=0.02) for w in windows)
    scored = [w for w in windows if w.scores is not None]
    assert 0 < len(scored) < len(windows)  # silence costs no inference
    assert all(sum(w.scores.values()) == pytest.approx(1.0, abs=1e-3) for w in scored)
    assert set(scored[0].scores) == set(spotter.bundle.labels)
    n = spotter.config.detect.average_windows
    for hit in hits:  # the windows that decided it average above the threshold (the score
        # is the best such average of the utterance so far)
        end = next(i for i, w in enumerate(windows) if w.t_end == pytest.approx(hit.t_emit))
        last = windows[end - n + 1 : end + 1]
        assert all(w.scores is not None for w in last)
        mean = float(np.mean([w.scores[hit.keyword] for w in last]))
        assert spotter.threshold <= mean <= hit.score + 1e-6


def test_thresholds_given_as_arguments_replace_the_configs_and_are_named_as_given(demo):
    strict = Spotter(threshold=0.97)
    assert strict.threshold == 0.97
    assert all(h.score >= 0.97 for h in feed_in_pieces(strict, demo))
    mine = Spotter(thresholds={"yes": 0.999})  # yes alone made strict
    heard = [h.keyword for h in feed_in_pieces(mine, demo)]
    assert "yes" not in heard and "no" in heard
    for kwargs, message in ((dict(threshold=1.5), "threshold: must be within (0, 1]"),
                            (dict(thresholds={"yes": 0}), "thresholds['yes']: must be within"),
                            (dict(thresholds={"marvin": 0.5}),
                             "thresholds['marvin']: the model has no keyword 'marvin'")):
        with pytest.raises(StreamKWSError) as caught:
            Spotter(**kwargs)
        assert str(caught.value).startswith(message)


RACE = r"""
import collections, json, sys, threading, time
import numpy as np
from streamkws.spotter import Spotter

spotter = Spotter(sample_rate=48000)
block = (np.random.default_rng(0).standard_normal(960) * 0.3).astype(np.float32)
errors, stop = collections.Counter(), threading.Event()

def feeder():
    while not stop.is_set():
        try:
            spotter.feed(block)
        except Exception as exc:
            errors[str(exc)] += 1

thread = threading.Thread(target=feeder)
thread.start()
t0 = time.monotonic()
while time.monotonic() - t0 < 3:
    spotter.flush()
    spotter.reset()
    time.sleep(0.005)
stop.set()
thread.join()
print(json.dumps(dict(errors)))
"""


def test_feeding_on_one_thread_while_another_flushes_and_resets_is_safe():
    """soxr's resampler runs without the GIL: unserialised, this crashed the process."""
    r = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(errors) <= {"the stream ended with flush(); reset() starts another"}


def test_its_counters_are_the_daemons_for_the_same_audio(demo, tmp_path):
    """``stats`` says what the VAD saved, as the daemon's status does."""
    from streamkws.config import Config
    from streamkws.daemon import Daemon, Overrides, apply_overrides

    cfg = apply_overrides(Config().validate(), Overrides(
        source="demo", realtime=False, publish=f"ipc://{tmp_path}/pub.sock"))
    daemon = Daemon(cfg, echo=None)
    daemon._restore_signals()
    assert daemon.run() == 0
    published = daemon.counters()
    spotter = Spotter()
    fresh = spotter.stats
    assert (fresh.audio_seconds, fresh.windows, fresh.inferences) == (0, 0, 0)
    assert fresh.inference_ms_p50 is None
    feed_in_pieces(spotter, demo, seed=3)
    s = spotter.stats
    assert s.audio_seconds == pytest.approx(len(demo) / 16000)
    assert s.audio_seconds == pytest.approx(published["audio_seconds"], abs=1e-3)
    assert s.inferences == published["inferences"]
    assert s.vad_active_ratio == pytest.approx(published["vad_active_ratio"], abs=1e-4)
    # Ten windows a second, most of them shut by the VAD between words.
    assert abs(s.windows - 10 * s.audio_seconds) <= 10 and s.inferences < 0.8 * s.windows
    assert s.inference_ms_p50 > 0 and s.inference_ms_p99 >= s.inference_ms_p50
    spotter.reset()
    assert spotter.stats.inferences == 0
