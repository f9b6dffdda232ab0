"""The daemons' own metric label vocabularies. A leaf: it imports nothing of tlsmilter.

Each value is a label value of a metric in ``tlsmilter.metrics``; ``daemons.instrument``
creates every series at zero, so a rate over one that never moved reads 0, not "no data".
"""

from __future__ import annotations

import enum

NOT_SENSITIVE = "normal"  # sensitivity label of a message no policy applies to
UNCLASSIFIED = "unclassified"  # sensitivity label when classifying the message itself failed

CACHE_BACKENDS = ("memory", "redis")
CACHE_ERROR = "error"  # cache result label of a lookup the backend could not answer
CACHE_OPS = ("get", "put")


class Stage(enum.Enum):
    """Milter callbacks timed by ``tlsmilter_milter_callback_seconds``."""

    MAIL = "mail"
    RCPT = "rcpt"
    HEADER = "header"
    EOM = "eom"


class RecipientLevel(enum.Enum):
    """What the milter knew of a recipient's domain at RCPT time."""

    NONE = "none"
    ENCRYPTED = "encrypted"
    VERIFIED = "verified"
    DANE = "dane"
    UNKNOWN = "unknown"  # assessed, but the assessment failed temporarily
    PENDING = "pending"  # not in the cache yet: a probe was started
    INVALID = "invalid"  # an address literal or a name that is not a domain
    SKIPPED = "skipped"  # in milter.skip_domains
    LOCAL = "local"  # delivered by a local transport (milter.local_transports)


class FailSafe(enum.Enum):
    """Why the fail-safe rules stepped in (normal mail passes, sensitive mail is tempfailed)."""

    CALLBACK_ERROR = "callback_error"  # an exception in MAIL, RCPT or a header callback
    CLASSIFY_ERROR = "classify_error"  # classifying the message's sensitivity failed
    DECIDE_ERROR = "decide_error"  # gathering assessments or deciding failed
    CACHE_UNAVAILABLE = "cache_unavailable"  # the cache (Redis) could not be read
