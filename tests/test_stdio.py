"""Standard output for `streamkws run | consumer`: a consumer that stalls or leaves."""

import io
import logging
import re
import threading
import time

from streamkws.stdio import LineEcho


class StalledReader(io.StringIO):
    """A pipe whose reader stopped reading: every write blocks until ``resume`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()
        self.writing = threading.Event()

    def write(self, s: str) -> int:
        self.writing.set()
        self.resume.wait()
        return super().write(s)


class LeftReader(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


class FullDisk(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_stalled_reader_never_blocks_the_caller_and_drops_are_counted(caplog):
    out = StalledReader()
    echo = LineEcho(out, on_closed=lambda error: None, max_lines=5)
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="streamkws.stdio"):
        echo.put("0\n")
        assert out.writing.wait(2)
        for i in range(1, 20):
            echo.put(f"{i}\n")
    assert time.monotonic() - t < 0.5
    # One line is in the blocked write, five wait in the queue: the other 14 are dropped.
    assert echo.dropped == 14
    assert caplog.text.count("standard output is not being read") == 1
    out.resume.set()
    echo.close()
    assert out.getvalue() == "".join(f"{i}\n" for i in range(6))


def test_waiting_for_room_gives_up_when_a_stop_is_requested():
    out = StalledReader()
    echo = LineEcho(out, on_closed=lambda error: None, max_lines=1)
    stop = threading.Event()
    echo.put("a\n", wait=True, stop=stop)
    assert out.writing.wait(2)
    echo.put("b\n", wait=True, stop=stop)  # "a" is in the blocked write, "b" fills the queue
    threading.Timer(0.3, stop.set).start()
    t = time.monotonic()
    echo.put("c\n", wait=True, stop=stop)
    assert 0.2 < time.monotonic() - t < 1.5 and echo.dropped == 1
    t = time.monotonic()
    echo.close(stop=stop, grace=0.2)  # the reader never comes back
    assert time.monotonic() - t < 1.0


def test_close_writes_everything_queued_for_a_slow_reader():
    out = StalledReader()
    echo = LineEcho(out, on_closed=lambda error: None)
    for i in range(50):
        echo.put(f"{i}\n", wait=True)
    threading.Timer(0.3, out.resume.set).start()
    echo.close(stop=threading.Event())  # no stop requested: waits as long as it takes
    assert out.getvalue().splitlines() == [str(i) for i in range(50)]
    assert echo.dropped == 0


def test_a_reader_that_leaves_is_reported_once_and_later_lines_are_ignored():
    left = []
    echo = LineEcho(LeftReader(), on_closed=left.append)
    echo.put("a\n")
    echo.close()
    assert left == [None]  # no error: a reader leaving is a clean end
    echo.put("b\n")
    assert echo.dropped == 0


def test_a_failing_write_is_reported_and_nothing_waits_for_room_that_never_comes(caplog):
    errors = []
    echo = LineEcho(FullDisk(), on_closed=errors.append, max_lines=2)
    stop = threading.Event()
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="streamkws.stdio"):
        for i in range(10):  # a fast replay waits for room: there must be none to wait for
            echo.put(f"{i}\n", wait=True, stop=stop)
        echo.close()
    assert time.monotonic() - t < 2.0
    assert len(errors) == 1 and errors[0].errno == 28
    assert re.search(r"not written to standard output: \d+ \(it failed", caplog.text)


def test_the_line_stuck_in_a_write_counts_as_unwritten(caplog):
    out = StalledReader()
    echo = LineEcho(out, on_closed=lambda error: None)
    echo.put("only\n")
    assert out.writing.wait(2)
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.WARNING, logger="streamkws.stdio"):
        echo.close(stop=stop, grace=0.1)
    assert "detection lines not written to standard output: 1 (it was not" in caplog.text
