"""Why a recipient domain failed a sensitive message's policy: reason codes and texts.

A failing domain's reason is the first problem its assessment found (an ``assess.model.Code``
value), or one of the codes below for what the milter itself found. The codes appear in the
decision log (``reasons=``) and label ``tlsmilter_refused_domains_total``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INVALID_DOMAIN = "invalid_domain"  # an address literal or a name that is not a domain
NOT_ASSESSED = "not_assessed"  # no assessment by the end of the end-of-message wait
LEVEL_TOO_LOW = "level_too_low"  # assessed without problems, but below what the policy needs
OTHER = "other"  # a code this version does not know (an entry written by another version)
OVERRIDE_REQUIRE = "override_require"  # below the level a `require` override sets
OVERRIDE_DENY = "override_deny"  # a `deny` override: never sensitive mail to this domain
MILTER_REASONS = (INVALID_DOMAIN, NOT_ASSESSED, LEVEL_TOO_LOW, OVERRIDE_REQUIRE, OVERRIDE_DENY)


def first_problem(assessment: Mapping[str, Any]) -> tuple[str, str]:
    """The first problem ``assessment`` found: in plain language, and its reason code.

    ``("", "")`` when it found none. The text drops the detail in parentheses and names the
    MX host the problem is about.
    """
    for reason in assessment.get("reasons", []):
        if reason.get("severity") == "problem":
            host = f" ({reason['host']})" if reason.get("host") else ""
            return f"{reason['text'].split(' (')[0]}{host}", str(reason.get("code", ""))
    return "", ""
