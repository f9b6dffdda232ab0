"""The lab's standing scenarios: one line (or a few) per case a test needs.

Add a scenario here and every test gets a domain ``<name>.test`` that behaves as declared.
"""

from __future__ import annotations

from tests.lab.model import (
    MX,
    Cert,
    Dnssec,
    Domain,
    MtaSts,
    Smtp,
    Tls,
    Tlsa,
    TlsaTarget,
)

U, S, B = Dnssec.UNSIGNED, Dnssec.SIGNED, Dnssec.BOGUS

SCENARIOS: tuple[Domain, ...] = (
    Domain("plain", U, mx=(MX("mx1", Smtp(Tls.NONE)),)),
    Domain("tls10", U, mx=(MX("mx1", Smtp(Tls.TLS10)),)),
    Domain("broken-tls", U, mx=(MX("mx1", Smtp(Tls.BREAK)),)),
    Domain("self-signed", U, mx=(MX("mx1", Smtp(cert=Cert.SELF_SIGNED)),)),
    Domain("expired", S, mx=(MX("mx1", Smtp(cert=Cert.EXPIRED)),)),
    Domain("wrong-name", S, mx=(MX("mx1", Smtp(cert=Cert.WRONG_NAME)),)),
    Domain("ca-unauth", U, mx=(MX("mx1"),)),
    Domain("sts-enforce", U, mx=(MX("mx1"),), mta_sts=MtaSts("enforce"), tlsrpt=True),
    Domain("sts-wildcard", U, mx=(MX("mx1"), MX("mx2", preference=20)),
           mta_sts=MtaSts("enforce", mx=("*.sts-wildcard.test",))),
    Domain("sts-uncovered", U, mx=(MX("mx1"),),
           mta_sts=MtaSts("enforce", mx=("other.example",))),
    Domain("sts-testing", U, mx=(MX("mx1"),), mta_sts=MtaSts("testing")),
    Domain("dnssec-ca", S, mx=(MX("mx1"),)),
    Domain("dnssec-tls12", S, mx=(MX("mx1", Smtp(Tls.TLS12)),)),
    Domain("dane-ee", S, mx=(MX("mx1", Smtp(cert=Cert.SELF_SIGNED), tlsa=(Tlsa(3, 1, 1),)),)),
    Domain("dane-ee-full", S, mx=(MX("mx1", Smtp(cert=Cert.EXPIRED),
                                     tlsa=(Tlsa(3, 0, 2),)),)),
    Domain("dane-ta", S, mx=(MX("mx1", tlsa=(Tlsa(2, 0, 1, TlsaTarget.TA),)),)),
    Domain("dane-ta-wrong-name", S, mx=(MX("mx1", Smtp(cert=Cert.WRONG_NAME),
                                           tlsa=(Tlsa(2, 1, 1, TlsaTarget.TA),)),)),
    Domain("dane-mismatch", S, mx=(MX("mx1", tlsa=(Tlsa(3, 1, 1, TlsaTarget.WRONG),)),)),
    Domain("dane-unsigned", U, mx=(MX("mx1", Smtp(cert=Cert.SELF_SIGNED),
                                      tlsa=(Tlsa(3, 1, 1, TlsaTarget.WRONG),)),)),
    Domain("dane-full", S, mx=(MX("mx1", tlsa=(Tlsa(3, 1, 1), Tlsa(2, 1, 1, TlsaTarget.TA))),),
           mta_sts=MtaSts("enforce"), tlsrpt=True),
    Domain("two-mx", S, mx=(MX("mx1"), MX("mx2", Smtp(Tls.NONE), preference=20))),
    Domain("cname-mx", S, mx=(MX("mx1", via_cname=True),)),
    Domain("null-mx", S, null_mx=True),
    Domain("implicit", S, implicit=Smtp()),
    Domain("no-host", S),
    Domain("bogus", B, mx=(MX("mx1"),)),
    Domain("hang", U, mx=(MX("mx1", Smtp(Tls.HANG)),)),
    Domain("hang-second", S, mx=(MX("mx1"), MX("mx2", Smtp(Tls.HANG), preference=20))),
    # for delivery tests: switched to plaintext, or to an attacker's certificate, at run time
    Domain("degrades", U, mx=(MX("mx1", Smtp(Tls.TLS12)),)),
    Domain("falls", S, mx=(MX("mx1"),)),
    Domain("sts-blocked", U, mx=(MX("mx1"),), mta_sts=MtaSts("enforce")),
    Domain("dane-falls", S, mx=(MX("mx1", Smtp(cert=Cert.SELF_SIGNED), tlsa=(Tlsa(3, 1, 1),)),)),
)
