"""Signals reach the daemon through a relay thread, never by taking a lock in a handler."""

import logging
import os
import signal
import threading
import time

from streamkws.signals import SignalRelay


def test_a_signal_is_acted_on_by_the_relay_thread_not_the_main_one():
    called = []
    done = threading.Event()

    def action():
        called.append(threading.current_thread().name)
        done.set()

    relay = SignalRelay({signal.SIGUSR1: action})
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert done.wait(5)
        assert called == ["signals"]
    finally:
        relay.close()


def test_a_signal_landing_while_the_main_thread_holds_the_events_lock_cannot_hang_it():
    """Where the daemon's loop spends its time: inside Event.clear()/wait() of the ring, with
    the lock of that event's condition held. A handler that set the event itself would
    wait there for ever on its own thread's lock."""
    wake = threading.Event()
    relay = SignalRelay({signal.SIGUSR1: wake.set})
    returned = threading.Event()

    def main_thread_inside_event():
        with wake._cond:  # what Event.clear/wait hold when the handler interrupts them
            relay.handle(signal.SIGUSR1)
        returned.set()

    try:
        # A thread stands in for the main thread, so a hang fails the test, not the run.
        threading.Thread(target=main_thread_inside_event, daemon=True).start()
        assert returned.wait(2), "the handler waited for a lock its own thread holds"
        assert wake.wait(2)  # and the relay did set it, once the lock was free
    finally:
        relay.close()


def test_close_acts_on_what_is_pending_and_restores_the_old_handler():
    previous = signal.getsignal(signal.SIGUSR1)
    count = []
    relay = SignalRelay({signal.SIGUSR1: lambda: count.append(1)})
    assert signal.getsignal(signal.SIGUSR1) == relay.handle
    for _ in range(3):
        relay.handle(signal.SIGUSR1)
    relay.close()
    assert count == [1, 1, 1]
    assert signal.getsignal(signal.SIGUSR1) == previous
    relay.close()  # twice is harmless
    relay.handle(signal.SIGUSR1)  # a late call after close is ignored, not an error


def test_a_failing_action_is_logged_and_later_signals_still_arrive(caplog):
    seen = []
    done = threading.Event()

    def flaky():
        seen.append(1)
        if len(seen) == 1:
            raise RuntimeError("reload broke")
        done.set()

    relay = SignalRelay({signal.SIGUSR1: flaky})
    try:
        with caplog.at_level(logging.ERROR, logger="streamkws.signals"):
            relay.handle(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                time.sleep(0.01)
            relay.handle(signal.SIGUSR1)
            assert done.wait(5)
        assert "acting on signal" in caplog.text and "reload broke" in caplog.text
    finally:
        relay.close()


def test_close_off_the_main_thread_leaves_the_handlers_working_until_the_main_thread_closes():
    previous = signal.getsignal(signal.SIGUSR1)
    done = threading.Event()
    relay = SignalRelay({signal.SIGUSR1: done.set})
    result = []
    closer = threading.Thread(target=lambda: result.append(relay.close()))
    closer.start()
    closer.join()
    assert result == [False]  # Python allows handler changes on the main thread only
    assert signal.getsignal(signal.SIGUSR1) == relay.handle
    os.kill(os.getpid(), signal.SIGUSR1)
    assert done.wait(5)
    assert relay.close()
    assert signal.getsignal(signal.SIGUSR1) == previous
