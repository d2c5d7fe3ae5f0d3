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


def run_streamkws(args: list[str], stderr_path, journal: bool) -> tuple[int, str]:
    with open(stderr_path, "w+") as err:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([sys.executable, "-m", "streamkws", *args], stderr=err,
                              stdout=subprocess.DEVNULL, env=env, timeout=120)
        err.seek(0)
        return proc.returncode, err.read()


def test_the_daemon_logs_its_start_and_stop_by_default(tmp_path):
    """A service's journal must show that it started, on what, and that it stopped."""
    rc, err = run_streamkws(["run", "--source", "demo", "--fast", "--quiet", "--publish",
                             f"ipc://{tmp_path}/pub.sock"], tmp_path / "err", journal=False)
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert "INFO streamkws.daemon: listening on demo with model default" in lines[0]
    assert "INFO streamkws.daemon: stopped; demo: 25 s audio, " in lines[1]


def test_under_the_journal_lines_carry_priorities_and_no_time_stamp(tmp_path):
    rc, err = run_streamkws(["run", "--source", "demo", "--fast", "--quiet", "--publish",
                             f"ipc://{tmp_path}/pub.sock"], tmp_path / "err", journal=True)
    assert rc == 0, err
    assert [line[:30] for line in err.splitlines()] == [
        "<6>INFO streamkws.daemon: list", "<6>INFO streamkws.daemon: stop"]
    rc, err = run_streamkws(["run", "--source", f"wav:{tmp_path}/none.wav"],
                            tmp_path / "err", journal=True)
    assert rc == 2
    assert err == f"<3>streamkws run: error: {tmp_path}/none.wav: cannot open (No such " \
                  "file or directory)\n"
