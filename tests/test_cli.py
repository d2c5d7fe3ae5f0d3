"""The command line: devices, help, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from streamkws.cli import main
from streamkws.errors import StreamKWSError, TemporaryError, exit_status

pytest_plugins = ["pulse"]


@pytest.mark.pulse
def test_devices_lists_the_pulseaudio_capture_device(pulse_server, capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "pulse" in out and "index" in out
    assert main(["devices", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
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



# -- where results go -------------------------------------------------------------------------

def test_no_tool_writes_its_result_over_its_own_input(tmp_path, capsys):
    import shutil

    from streamkws.bundle import load_bundle

    model = tmp_path / "m.skw"
    shutil.copy(load_bundle("default-float").path, model)
    before = model.read_bytes()
    for argv in (["export", "--model", str(model), "--format", "onnx", "--out", str(model)],
                 ["prune", "--model", str(model), "--sparsity", "0.5", "--out", str(model)],
                 ["quantize", "--model", str(model), "--mode", "dynamic", "--out", str(model)],
                 ["ensemble", "--model", str(model), "--warp", "0.1:3", "--out", str(model)],
                 ["train", "--data", str(tmp_path), "--teacher", str(model),
                  "--out", str(model)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "would overwrite an input" in err, argv
    assert model.read_bytes() == before


@pytest.mark.parametrize("out", ["folder", "/proc/no/such.skw"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, out):
    (tmp_path / "folder").mkdir()
    target = str(tmp_path / out) if out == "folder" else out
    for argv in (["quantize", "--model", "default-float", "--mode", "dynamic", "--out", target],
                 ["prune", "--model", "default-float", "--sparsity", "0.5", "--out", target],
                 ["train", "--data", str(tmp_path), "--out", target]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--out" in err and "Traceback" not in err, argv


def test_predict_gives_every_clip_its_own_picture_even_when_names_repeat(tmp_path, speech_dir):
    import shutil

    from tests.conftest import clip_paths

    for label in ("yes", "no"):
        (tmp_path / "clips" / label).mkdir(parents=True)
        shutil.copy(clip_paths(speech_dir, label, 1)[0], tmp_path / "clips" / label / "a.wav")
    assert main(["predict", str(tmp_path / "clips"), "--plot", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["no_a.png", "yes_a.png"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--format", "onnx", "--no-mobile"],
     "--no-mobile applies to --format torchscript, not onnx"),
    (["--format", "torchscript", "--opset", "18"],
     "--opset applies to --format onnx, not torchscript"),
])
def test_an_export_option_of_the_other_format_is_refused_not_ignored(tmp_path, capsys,
                                                                     argv, message):
    out = tmp_path / "m.bin"
    assert main(["export", "--model", "default-float", *argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"streamkws export: error: {message}"
    assert not out.exists()


@pytest.mark.parametrize(("opset", "why"), [("3", "writes opset 18 or later"),
                                            ("999", "knows opsets up to")])
def test_an_onnx_opset_the_exporter_cannot_write_is_an_error_not_a_silent_other_one(
        tmp_path, capfd, opset, why):
    pytest.importorskip("onnx")
    assert main(["export", "--model", "default-float", "--format", "onnx", "--opset", opset,
                 "--out", str(tmp_path / "m.onnx")]) == 2
    err = capfd.readouterr().err.strip().splitlines()  # capfd: the exporter's own output too
    assert len(err) == 1 and f"--opset {opset}" in err[0] and why in err[0], err
    assert not (tmp_path / "m.onnx").exists()


def test_audit_data_lists_at_least_one_clip(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["audit-data", "--data", str(tmp_path), "--top", "-2"])
    assert exc.value.code == 2


@pytest.mark.parametrize(("argv", "line"), [
    (["listen", "--count", "0"], "streamkws listen: error: argument --count: must be at least "
                                 "1 (got 0) (see 'streamkws listen --help')"),
    (["trian"], "streamkws: error: argument COMMAND: invalid choice: 'trian'"),
    (["run", "--fats"], "streamkws run: error: unrecognized arguments: --fats "
                        "(see 'streamkws run --help')"),
])
def test_a_command_line_argparse_refuses_is_one_line_too(capsys, argv, line):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err


def test_audit_data_refuses_a_folder_without_readable_clips_as_evaluate_does(tmp_path,
                                                                            capsys):
    """'0 clips' and exit 0 read as a data set with nothing wrong in it."""
    (tmp_path / "yes").mkdir()
    (tmp_path / "yes" / "a.wav").write_text("not audio\n")
    for command in ("evaluate", "audit-data"):
        assert main([command, "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"streamkws {command}: error: {tmp_path}: no readable clips" in err, err


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--sweep", "--data", ".", "--mode", "static"], "--mode do(es) not apply"),
    (["quantize", "--sweep", "--data", ".", "--calib-clips", "0"], "--calib-clips must be"),
    (["quantize", "--out-solution", "s.yaml", "--out", "x.skw"], "--out-solution go(es) with"),
    (["prune", "--margin", "0.1", "--out", "x.skw"], "--margin applies to --method structured"),
    (["prune", "--method", "structured", "--sparsity", "0.3", "--out", "x.skw"],
     "--sparsity applies to --method magnitude"),
])
def test_an_option_the_chosen_method_ignores_is_refused_not_dropped(argv, message, capsys,
                                                                    tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.skw").exists()


def test_predict_says_a_file_without_audio_has_none(tmp_path, capsys):
    from tests.conftest import write_wav

    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    assert main(["predict", str(tmp_path / "empty.wav")]) == 2
    assert "holds no audio" in capsys.readouterr().err


def test_listen_warns_when_the_publishers_host_cannot_be_resolved(caplog):
    from streamkws.listen import listen

    assert listen("tcp://nohost.invalid:5556", [], None, None, timeout=0.2) == 1
    assert "cannot resolve host 'nohost.invalid'" in caplog.text


def test_a_class_with_nothing_to_measure_has_no_recall_rather_than_zero():
    from streamkws.tools.evaluate import format_report, metrics_from_predictions

    labels = ["yes", "no", "_unknown_"]
    y = np.array([0, 0, 0, 2, 2])
    pred = np.array([0, 0, 2, 2, 0])
    m = metrics_from_predictions(y, pred, labels)
    assert m["per_class"]["no"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["per_class"]["yes"]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["per_class"]["yes"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["per_class"]["_unknown_"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5,
                                           "support": 2}
    assert m["accuracy"] == pytest.approx(0.6)
    # Never predicted though it has clips: no precision, but recall and F1 are 0.
    never = metrics_from_predictions(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 1]), labels)
    assert never["per_class"]["yes"] == {"precision": None, "recall": 0.0, "f1": 0.0,
                                         "support": 2}
    assert never["per_class"]["no"]["precision"] == 0.5
    # Predicted though it has no clips: precision and F1 are 0.
    wrong = metrics_from_predictions(np.array([0, 0]), np.array([1, 0]), labels)
    assert wrong["per_class"]["no"] == {"precision": 0.0, "recall": None, "f1": 0.0,
                                        "support": 0}
    row = next(line for line in format_report(m).splitlines() if line.startswith("no "))
    assert row.split() == ["no", "-", "-", "-", "0"]
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(("make", "what"), [
    (lambda p: p.write_text("hello\n"), "a text file"),
    (lambda p: p.write_bytes(b""), "an empty file"),
    (lambda p: p.write_bytes(b"RIFF" + bytes(100)), "a WAV file"),
    (lambda p: __import__("torch").save({"net": __import__("torch").nn.Linear(2, 2)}, p),
     "a torch or zip file without a bundle's contents"),
    (lambda p: p.write_bytes(__import__("streamkws.bundle").bundle.load_bundle(
        "default-float").path.read_bytes()[:5000]),
     "a damaged or truncated zip file (a bundle cut short?)"),
    (lambda p: p.write_bytes(__import__("pickle").dumps({"a": 1})),
     "a Python pickle, not a bundle"),
    (lambda p: p.write_bytes(b"\xff\xfe" + bytes(range(256)) * 4), "unknown binary data"),
])
def test_a_file_that_is_not_a_bundle_is_named_as_what_it_is(tmp_path, capsys, make, what):
    """Never torch's own text: a pickled module would get advice to load it unsafely."""
    import warnings

    bad = tmp_path / "bad.skw"
    make(bad)
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        assert main(["run", "--model", str(bad), "--source", "demo", "--fast"]) == 2
    assert not printed  # a warning torch prints would be a second and third line
    err = capsys.readouterr().err.strip()
    assert err == f"streamkws run: error: {bad}: not a streamkws model bundle ({what})"


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--data", "{file}", "--out", "{tmp}/m.skw"], "{file}: is a file, not a data folder"),
    (["train", "--data", "{tmp}/none", "--out", "{tmp}/m.skw"],
     "{tmp}/none: data folder not found"),
    (["listen", "--server-key", "{tmp}"], "--server-key {tmp}: is a folder; give the key file"),
    (["run", "--source", "wav:"], "wav: needs a file's path, e.g. wav:meeting.wav"),
])
def test_a_file_where_a_folder_belongs_and_back_is_named_for_what_it_is(tmp_path, capsys,
                                                                        argv, message):
    err, expected = _refused(tmp_path, capsys, argv, message)
    assert err.endswith(f"error: {expected}"), err


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--minutes", "1", "--workdir", "{file}"], "--workdir {file}: is a file, not a "
                                                         "folder"),
    (["bench", "--minutes", "1", "--workdir", "/proc/streamkws/x"],
     "--workdir /proc/streamkws/x: cannot create it"),
    (["bench", "--minutes", "1", "--peer", "on", "--peer-python", "{tmp}/nopython"],
     "--peer-python {tmp}/nopython: cannot run it"),
    (["quantize", "--sweep", "--data", "{tmp}", "--out-solution", "/proc/streamkws/s.yaml"],
     "--out-solution /proc/streamkws/s.yaml: cannot create /proc/streamkws"),
])
def test_a_place_that_cannot_be_written_or_run_is_named_with_its_option(tmp_path, capsys,
                                                                        argv, message):
    err, expected = _refused(tmp_path, capsys, argv, message)
    assert len(err.splitlines()) == 1 and expected in err, err


def _refused(tmp_path, capsys, argv: list[str], message: str) -> tuple[str, str]:
    """Run ``argv`` with {file} (a text file) and {tmp} filled in; it must exit 2. Returns
    what it printed on stderr and ``message`` filled in the same way."""
    (tmp_path / "a.txt").write_text("x")
    fill = {"file": str(tmp_path / "a.txt"), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    return capsys.readouterr().err.strip(), message.format(**fill)


def test_run_check_says_what_would_run_without_listening(tmp_path, capsys, monkeypatch):
    """An admin checks a config before `systemctl reload`, which cannot report a rejection;
    the running daemon holds the endpoint and the device, so neither is touched."""
    from streamkws.audio.base import ThreadedSource
    from streamkws.audio.mic import MicSource
    from streamkws.publish import Publisher, generate_keys

    def untouchable(*_a, **_k):
        raise AssertionError("--check must not bind a socket or start a source")

    monkeypatch.setattr(Publisher, "__init__", untouchable)
    monkeypatch.setattr(ThreadedSource, "start", untouchable)  # files, stdin
    monkeypatch.setattr(MicSource, "start", untouchable)

    _, secret = generate_keys(tmp_path / "keys", "server")
    cfg = tmp_path / "streamkws.toml"
    cfg.write_text('[audio]\nsource = "demo"\n[publish]\nendpoint = "tcp://127.0.0.1:5599"\n'
                   'curve_secret_key = "keys/server.key_secret"\n')
    assert main(["run", "--config", str(cfg), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cfg}: OK: model default (")
    assert out.rstrip().endswith("; source demo; publishing on tcp://127.0.0.1:5599 with CURVE")

    secret.write_text(secret.read_text().replace('secret-key = "', 'secret-key = "0'))
    assert main(["run", "--config", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamkws run: error: publish.curve_secret_key: ")
    assert "does not hold a valid CURVE key" in err

    # stdin: whether it is taken live (windows skipped when behind) or replayed in full.
    cfg.write_text("[audio]\nsource = \"-\"\nstdin_live = true\n")
    assert main(["run", "--config", str(cfg), "--check"]) == 0
    assert "; source stdin (live); " in capsys.readouterr().out
    assert main(["run", "--source", "-", "--check"]) == 0
    assert "; source stdin (replayed in full); " in capsys.readouterr().out


@pytest.mark.pulse
def test_run_check_names_the_microphone_it_would_open_or_says_it_is_not_there(
        pulse_server, capsys, monkeypatch):
    """Looked up, never opened: the running daemon may hold it."""
    from streamkws.audio.mic import MicSource

    def untouchable(*_a, **_k):
        raise AssertionError("--check must not open the device")

    monkeypatch.setattr(MicSource, "start", untouchable)
    assert main(["run", "--check", "--source", "mic:pulse"]) == 0
    out = capsys.readouterr().out
    assert "; source mic:pulse ([" in out and "] pulse (ALSA, " in out
    assert main(["run", "--check", "--source", "mic:no-such-card"]) == 0
    out = capsys.readouterr().out
    assert ("; source mic:no-such-card (not listed by PortAudio now: no audio input device "
            "matches 'no-such-card'") in out and "; run would wait for it); publishing on" in out


def test_thresholds_calibrated_for_another_model_are_warned_about(tmp_path, capsys, caplog):
    """A bundle retrained or replaced under the same path kept its old thresholds, silently."""
    from streamkws.bundle import load_bundle

    sha = load_bundle("default").sha256
    cfg = tmp_path / "mine.toml"
    for meant, warned in ((sha[:12], False), (sha, False), ("0" * 12, True)):
        cfg.write_text(f'[audio]\nsource = "demo"\n[detect]\ncalibrated_for = "{meant}"\n')
        caplog.clear()
        assert main(["run", "--config", str(cfg), "--check"]) == 0
        said = ("the thresholds were calibrated for model 000000000000 "
                f"(detect.calibrated_for), but default is default ({sha[:12]})")
        assert (said in caplog.text) == warned, caplog.text
    cfg.write_text('[detect]\ncalibrated_for = "default"\n')
    assert main(["run", "--config", str(cfg), "--check"]) == 2
    assert "config key 'detect.calibrated_for': must be a model's sha256" in capsys.readouterr().err


def test_run_check_refuses_what_start_up_would(tmp_path, capsys):
    cfg = tmp_path / "streamkws.toml"
    cfg.write_text('[model]\nname = "missing.skw"\n')
    assert main(["run", "--config", str(cfg), "--check"]) == 2
    assert capsys.readouterr().err.startswith(
        "streamkws run: error: config key 'model.name': ")
    cfg.write_text('[audio]\nsource = "wav:none.wav"\n')
    assert main(["run", "--config", str(cfg), "--check"]) == 2
    assert "config key 'audio.source'" in capsys.readouterr().err


def test_a_bad_config_fails_before_torch_is_imported(tmp_path):
    """A service with a config error fails at once, not after a second of importing torch
    on every try (and the unit then leaves it failed: RestartPreventExitStatus=2)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[bogus]\nx = 1\n")
    code = ("import sys; from streamkws.cli import main; "
            f"rc = main(['run', '--config', {str(bad)!r}]); "
            "print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert proc.stderr.strip() == "streamkws run: error: config key 'bogus': unknown key"


def test_a_bad_value_typed_on_the_command_line_is_named_by_its_option(capsys):
    """The user just typed --publish; "config key 'publish.endpoint'" would send them
    looking through config files."""
    assert main(["run", "--publish", "tcp://127.0.0.1:99999", "--check"]) == 2
    assert capsys.readouterr().err.strip() == (
        "streamkws run: error: --publish: the port must be 0-65535 or * "
        "(got 'tcp://127.0.0.1:99999')")


@pytest.mark.parametrize("error, status", [
    (StreamKWSError("bad input"), 2),
    (TemporaryError("port still held"), 75),
])
def test_a_tool_run_outside_the_command_exits_as_the_command_would(capsys, error, status):
    def fail(_arg: None) -> int:
        raise error

    assert exit_status("tool", fail, None) == status
    assert capsys.readouterr().err == f"tool: error: {error}\n"


def test_ctrl_c_before_the_command_runs_is_exit_130_without_a_traceback():
    """Building the parser imports the commands' modules: Ctrl-C there came before main's
    own handling and printed a traceback. (In a child: an interrupt in pytest's own
    process would stop the whole run.)"""
    code = ("from streamkws import cli\n"
            "def interrupted(argv=None):\n"
            "    raise KeyboardInterrupt\n"
            "cli.build_parser = interrupted\n"
            "cli.entry()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
