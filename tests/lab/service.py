"""What every lab service shares: one error type, the start/stop context protocol, and how
a child process is stopped."""

from __future__ import annotations

import subprocess
from types import TracebackType
from typing import Self


class LabError(RuntimeError):
    """A lab service could not start or stop; the message carries its log tail."""


class Service:
    """``with service:`` starts it and always stops it; subclasses define both."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM ``proc``, SIGKILL it if it outlives ``timeout``; its exit status (None: no
    process). Idempotent: a process that already ended is only reaped."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode
