"""What every lab service shares: one error type and the start/stop context protocol."""

from __future__ import annotations

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
