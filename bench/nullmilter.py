"""A null milter for the benchmarks: pymilter, like tlsmilter, and it accepts everything.

It overrides the same callbacks as ``tlsmilter.milter.TlsMilter`` (with the same
``@noreply`` ones) and asks for the same actions, so Postfix sends it the same protocol steps
and waits for the same replies: what
separates the two in a benchmark is tlsmilter's own work, not the amount of milter protocol.
``data()`` is overridden as docs/design.md explains (Postfix's DATA-stage macro packet stalls
otherwise).

    python -m bench.nullmilter unix:/PATH/null.sock

Runs until SIGTERM or SIGINT (libmilter handles them and returns from its main loop).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import Milter

CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT


class NullMilter(Milter.Base):  # type: ignore[misc]  # pymilter is untyped
    @Milter.noreply  # type: ignore[misc]  # as tlsmilter's: no reply to MAIL, RCPT, headers
    def envfrom(self, mailfrom: str, *params: str) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[misc]
    def envrcpt(self, to: str, *params: str) -> int:
        return CONTINUE

    def data(self) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[misc]
    def header(self, name: str, value: str) -> int:
        return CONTINUE

    def eom(self) -> int:
        return ACCEPT

    def abort(self) -> int:
        return CONTINUE

    def close(self) -> int:
        return CONTINUE


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("unix:/"):
        print("usage: python -m bench.nullmilter unix:/PATH", file=sys.stderr)
        return 2
    # As tlsmilter serve does: libmilter's signal thread sigwait()s for these, so no other
    # thread may take them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    # Postfix's smtpd (user postfix) must be able to connect: a socket mode of 0666, as
    # tlsmilter's socket_mode gives it in the bench; access control is the directory's.
    os.umask(0o111)
    Milter.factory = NullMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    try:
        Milter.runmilter("nullmilter", argv[0], timeout=300)
    finally:
        Path(argv[0].removeprefix("unix:")).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
