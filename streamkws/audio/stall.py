"""Noticing a source whose producer has gone quiet: a stall reported, never fatal.

A microphone that stalls is reopened by :class:`~streamkws.audio.supervisor.SourceSupervisor`.
Standard input cannot be reopened: the program feeding it (``arecord ... | streamkws run
--source -``) may have hung on a wedged device, or may simply be slow to start. Either
way the daemon keeps waiting, but it must not look healthy meanwhile, so the state is
reported (status, systemd's ``STATUS=``, the log) until audio flows again.
"""

from __future__ import annotations

import logging

from streamkws.audio.base import AudioSource

log = logging.getLogger(__name__)

OK = "ok"
STALLED = "stalled"


class StallWatch:
    """Polled by the processing thread; says when a source's state changes."""

    def __init__(self, source: AudioSource, timeout_s: float) -> None:
        self.source = source
        self.timeout_s = timeout_s
        self.state = OK
        self.waited = 0.0
        """How long the source had been waiting for input at the last :meth:`poll`."""
        self._since = 0.0
        self._read = 0

    @property
    def error(self) -> str | None:
        """Why the source counts as stalled (for status), or None while it is not."""
        if self.state != STALLED:
            return None
        return f"{self.source.name} has delivered no audio for {self.waited:.0f} s"

    def poll(self, now: float) -> bool:
        """Update the state from the source's wait; True when it changed."""
        self.waited = self.source.input_wait(now)
        if self.state == OK and self.waited >= self.timeout_s:
            self.state = STALLED
            self._since = now - self.waited
            self._read = self.source.samples_read
            log.warning("%s has delivered no audio for %.0f s; is the program feeding it "
                        "stuck? Still waiting for it", self.source.name, self.waited)
            return True
        if self.state == STALLED and self.waited < self.timeout_s:
            # A wait shorter than the timeout means input (or end of file) came since.
            self.state = OK
            # Not when the stall ended in end of file: that is the end of the stream.
            if self.source.samples_read > self._read:
                log.info("%s is delivering audio again (after a stall of up to %.0f s)",
                         self.source.name, now - self._since)
            return True
        return False
