"""A short soak in CI (the 2-hour one is ``python -m streamkws.tools.soak``): real speech
looped through ``streamkws run --source -``, memory sampled, every counter reconciled."""

from __future__ import annotations

from streamkws.audio.sources import DEMO_WAV
from streamkws.tools.soak import analyse, soak


def test_ten_minutes_of_looped_speech_leave_memory_flat_and_every_counter_consistent():
    r = soak(DEMO_WAV, hours=10 / 60, warmup_minutes=2, progress=False)
    assert all(r["checks"].values()), (r["checks"], r["stderr_tail"])
    assert r["final_status"]["audio_seconds"] == 600.0
    assert r["final_status"]["detections"] >= 200  # 25 passes over the demo's keywords
    assert r["rss_growth_mb"] is not None and r["rss_growth_mb"] <= 5.0


def test_the_soak_checks_catch_lost_audio_and_missing_messages():
    msgs = [{"type": "status", "seq": 0, "audio_seconds": 0.0},
            {"type": "detection", "seq": 2},
            {"type": "status", "seq": 3, "final": True, "audio_seconds": 9.5,
             "dropped_windows": 0, "overruns": 0, "detections": 2}]
    r = analyse(msgs, [(0.0, 100.0), (5.0, 100.5)], fed_bytes=10 * 32000, warmup_minutes=0,
                returncode=0, stderr="")
    assert not r["checks"]["audio_seconds_equal_fed"]
    assert not r["checks"]["seq_without_gaps"]
    assert not r["checks"]["detections_received_equal_counted"]
    assert r["checks"]["clean_exit"]


def test_a_config_that_makes_stdin_live_is_soaked_with_stdin_replayed(tmp_path, monkeypatch,
                                                                      caplog):
    """The README pairs ``arecord | run --source -`` with ``audio.stdin_live``; a device set
    up that way must still be soakable (fed at full speed, live stdin would drop audio)."""
    import logging

    conf = tmp_path / "streamkws.toml"
    conf.write_text("[audio]\nstdin_live = true\n")
    monkeypatch.setenv("STREAMKWS_CONFIG", str(conf))
    caplog.set_level(logging.INFO, logger="streamkws.tools.soak")
    r = soak(DEMO_WAV, hours=1 / 60, warmup_minutes=0.2, progress=False)
    assert all(r["checks"].values()), (r["checks"], r["stderr_tail"])
    assert r["final_status"]["audio_seconds"] == 60.0
    assert "replays stdin in full" in caplog.text
