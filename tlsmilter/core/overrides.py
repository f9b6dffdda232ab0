"""Per-domain overrides postmasters set: ``require`` a level, or ``deny`` sensitive mail. Pure.

Each has a reason (for the log and the sender's reply) and may expire: it applies through its
``expires`` day (UTC) and no longer after it. ``apply`` turns a recipient domain's status into
what ``core.verdict.decide`` needs: a floor above the policy's requirement, or a refusal
whatever the domain's level.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from dataclasses import dataclass

from tlsmilter.core.levels import Level
from tlsmilter.core.verdict import DomainStatus


class Kind(enum.Enum):
    """What an override does; values are metric labels and decision-log fields."""

    REQUIRE = "require"
    DENY = "deny"


@dataclass(frozen=True)
class Override:
    domain: str  # normalised (A-label, lower case, no trailing dot)
    kind: Kind
    level: Level  # require: the floor; deny: unused
    reason: str
    expires: datetime.date | None = None  # applies through this day (UTC)

    def expired(self, today: datetime.date) -> bool:
        return self.expires is not None and today > self.expires

    def expiring(self, today: datetime.date, warn_days: int) -> bool:
        """Still applies, but not for more than ``warn_days`` days."""
        return (self.expires is not None and not self.expired(today)
                and (self.expires - today).days <= warn_days)

    @property
    def label(self) -> str:
        """``require-dane`` or ``deny``: for the decision log and the assessment header."""
        return f"require-{self.level.value}" if self.kind is Kind.REQUIRE else "deny"


def parse_date(text: str) -> datetime.date | None:
    """``YYYY-MM-DD`` as a date, ``""`` as None; ValueError for anything else."""
    if not text:
        return None
    if len(text) != 10:
        raise ValueError(f"{text!r} is not a date as YYYY-MM-DD")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date as YYYY-MM-DD") from None


def apply(status: DomainStatus, override: Override) -> DomainStatus:
    """``status`` as the override makes ``decide`` see it; its reason goes into ``why``."""
    if override.kind is Kind.DENY:
        return dataclasses.replace(status, denied=True,
                                   why=f"sensitive mail may not go there ({override.reason})")
    floor = override.level
    if status.floor is not None and status.floor > floor:
        floor = status.floor
    why = status.why
    if status.level is not None and status.level < floor:
        why = f"assessed {status.level.value}; this domain requires {floor.value} " \
              f"({override.reason})"
    return dataclasses.replace(status, floor=floor, why=why)


def describe(override: Override, today: datetime.date) -> str:
    """One line for people: what the override does, why, and until when."""
    what = (f"require {override.level.value}" if override.kind is Kind.REQUIRE
            else "deny sensitive mail")
    if override.expires is None:
        until = ""
    elif override.expired(today):
        until = f"; expired on {override.expires.isoformat()}, no longer applied"
    else:
        until = f"; until {override.expires.isoformat()}"
    return f"{what} ({override.reason}{until})"
