import io

from streamkws.progress import LOG_INTERVAL_S, tqdm


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_written_to_a_log_file_redraws_at_most_every_half_minute():
    bar = tqdm(total=10, file=io.StringIO())
    assert bar.mininterval == LOG_INTERVAL_S
    bar.close()


def test_a_bar_on_a_terminal_keeps_tqdms_own_pace():
    bar = tqdm(total=10, file=_Terminal())
    assert bar.mininterval < 1.0
    bar.close()
