"""Log lines for a terminal, or for systemd's journal when standard error is connected to it.

The journal stamps every line itself and reads a ``<N>`` prefix as its syslog priority
(``SyslogLevelPrefix=``, on by default). Without the prefix every line, errors included,
would be stored at "info", and ``journalctl -p err -u streamkws`` would find nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}
"""Python's level -> syslog priority (debug, info, warning, err, crit)."""

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a Python level, custom levels rounded down to the next one."""
    known = [lv for lv in PRIORITY if lv <= levelno]
    return PRIORITY[max(known)] if known else PRIORITY[logging.DEBUG]


def to_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (standard error) is the journal stream systemd gave this process:
    ``$JOURNAL_STREAM`` names it as ``device:inode``. A child whose stderr was redirected
    inherits the variable but not the stream, hence the comparison."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    stream = sys.stderr if stream is None else stream
    try:
        dev, ino = (int(v) for v in wanted.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset, malformed, or no real file
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_line(text: str, levelno: int) -> str:
    """``text`` with its priority on every line (each line is its own journal entry)."""
    tag = f"<{priority(levelno)}>"
    return tag + text.replace("\n", "\n" + tag)


class JournalFormatter(logging.Formatter):
    """No time stamp (the journal has one) and a priority prefix on every line."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # A warning's text ends in a newline, which would be an empty entry of its own.
        return journal_line(super().format(record).rstrip("\n"), record.levelno)


def configure(level: int) -> None:
    """Log to standard error at ``level``, formatted for where standard error goes."""
    journal = to_journal()
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # Only when our handler is the one in place: a program that set up its own logging
    # before calling us keeps its own hooks too.
    if journal and handler in logging.getLogger().handlers:
        # Python's own last words (a crash's traceback, a thread's, a library's warning)
        # go to stderr untagged, stored as "info": through logging they are found by
        # `journalctl -p err` like every other error.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
        sys.unraisablehook = _log_unraisable


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    logging.getLogger("streamkws").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_unraisable(args: Any) -> None:
    """What Python prints as "Exception ignored in ..." (a failing ``__del__``, say)."""
    logging.getLogger("streamkws").error(
        "exception ignored in %r", args.object,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # as the default hook: a thread's quiet way out
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("streamkws").critical(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def error_line(text: str) -> str:
    """A command's closing error message, at "err" priority in the journal."""
    return journal_line(text, logging.ERROR) if to_journal() else text
