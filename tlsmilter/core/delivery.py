"""The delivery TLS policy: which Postfix TLS security level enforces an assessed level.

Postfix's smtp client asks, per next-hop domain, which TLS security level to enforce
(``smtp_tls_policy_maps``). ``policy_for`` turns a domain's cached assessment (the
``check --json`` object) into that answer, never weaker than the assessed level;
``normalize_key`` says which domain a Postfix lookup key names; ``answer`` is the whole reply
to one lookup in one of the maps ``policy_maps`` names. Pure: the socketmap server
(``daemons.socketmap``) does the talking.

The maps, for ``policy_server.map_name = "tlspolicy"``:

- ``tlspolicy``: the assessed level, or NOTFOUND for a domain tlsmilter cannot vouch for (not
  cached, assessed ``none`` or ``unknown``), leaving the transport's own level in force;
- ``tlspolicy-strict``: TEMP instead of NOTFOUND, so Postfix defers;
- ``tlspolicy-encrypted``, ``tlspolicy-verified``, ``tlspolicy-dane``: strict, and TEMP also
  when the domain's current assessment is below that level. Accepted sensitive mail goes to
  the transport of the level it required, whose map is one of these: a domain that got weaker
  after the milter accepted the message (an attacker blocking an MTA-STS policy fetch, TLSA
  lookups failing, a certificate replaced) defers the message; it never leaves weaker.

``dane-only`` and ``verify`` rely on Postfix's own DNSSEC lookups: they need
``smtp_dns_support_level = dnssec`` and a validating resolver, as DANE always does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tlsmilter.core.domains import InvalidDomain, normalize_domain
from tlsmilter.core.levels import Level
from tlsmilter.core.overrides import Kind, Override

AssessmentJson = Mapping[str, Any]


class PolicyAnswer(enum.Enum):
    """What a TLS policy lookup was answered with; values double as metric label values."""

    DANE_ONLY = "dane-only"
    SECURE = "secure"
    VERIFY = "verify"
    ENCRYPT = "encrypt"
    NOTFOUND = "notfound"
    TEMP = "temp"
    PERM = "perm"


def policy_for(assessment: AssessmentJson | None) -> str | None:
    """The ``smtp_tls_policy_maps`` value enforcing ``assessment``'s level, or None.

    None (NOTFOUND) leaves Postfix's own default in force: for ``none`` and ``unknown``
    there is nothing tlsmilter vouches for, and the milter never routes sensitive mail to
    such a domain. The result is never weaker than the assessed level.
    """
    if not isinstance(assessment, Mapping):
        return None
    level = assessment.get("level")
    if level == "dane":
        return "dane-only"
    if level == "encrypted":
        return "encrypt"
    if level != "verified":
        return None
    # SNI as the prober sent it: a server choosing its certificate by name must show
    # Postfix the certificate the assessment checked.
    if assessment.get("dnssec") is True:
        # The MX RRset is DNSSEC-validated, so the MX host name Postfix looks up at delivery
        # is as trustworthy as the one we assessed, and may even change in between.
        return "verify match=hostname servername=hostname"
    hosts = _sts_hosts(assessment) if assessment.get("mta_sts") == "enforce" else []
    if hosts:
        # MTA-STS alone: the MX lookup at delivery is forgeable, so the certificate must
        # name an authenticated MX host. We pin the MX host names we assessed rather than
        # translating the policy's patterns: Postfix's ".example.com" matches names at any
        # depth where MTA-STS's "*.example.com" matches exactly one label, and the policy
        # may cover hosts we never checked. The price: if the domain changes its MX set
        # before the cached assessment expires, delivery to a new host defers until the
        # next assessment; Postfix retries, nothing is lost.
        return f"secure match={':'.join(hosts)} servername=hostname"
    # "verified" with neither DNSSEC nor an enforced policy's MX hosts: an inconsistent
    # assessment. Still demand verification (Postfix's default names for "secure") rather
    # than enforce less than was claimed; at worst the mail defers.
    return "secure match=nexthop:dot-nexthop servername=hostname"


def _sts_hosts(assessment: AssessmentJson) -> list[str]:
    """Names of the MX hosts the MTA-STS policy authenticated, normalised, in MX order."""
    mx = assessment.get("mx")
    hosts: list[str] = []
    for entry in mx if isinstance(mx, list) else []:
        if not isinstance(entry, Mapping) or "mta-sts" not in (entry.get("authenticated_by")
                                                              or []):
            continue
        host = entry.get("host")
        if not isinstance(host, str):
            continue
        try:
            name = normalize_domain(host)  # also keeps ":" and spaces out of the policy
        except InvalidDomain:
            continue
        if name not in hosts:
            hosts.append(name)
    return hosts


def normalize_key(key: str) -> str | None:
    """The domain a Postfix next-hop ``key`` names, or None when no assessment applies.

    ``[host]`` and ``[host]:port`` skip the MX lookup and IP literals have no MX: neither
    is what was assessed. ``domain:port`` applies only for port 25. A leading dot (a
    parent-domain key, which socketmap clients do not send) never inherits a policy.
    """
    text = key.strip()
    if not text or text.startswith(("[", ".")):
        return None
    if ":" in text:
        text, _, port = text.rpartition(":")
        if port not in ("25", "smtp"):
            return None
    try:
        return normalize_domain(text)
    except InvalidDomain:
        return None


# --- the maps and the whole answer ------------------------------------------------------------

STRICT_SUFFIX = "-strict"  # <map_name>-strict: TEMP where the plain map says NOTFOUND
ROUTED_LEVELS = (Level.ENCRYPTED, Level.VERIFIED, Level.DANE)  # <map_name>-<level>


@dataclass(frozen=True)
class PolicyMap:
    """What a map name asks of an answer."""

    strict: bool  # TEMP, not NOTFOUND, for a domain tlsmilter cannot vouch for
    required: Level | None = None  # TEMP for a domain assessed below this level


def policy_maps(map_name: str) -> dict[str, PolicyMap]:
    """Every map name the policy server answers, for ``policy_server.map_name``."""
    maps = {map_name: PolicyMap(strict=False),
            f"{map_name}{STRICT_SUFFIX}": PolicyMap(strict=True)}
    for level in ROUTED_LEVELS:
        maps[f"{map_name}-{level.value}"] = PolicyMap(strict=True, required=level)
    return maps


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """What answering a lookup needs of an assessment, computed once (``domain_policy``).

    A store keeps it with the assessment: the policy server then answers a cached domain
    without unpacking the assessment again.
    """

    level: str | None  # the assessed level as the assessment spells it; None: it has none
    policy: str | None  # ``policy_for``: the map value, or None for NOTFOUND
    counted: PolicyAnswer | None  # what an ``OK`` answer counts as; None with no policy


def domain_policy(assessment: AssessmentJson) -> DomainPolicy:
    """The level and policy of ``assessment``."""
    level = assessment.get("level")
    policy = policy_for(assessment)
    return DomainPolicy(None if level is None else str(level), policy,
                        None if policy is None else PolicyAnswer(policy.split(" ", 1)[0]))


def answer(domain: str, assessment: AssessmentJson | None,
           policy_map: PolicyMap) -> tuple[PolicyAnswer, str]:
    """The reply to a lookup of ``domain`` in ``policy_map``, and what it counts as.

    The reply is the socketmap payload: ``OK <policy>``, ``NOTFOUND `` or ``TEMP <reason>``.
    A TEMP reason names the domain and why, for Postfix's log.
    """
    known = domain_policy(assessment) if isinstance(assessment, Mapping) else None
    return answer_for(domain, known, policy_map)


def answer_overridden(domain: str, known: DomainPolicy | None, policy_map: PolicyMap,
                      override: Override | None) -> tuple[PolicyAnswer, str]:
    """``answer_for`` under a per-domain override that applies today (None: none).

    Only the strict maps (tlsmilter's transports: sensitive mail) heed it: ``deny`` defers
    every delivery there, ``require`` defers it while the domain is assessed below the
    override's level, so a message accepted before the override, or before the domain fell,
    waits rather than leave weaker. The plain map (all mail) answers as without it.
    """
    if override is None or not policy_map.strict:
        return answer_for(domain, known, policy_map)
    if override.kind is Kind.DENY:
        return PolicyAnswer.TEMP, (f"TEMP tlsmilter: sensitive mail to {domain} is denied by "
                                   f"override ({_reason(override.reason)})")
    level = known.level if known is not None else None
    if known is not None and known.policy is not None and level in _LEVELS \
            and Level(str(level)) < override.level:
        return PolicyAnswer.TEMP, (
            f"TEMP tlsmilter: {domain} is assessed {level} now, below the "
            f"{override.level.value} its override requires ({_reason(override.reason)})")
    return answer_for(domain, known, policy_map)


_LEVELS = frozenset(level.value for level in Level)


def _reason(text: str) -> str:
    """An override's reason in a reply: one short printable line (Postfix logs it)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:100])


def answer_for(domain: str, known: DomainPolicy | None,
               policy_map: PolicyMap) -> tuple[PolicyAnswer, str]:
    """``answer`` from the ``domain_policy`` of the assessment (None: not assessed)."""
    if known is None:
        policy = level = None
    else:
        policy, level = known.policy, known.level
    if policy is not None and policy_map.required is not None \
            and Level(str(level)) < policy_map.required:
        return PolicyAnswer.TEMP, (
            f"TEMP tlsmilter: {domain} is assessed {level} now, below the "
            f"{policy_map.required.value} this message requires")
    if policy is None and policy_map.strict:
        why = f"assessed {level}" if level else "not assessed (again) yet"
        return PolicyAnswer.TEMP, f"TEMP tlsmilter cannot vouch for {domain}: {why}"
    if known is None or known.counted is None:
        return PolicyAnswer.NOTFOUND, "NOTFOUND "
    return known.counted, f"OK {policy}"
