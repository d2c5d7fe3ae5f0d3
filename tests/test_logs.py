"""What the daemon writes to standard error: its lifecycle at info, and, when systemd's
journal is on the other end, each line tagged with its syslog priority."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from streamkws import logs


def test_levels_map_to_syslog_priorities():
    assert [logs.priority(lv) for lv in (logging.DEBUG, logging.INFO, logging.WARNING,
                                         logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]
    assert logs.priority(logging.WARNING + 5) == 4  # a custom level rounds down
    assert logs.priority(1) == 7


def test_every_line_of_a_journal_entry_carries_its_priority():
    """A traceback is several lines, and the journal makes an entry of each."""
    record = logging.LogRecord("streamkws.x", logging.ERROR, __file__, 1, "boom\nline 2",
                               None, None)
    assert logs.JournalFormatter().format(record) == (
        "<3>ERROR streamkws.x: boom\n<3>line 2")


def test_only_the_stream_systemd_named_counts_as_the_journal(tmp_path, monkeypatch):
    with open(tmp_path / "journal", "w") as mine, open(tmp_path / "other", "w") as other:
        st = os.fstat(mine.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.to_journal(mine)
        assert not logs.to_journal(other)  # stderr redirected by whoever started us
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logs.to_journal(mine)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.to_journal(mine)


def run_streamkws(args: list[str], stderr_path, journal: bool,
                  python_code: str | None = None) -> tuple[int, str]:
    with open(stderr_path, "w+") as err:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        command = (["-c", python_code] if python_code else ["-m", "streamkws", *args])
        proc = subprocess.run([sys.executable, *command], stderr=err,
                              stdout=subprocess.DEVNULL, env=env, timeout=120)
        err.seek(0)
        return proc.returncode, err.read()


def test_the_daemon_logs_its_start_and_stop_by_default(tmp_path):
    """A service's journal must show that it started, on what, and that it stopped."""
    rc, err = run_streamkws(["run", "--source", "demo", "--fast", "--quiet", "--publish",
                             f"ipc://{tmp_path}/pub.sock"], tmp_path / "err", journal=False)
    assert rc == 0, err
    lines = [line for line in err.splitlines() if " streamkws." in line]  # ours only
    assert len(lines) == 2, err
    assert "Traceback" not in err and "Error" not in err, err  # nor anyone's failure
    assert "INFO streamkws.daemon: listening on demo with model default" in lines[0]
    assert "INFO streamkws.daemon: stopped; demo: 25 s audio, " in lines[1]


def test_under_the_journal_lines_carry_priorities_and_no_time_stamp(tmp_path):
    rc, err = run_streamkws(["run", "--source", "demo", "--fast", "--quiet", "--publish",
                             f"ipc://{tmp_path}/pub.sock"], tmp_path / "err", journal=True)
    assert rc == 0, err
    assert [line[:30] for line in err.splitlines() if "streamkws." in line] == [
        "<6>INFO streamkws.daemon: list", "<6>INFO streamkws.daemon: stop"]
    assert all(line.startswith("<") for line in err.splitlines())  # every line tagged
    rc, err = run_streamkws(["run", "--source", f"wav:{tmp_path}/none.wav"],
                            tmp_path / "err", journal=True)
    assert rc == 2
    assert err == f"<3>streamkws run: error: {tmp_path}/none.wav: cannot open (No such " \
                  "file or directory)\n"


def test_under_the_journal_crashes_and_warnings_are_tagged_too(tmp_path):
    """A traceback printed by Python itself would be stored at "info" and missed by
    `journalctl -p err`."""
    code = ("import logging, threading, warnings; from streamkws import logs; "
            "logs.configure(logging.INFO); warnings.warn('careful'); "
            "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join(); "
            "raise RuntimeError('boom')")
    rc, err = run_streamkws([], tmp_path / "err", journal=True, python_code=code)
    assert rc == 1
    lines = err.splitlines()
    assert lines[0].startswith("<4>WARNING py.warnings: ") and lines[0].endswith("careful")
    assert "<2>CRITICAL streamkws: uncaught exception in thread" in lines[1]
    assert "<2>ZeroDivisionError: division by zero" in lines
    assert lines[-1] == "<2>RuntimeError: boom"
    assert all(line[:3] in ("<4>", "<2>") for line in lines)


def test_verbose_counts_before_or_after_the_command(capsys, monkeypatch):
    """`-v` appended to a unit's ExecStart= ... run line used to be refused (exit 2), which
    RestartPreventExitStatus=2 turns into a service left failed."""
    from streamkws import cli

    levels = []
    monkeypatch.setattr(cli.logs, "configure", levels.append)
    for argv in (["run", "--check", "--source", "demo"],
                 ["run", "--check", "--source", "demo", "-v"],
                 ["-v", "run", "--check", "--source", "demo"],
                 ["-v", "run", "--check", "--source", "demo", "-v"],
                 ["devices", "--json", "-v"]):
        assert cli.main(argv) == 0, argv
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG, logging.DEBUG,
                      logging.INFO]
    capsys.readouterr()
