"""What the prober reports while it works: the steps of an assessment and their outcomes.

The prober calls a ``ProbeObserver`` (by default one that does nothing); the daemons pass one
that counts into Prometheus, so this package imports nothing of the daemons or the metrics.
The vocabularies here double as metric label values (``tlsmilter_probes_total{check,result}``).
"""

from __future__ import annotations

import enum
from typing import Protocol

from tlsmilter.assess.dns import Status as DnsStatus
from tlsmilter.assess.model import Code, DaneStatus
from tlsmilter.assess.mtasts import Outcome as StsOutcome


class ProbeStep(enum.Enum):
    """The steps of an assessment (the ``check`` label of ``tlsmilter_probes_total``)."""

    MX = "mx"
    ADDRESS = "address"
    TLSA = "tlsa"
    TLSRPT = "tlsrpt"
    MTA_STS = "mta_sts"
    SMTP = "smtp"
    PKIX = "pkix"
    DANE = "dane"


class SmtpResult(enum.Enum):
    """How a STARTTLS probe of one MX address ended."""

    TLS = "tls"
    NO_STARTTLS = "no_starttls"
    TLS_FAILED = "tls_failed"  # STARTTLS refused or the handshake failed
    CONNECT_FAILED = "connect_failed"
    SMTP_ERROR = "smtp_error"  # connected, but the SMTP dialogue failed before EHLO finished


_DNS = tuple(s.value for s in DnsStatus)
STEP_RESULTS: dict[ProbeStep, tuple[str, ...]] = {
    ProbeStep.MX: _DNS,
    ProbeStep.ADDRESS: _DNS,
    ProbeStep.TLSA: _DNS,
    ProbeStep.TLSRPT: _DNS,
    ProbeStep.MTA_STS: tuple(o.value for o in StsOutcome),
    ProbeStep.SMTP: tuple(r.value for r in SmtpResult),
    ProbeStep.PKIX: (Code.CERT_VALID.value, Code.CERT_UNTRUSTED.value, Code.CERT_EXPIRED.value,
                     Code.CERT_NAME_MISMATCH.value),
    ProbeStep.DANE: tuple(d.value for d in DaneStatus),
}
TIMED_STEPS = (ProbeStep.MX, ProbeStep.MTA_STS, ProbeStep.SMTP)  # reported with a duration


def smtp_result(connected: bool, starttls: bool | None, tls_version: str | None) -> SmtpResult:
    """Classify an ``AddressProbe`` by its fields (never by its error text)."""
    if not connected:
        return SmtpResult.CONNECT_FAILED
    if tls_version is not None:
        return SmtpResult.TLS
    if starttls is None:
        return SmtpResult.SMTP_ERROR
    return SmtpResult.TLS_FAILED if starttls else SmtpResult.NO_STARTTLS


class ProbeObserver(Protocol):
    """Receives the prober's reports; must be cheap and must not raise."""

    def step(self, step: ProbeStep, result: str) -> None:
        """One step ended with ``result`` (one of ``STEP_RESULTS[step]``)."""

    def step_seconds(self, step: ProbeStep, seconds: float) -> None:
        """A step of ``TIMED_STEPS`` took ``seconds``."""

    def assessed(self, level: str, seconds: float) -> None:
        """A whole assessment ended with ``level`` (a level or ``unknown``)."""


class SilentObserver:
    """The default ``ProbeObserver``: reports go nowhere (``tlsmilter check``, tests)."""

    def step(self, step: ProbeStep, result: str) -> None:
        pass

    def step_seconds(self, step: ProbeStep, seconds: float) -> None:
        pass

    def assessed(self, level: str, seconds: float) -> None:
        pass
