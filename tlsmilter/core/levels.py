"""Transport-security levels, ordered, and how Postfix enforces each."""

from __future__ import annotations

import enum
import functools


@functools.total_ordering
class Level(enum.Enum):
    """A domain's transport-security level: the weakest over all its MX hosts."""

    NONE = "none"
    ENCRYPTED = "encrypted"
    VERIFIED = "verified"
    DANE = "dane"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Level):
            return NotImplemented
        return self.rank < other.rank


_RANK = {Level.NONE: 0, Level.ENCRYPTED: 1, Level.VERIFIED: 2, Level.DANE: 3}

# Unknown is a state, not a level: it never compares with levels and is never secure.
UNKNOWN = "unknown"

# Score bands: the score always lies inside its level's band, so sorting by score never
# reorders levels.
SCORE_BANDS: dict[Level, tuple[int, int]] = {
    Level.NONE: (0, 24),
    Level.ENCRYPTED: (25, 49),
    Level.VERIFIED: (50, 74),
    Level.DANE: (75, 100),
}
