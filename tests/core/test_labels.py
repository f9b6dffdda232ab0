"""Purview ``msip_labels`` parsing and matching: realistic folded samples, hostile values."""

from __future__ import annotations

import pytest

from tlsmilter.core.labels import Label, LabelRules, is_guid, matches, parse

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
CONFIDENTIAL = "f42aa342-8706-4288-bd11-ebb85995028c"
GENERAL = "1a19d03a-48bc-4359-8038-5b5f6d5847c3"


def outlook(guid: str, name: str, *, site: str = TENANT, enabled: str = "true",
            method: str = "Privileged") -> str:
    """One label as Exchange Online folds it: a field per line, continuation lines indented."""
    return (f"MSIP_Label_{guid}_Enabled={enabled};\r\n"
            f" MSIP_Label_{guid}_SetDate=2024-03-01T09:12:44Z;\r\n"
            f" MSIP_Label_{guid}_Method={method};\r\n"
            f" MSIP_Label_{guid}_Name={name};\r\n"
            f" MSIP_Label_{guid}_SiteId={site};\r\n"
            f" MSIP_Label_{guid}_ActionId=8e2bd3c1-27e8-4ad4-9b8e-5f0e4fe2f7a1;\r\n"
            f" MSIP_Label_{guid}_ContentBits=0")


RULES = LabelRules.build({CONFIDENTIAL: "confidential", f"{GENERAL}@{TENANT}": "personal"},
                         {"Highly Confidential": "private"})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([outlook(CONFIDENTIAL, "Confidential")], [("confidential", CONFIDENTIAL)]),
        # Upper-case GUIDs (older clients) and a label of another tenant under a
        # tenant-bound rule.
        ([outlook(CONFIDENTIAL.upper(), "Confidential")], [("confidential", CONFIDENTIAL)]),
        ([outlook(GENERAL, "General", site=OTHER_TENANT)], []),
        ([outlook(GENERAL, "General")], [("personal", f"{GENERAL}@{TENANT}")]),
        # A label removed by the user: Enabled=false.
        ([outlook(CONFIDENTIAL, "Confidential", enabled="false")], []),
        # Unreadable Enabled or no SiteId never makes a configured label count less.
        ([outlook(CONFIDENTIAL, "Confidential", enabled="yes?")],
         [("confidential", CONFIDENTIAL)]),
        ([f"MSIP_Label_{GENERAL}_Enabled=true"], [("personal", f"{GENERAL}@{TENANT}")]),
        # Two tenants in one header; a label split over two headers.
        ([outlook(GENERAL, "General", site=OTHER_TENANT) + ";\r\n "
          + outlook(CONFIDENTIAL, "Confidential")], [("confidential", CONFIDENTIAL)]),
        ([f"MSIP_Label_{CONFIDENTIAL}_Enabled=true", f"MSIP_Label_{CONFIDENTIAL}_Name=x"],
         [("confidential", CONFIDENTIAL)]),
        # By display name, whitespace and case aside.
        ([outlook("11111111-2222-4333-8444-555555555555", "highly  CONFIDENTIAL")],
         [("private", "highly confidential")]),
        # "false" given after "true" does not switch it off.
        ([f"MSIP_Label_{CONFIDENTIAL}_Enabled=true;MSIP_Label_{CONFIDENTIAL}_Enabled=false"],
         [("confidential", CONFIDENTIAL)]),
        # Garbage.
        (["", ";;;", "=", "MSIP_Label_", "MSIP_Label__Enabled=true", "\x00\udcff;=;",
          "MSIP_Label_zz_Enabled=true", "Sensitivity=Confidential"], []),
    ],
)
def test_matching(headers: list[str], expected: list[tuple[str, str]]) -> None:
    assert list(matches(parse(headers), RULES)) == expected


def test_parse_reads_every_field() -> None:
    (label,) = parse([outlook(CONFIDENTIAL, "Vertrouwelijk  intern")])
    assert label == Label(CONFIDENTIAL, "true", TENANT, "Vertrouwelijk intern")


def test_a_thousand_labels_and_a_huge_header() -> None:
    many = ";\r\n ".join(outlook(f"{i:08x}-0000-4000-8000-000000000000", f"L{i}")
                         for i in range(1000))
    found = parse([many + ";\r\n " + outlook(CONFIDENTIAL, "Confidential")])
    assert len(found) == 1001
    assert list(matches(found, RULES)) == [("confidential", CONFIDENTIAL)]
    huge = "MSIP_Label_" + "a" * 1_000_000 + "_Enabled=true;" + "x" * 1_000_000
    assert parse([huge]) == []


@pytest.mark.parametrize(("text", "ok"), [(CONFIDENTIAL, True), (CONFIDENTIAL.upper(), True),
                                          ("f42aa342870642888bd11ebb85995028c", False),
                                          (CONFIDENTIAL + "0", False), ("", False)])
def test_is_guid(text: str, ok: bool) -> None:
    assert is_guid(text) is ok
