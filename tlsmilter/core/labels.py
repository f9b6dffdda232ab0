"""Microsoft Purview sensitivity labels, as Outlook and Exchange write them. Pure.

The ``msip_labels:`` header holds ``;``-separated fields, several per label::

    msip_labels: MSIP_Label_<GUID>_Enabled=true;
     MSIP_Label_<GUID>_SetDate=2024-03-01T09:12:44Z; MSIP_Label_<GUID>_Method=Privileged;
     MSIP_Label_<GUID>_Name=Confidential; MSIP_Label_<GUID>_SiteId=<tenant GUID>; ...

Labels of several tenants may share one header. A rule names a label by its GUID, optionally
restricted to one tenant (``GUID@SITEID``), or by its display name. Whatever the header holds,
parsing never raises, and an unreadable field never makes a configured label count less: only
an explicit ``Enabled=false`` or another tenant's ``SiteId`` sets a label aside.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

HEADER = "msip_labels"
_FIELD = re.compile(r"MSIP_Label_([0-9A-Fa-f-]{1,64})_(\w{1,32})", re.ASCII)
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_guid(text: str) -> bool:
    """``text`` is a GUID in its usual hyphenated form (any case)."""
    return _GUID.fullmatch(text.lower()) is not None


@dataclass(frozen=True)
class Label:
    """One label of a header, by its GUID (lower case)."""

    guid: str
    enabled: str = ""  # as written, lower case: "true", "false", or something unreadable
    site_id: str = ""  # the tenant, lower case; "" if the header does not say
    name: str = ""


def parse(values: Iterable[str]) -> list[Label]:
    """Every label named in ``values`` (the ``msip_labels`` headers), in order of appearance."""
    fields: dict[str, dict[str, str]] = {}
    for value in values:
        for part in value.split(";"):
            key, sep, text = part.partition("=")
            match = _FIELD.fullmatch(key.strip())
            if match is None:
                continue
            guid, name = match.group(1).lower(), match.group(2).lower()
            label = fields.setdefault(guid, {})
            # A field given twice keeps its first value, but "false" never wins over "true".
            if sep and (name not in label or (name == "enabled" and label[name] != "true")):
                label[name] = " ".join(text.split())
    return [Label(guid, f.get("enabled", "").lower(), f.get("siteid", "").lower(),
                  f.get("name", "")) for guid, f in fields.items()]


@dataclass(frozen=True)
class LabelRules:
    """Which labels make mail sensitive: label GUID, ``GUID@SITEID`` or display name to a
    policy name. Keys are compared case-insensitively."""

    by_guid: Mapping[str, str]
    by_name: Mapping[str, str]

    @classmethod
    def build(cls, guids: Mapping[str, str], names: Mapping[str, str]) -> LabelRules:
        return cls({k.strip().lower(): v for k, v in guids.items()},
                   {" ".join(k.split()).lower(): v for k, v in names.items()})


def matches(labels: Iterable[Label], rules: LabelRules) -> Iterator[tuple[str, str]]:
    """``(policy name, rule key)`` for every label a rule names; disabled ones left out."""
    for label in labels:
        if label.enabled == "false":
            continue
        for key in (f"{label.guid}@{label.site_id}" if label.site_id else "", label.guid):
            if key and key in rules.by_guid and _tenant_fits(key, label):
                yield rules.by_guid[key], key
        # Without a SiteId a tenant-bound rule still applies: unreadable never means less.
        if not label.site_id:
            for key, policy in rules.by_guid.items():
                if key.startswith(label.guid + "@"):
                    yield policy, key
        name = " ".join(label.name.split()).lower()
        if name and name in rules.by_name:
            yield rules.by_name[name], name


def _tenant_fits(key: str, label: Label) -> bool:
    _guid, _at, tenant = key.partition("@")
    return not tenant or tenant == label.site_id
