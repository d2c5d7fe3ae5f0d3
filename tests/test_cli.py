"""The command line: devices, help, and one-line errors."""

import json
import subprocess
import sys

import pytest

from streamkws.cli import main

pytest_plugins = ["pulse"]


@pytest.mark.pulse
def test_devices_lists_the_pulseaudio_capture_device(pulse_server, capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "pulse" in out and "index" in out
    assert main(["devices", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)
    pulse = [d for d in devices if d["name"] == "pulse"]
    assert pulse and pulse[0]["channels"] >= 1 and pulse[0]["default_samplerate"] > 0


def test_devices_says_clearly_when_there_are_none(monkeypatch, capsys):
    import streamkws.audio.mic as mic

    monkeypatch.setattr(mic, "list_input_devices", lambda: [])
    assert main(["devices"]) == 0
    assert "no audio input devices found" in capsys.readouterr().out


def test_the_entry_point_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "streamkws", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "devices" in r.stdout

