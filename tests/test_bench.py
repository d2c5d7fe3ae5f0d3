"""``streamkws bench``: the whole daemon's cost on real audio, and the peer harness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamkws.cli import main
from streamkws.tools import bench


def test_bench_measures_the_daemon_with_and_without_the_vad_on_speech_and_silence(data_dir,
                                                                                   tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "streamkws", "bench", "--data", str(data_dir), "--minutes", "1",
         "--repeats", "1", "--idle-seconds", "0", "--peer", "off", "--json",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"] == "default"  # what was measured is named
    rows = {(x["audio"], x["vad"]): x for x in report["results"]}
    assert set(rows) == {("speech", "off"), ("speech", "config"), ("silence", "config"),
                         ("silence", "off")}
    for x in rows.values():
        assert x["audio_seconds"] >= 60 and x["dropped_windows"] == 0
        assert 0 < x["cpu_per_audio_second"] < 1
        assert 50 < x["peak_rss_mb"] < 2000
    # The gate is what makes silence cheap: the model never runs there.
    assert rows[("silence", "config")]["inferences"] == 0
    assert rows[("silence", "off")]["inferences"] > 500
    assert (rows[("silence", "config")]["cpu_per_audio_second"]
            < 0.5 * rows[("silence", "off")]["cpu_per_audio_second"])
    assert rows[("speech", "off")]["inference_ms_p50"] > 0
    assert "silence_core_percent" in report["verdict"]


def test_peer_harness_measures_an_openwakeword_model_on_the_same_audio(data_dir, tmp_path,
                                                                       monkeypatch):
    """The comparison code runs in CI against a stand-in with openWakeWord's interface
    (the real package is an optional install): frames of 1280 samples, one predict each."""
    fake = tmp_path / "fake" / "openwakeword"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model.py").write_text(
        "import time\n"
        "class Model:\n"
        "    def __init__(self, wakeword_models, inference_framework):\n"
        "        assert inference_framework == 'onnx'\n"
        "        self.name = wakeword_models[0]\n"
        "    def predict(self, frame):\n"
        "        assert len(frame) == 1280 and frame.dtype.str == '<i2'\n"
        "        t = time.process_time()\n"
        "        while time.process_time() - t < 0.002: pass\n"
        "        return {self.name: 0.0}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake"))
    silence = bench.build_silence(data_dir / "noise", tmp_path / "s.wav", 1)
    out = bench.run_peer(sys.executable, silence, "hey_test")
    assert out["inferences"] == 60 * 16000 // 1280
    # 2 ms of CPU per 80-ms frame is 2.5 % of a core.
    assert 0.02 < out["cpu_per_audio_second"] < 0.04
    assert out["inference_ms_p50"] >= 2.0 and out["peak_rss_mb"] > 10


def test_verdict_compares_medians_with_the_issue_targets():
    rows = [
        {"system": "streamkws", "audio": "speech", "vad": "off", "cpu_per_audio_second": 0.02},
        {"system": "streamkws", "audio": "speech", "vad": "config", "cpu_per_audio_second": 0.01},
        {"system": "streamkws", "audio": "silence", "vad": "config",
         "cpu_per_audio_second": 0.004},
        {"system": "openWakeWord (x)", "audio": "speech", "vad": "none",
         "cpu_per_audio_second": 0.025},
    ]
    v = bench.verdict(rows, None)
    assert v["ratio_vad_on_to_peer"] == 0.4 and v["at_most_half_of_peer"]
    assert v["silence_core_percent"] == 0.4 and not v["silence_within_0.3_percent"]


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "nan"], "--minutes must be a finite number, 1 or more (got nan)"),
    (["--minutes", "inf"], "--minutes must be a finite number, 1 or more (got inf)"),
    (["--minutes", "0.5"], "--minutes must be a finite number, 1 or more (got 0.5)"),
    (["--repeats", "0"], "--repeats must be 1 or more (got 0)"),
    (["--idle-seconds", "-5"], "--idle-seconds must be a finite number, 0 (skip) or more"),
    (["--idle-seconds", "nan"], "--idle-seconds must be a finite number, 0 (skip) or more"),
    (["--idle-seconds", "inf"], "--idle-seconds must be a finite number, 0 (skip) or more"),
])
def test_bench_refuses_a_length_or_count_it_cannot_run_as_one_line(flags, message, tmp_path,
                                                                   capsys):
    """NaN minutes ended in a ValueError traceback, inf in an OverflowError, and negative
    idle seconds were taken silently."""
    assert main(["bench", "--data", str(tmp_path), "--peer", "off", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bench_help_says_how_short_a_recording_may_be(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    # argparse wraps help; the option's own text runs up to the next option.
    minutes = " ".join(out.split("\n  --minutes", 1)[1].split("\n  --", 1)[0].split())
    assert "1 or more" in minutes, minutes
