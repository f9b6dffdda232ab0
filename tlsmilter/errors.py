"""The one exception root of tlsmilter, and its structured subclasses.

Every error a user can cause (bad config, bad command-line input) is a ``TlsmilterError``;
the CLI prints its message and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class TlsmilterError(Exception):
    """Root of every error tlsmilter raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: where (dotted key) and why."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(TlsmilterError):
    """A config file that cannot be used; carries every issue found, not just the first."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} error(s)\n{lines}")


class UsageError(TlsmilterError):
    """Bad command-line input, e.g. an invalid domain name or resolver address."""


class CacheUnavailable(TlsmilterError):
    """The shared cache (Redis) could not be reached or failed; the caller must fail safe."""
