"""Standard output for `streamkws run | consumer`: a consumer that stalls or leaves."""

import io
import logging
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


def test_a_stalled_reader_never_blocks_the_caller_and_drops_are_counted(caplog):
    out = StalledReader()
    echo = LineEcho(out, on_closed=lambda: None, max_lines=5)
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
    echo = LineEcho(out, on_closed=lambda: None, max_lines=1)
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
    echo = LineEcho(out, on_closed=lambda: None)
    for i in range(50):
        echo.put(f"{i}\n", wait=True)
    threading.Timer(0.3, out.resume.set).start()
    echo.close(stop=threading.Event())  # no stop requested: waits as long as it takes
    assert out.getvalue().splitlines() == [str(i) for i in range(50)]
    assert echo.dropped == 0


def test_a_reader_that_leaves_is_reported_once_and_later_lines_are_ignored():
    left = threading.Event()
    echo = LineEcho(LeftReader(), on_closed=left.set)
    echo.put("a\n")
    assert left.wait(2)
    echo.put("b\n")
    echo.close()
    assert echo.dropped == 0
