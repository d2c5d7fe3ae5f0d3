import io

from streamkws.progress import LOG_INTERVAL_S, tqdm


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_written_to_a_log_file_redraws_at_most_every_half_minute():
    bar = tqdm(total=10, file=io.StringIO())
    assert bar.mininterval == LOG_INTERVAL_S
    bar.close()


def test_a_bar_in_a_log_file_is_drawn_about_twice_a_minute_however_often_it_moves(
        monkeypatch):
    """tqdm redraws on update (paced here on a fake clock, so the count is exact) and from
    a monitor thread, in real time, for a bar not drawn for maxinterval: both at 30 s."""
    import tqdm as tqdm_module

    monkeypatch.setattr(tqdm_module.tqdm, "monitor_interval", 0)  # no real-time thread
    now = [1000.0]
    log = io.StringIO()
    bar = tqdm(total=6000, file=log)
    bar._time = lambda: now[0]
    bar.start_t = bar.last_print_t = now[0]
    for _ in range(6000):  # 10 minutes of fake time, an update every 0.1 s
        now[0] += 0.1
        bar.update(1)
    draws = log.getvalue().count("\r")
    bar.close()
    assert 10 <= draws <= 10 * 60 / LOG_INTERVAL_S + 3, draws
    assert bar.maxinterval >= LOG_INTERVAL_S  # the monitor thread's pace


def test_a_bar_on_a_terminal_keeps_tqdms_own_pace():
    bar = tqdm(total=10, file=_Terminal())
    assert bar.mininterval < 1.0
    bar.close()
