"""End to end: `streamkws run` as a subprocess on replayed real speech, checked over ZeroMQ.

The streams are built from speakers the default model never trained on (its validation
split): keywords at known times, shuffled with other words, over real noise recordings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from streamkws.tools.streams import heldout_stream, score
from tests.e2e import Subscriber, free_port

pytest_plugins = ["pulse"]


def run_daemon(source: str, endpoint: str, *extra: str, model: str = "default"
               ) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamkws", "run", "--source", source, "--publish", endpoint,
         "--model", model, "--quiet", "--wait-subscribers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def fast_replay(wav, model: str, timeout: float = 240) -> Subscriber:
    """``streamkws run --fast`` on ``wav``: what it published, as one subscriber heard it."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, timeout=timeout)
    sub.start()
    proc = run_daemon(f"wav:{wav}", endpoint, "--fast", model=model)
    sub.join(timeout + 10)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return sub


@pytest.fixture(scope="module")
def replay(request, data_dir, tmp_path_factory):
    """One fast replay of a ~5-minute held-out stream per bundled model (``request.param``),
    shared by the checks below."""
    wav, truth = heldout_stream(data_dir, tmp_path_factory.mktemp("e2e") / "stream.wav",
                                n_per_keyword=3, n_unknown=45)
    sub = fast_replay(wav, request.param)
    sub.audio_seconds = os.path.getsize(wav) / 32000 - 44 / 32000  # 16-bit mono PCM
    return sub, truth, score(sub.detections(), truth, duration_s=sub.audio_seconds)


# The bundled models, each replayed once. The criteria below are what the issue asks; a
# model that does not meet one is marked as a shortfall there. Measured on this stream:
# `default` at its calibrated threshold 0.90 finds 0.50 with no false detection in 4.0 min
# (on six other held-out streams 0.66 with 0.22 false alarms per 5 min); `accurate` at its
# 0.72 finds 0.77 with none (0.83 and none on those six). `default` misses all three "off"s
# here, `accurate` two.
# strict=True: the day a model meets a criterion, its case turns red until the marker is
# removed, so a shortfall can be neither forgotten nor silently passed.
MODEL_SHORTFALL = pytest.mark.xfail(
    strict=True,
    reason="model not yet good enough on unknown-word-dense held-out streams",
)
MODELS = ("default", "accurate")


def models(*, short_of: tuple[str, ...] = ()) -> pytest.MarkDecorator:
    """Run a check on each bundled model's replay; ``short_of``: the models that fail it."""
    return pytest.mark.parametrize(
        "replay", [pytest.param(m, marks=MODEL_SHORTFALL) if m in short_of else m
                   for m in MODELS], indirect=True)


@models(short_of=("default", "accurate"))
def test_recall_on_held_out_speakers_is_at_least_90_percent(replay):
    _, _, s = replay
    missed = [(p.word, round(p.start, 2)) for p in s["missed"]]
    assert s["recall"] >= 0.90, f"recall {s['recall']:.2f}, missed {missed}"


@models()
def test_one_utterance_gives_one_detection(replay):
    assert replay[2]["duplicates"] == 0


@models()
def test_at_most_one_false_detection_per_five_minutes_of_other_audio(replay):
    s = replay[2]
    allowed = s["non_keyword_minutes"] / 5.0
    false = [(d["keyword"], d["t_start"], d["score"]) for d in s["false"]]
    assert len(s["false"]) <= max(1.0, allowed), f"{false} in {s['non_keyword_minutes']:.1f} min"


@models()
def test_every_detection_locates_its_utterance(replay):
    _, truth, s = replay
    # score() counts a detection as a hit only if [t_start, t_end] overlaps the truth.
    for d in replay[0].detections():
        assert d["t_start"] < d["t_end"] <= d["t_emit"] + 1e-6
    assert s["hits"] + len(s["false"]) + s["duplicates"] == len(replay[0].detections())


@models()
def test_seq_has_no_gaps_and_the_stream_ends_with_a_final_status(replay):
    sub, truth, _ = replay
    seqs = [m["seq"] for _, m, _ in sub.messages]
    assert seqs == list(range(len(seqs))) and seqs[0] == 0
    last = sub.messages[-1][1]
    assert last["type"] == "status" and last["final"] is True
    # Every sample of the file was processed: audio time equals the input length.
    assert last["audio_seconds"] == pytest.approx(sub.audio_seconds, abs=0.01)
    assert last["dropped_windows"] == 0 and last["overruns"] == 0
    assert last["detections"] == len(sub.detections())


@pytest.mark.pulse
@pytest.mark.parametrize("model", MODELS)
def test_realtime_microphone_path_hears_the_keywords(pulse_server, data_dir, tmp_path, model):
    """Real capture: the stream is played into PulseAudio's null sink and the daemon
    listens on its monitor through PortAudio, paced by the sound server's clock."""
    wav, truth = heldout_stream(data_dir, tmp_path / "mic.wav", n_per_keyword=1, n_unknown=3,
                                seed=5)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, timeout=120)
    sub.start()
    proc = run_daemon(f"mic:{pulse_server.device}", endpoint, model=model)
    time.sleep(0.5)
    deadline = time.monotonic() + 20
    while not sub.messages and time.monotonic() < deadline:  # the daemon is listening
        time.sleep(0.1)
    player = pulse_server.play(wav)
    player.wait(timeout=120)
    time.sleep(1.5)  # let the last word's windows through
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    sub.join(10)
    assert proc.returncode == 0, err
    heard = {d["keyword"] for d in sub.detections()}
    expected = {p.word for p in truth if p.word in {"yes", "no", "up", "down", "left", "right",
                                                     "on", "off", "stop", "go"}}
    # What the model makes of this audio, from the file, deterministically: most keywords.
    from_file = {d["keyword"] for d in fast_replay(wav, model, timeout=60).detections()}
    assert len(from_file & expected) >= 0.8 * len(expected), (sorted(from_file),
                                                              sorted(expected))
    # The microphone path delivers that audio: it hears what the file replay heard. Capture
    # starts at an arbitrary point, so windows fall elsewhere on the words, and a word that
    # sits on the threshold may go either way: one such word may differ, not more.
    assert len((from_file & expected) - heard) <= 1, (sorted(heard), sorted(from_file))
    assert sub.messages[-1][1].get("final") is True
    assert os.environ.get("PULSE_SERVER")
