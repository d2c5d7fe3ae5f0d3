"""Errors a user can cause and fix.

The CLI turns these into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

EXIT_USER_ERROR = 2
"""Exit status for an error the user can fix (argparse uses the same for bad arguments)."""

EXIT_TEMPORARY = 75
"""Exit status for a start-up error that may pass by itself (``EX_TEMPFAIL``): an address
not yet configured, a port still held. systemd retries it, and not an
:data:`EXIT_USER_ERROR` (``RestartPreventExitStatus=2``)."""

_A = TypeVar("_A")


class StreamKWSError(Exception):
    """A problem with the user's input, files, devices or configuration."""


class ConfigError(StreamKWSError):
    """A configuration value is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.reason = key, message
        super().__init__(f"config key '{key}': {message}")


class ConfigFileError(ConfigError):
    """The config file itself cannot be read or parsed (no single key is at fault)."""

    def __init__(self, path: str, message: str) -> None:
        self.key, self.reason = path, message
        StreamKWSError.__init__(self, f"{path}: {message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors in one line like every other user error (its usage block
    before them is a second and third line); ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        from streamkws.logs import error_line

        self.exit(EXIT_USER_ERROR,
                  error_line(f"{self.prog}: error: {message} (see '{self.prog} --help')") + "\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        # argparse reports a subcommand's unknown option as the top level's, pointing at
        # 'streamkws --help', which does not list it; the subcommand's parser does.
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            owner: argparse.ArgumentParser = self
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    owner = action.choices.get(getattr(ns, action.dest, None), self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def no_folder(path: object, what: str = "data folder") -> StreamKWSError:
    """The error for ``path`` that should have been a folder: missing, or a file."""
    from pathlib import Path

    p = Path(str(path))
    if p.exists():
        return StreamKWSError(f"{p}: is a file, not a {what}")
    return StreamKWSError(f"{p}: {what} not found")


class TemporaryError(StreamKWSError):
    """A start-up error that may pass by itself, so worth retrying: at boot, the network
    address to publish on may not be there yet (DHCP), or a port still held."""

    exit_status = EXIT_TEMPORARY


class AudioError(StreamKWSError):
    """Audio that cannot be read or a device that cannot be opened."""


def os_error_message(exc: OSError) -> str:
    """What the file system said, naming the file: a full disk, a read-only folder, a file
    where a folder should be are the user's to fix, so one line, not a traceback."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def exit_status(prog: str, func: Callable[[_A], int], arg: _A) -> int:
    """``func(arg)``'s exit status, with a :class:`StreamKWSError` reported as one line
    ``<prog>: error: <message>`` on stderr and :data:`EXIT_USER_ERROR` (or the error's own
    status, as ``streamkws`` does), for the tools run with ``python -m`` outside the
    ``streamkws`` command."""
    try:
        return func(arg)
    except StreamKWSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", EXIT_USER_ERROR)
