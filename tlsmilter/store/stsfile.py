"""The embedded backend's MTA-STS policy cache on disk, beside the assessment snapshot.

RFC 8461's policy cache only defeats an attacker who blocks the policy fetch if it outlives
the sender's restarts, so ``tlsmilter serve`` saves it in ``cache.state_dir`` with the
snapshot and loads it at start. A small versioned JSON file (``CachedPolicy.to_json`` per
domain), written atomically; expired policies are dropped at load; a file that cannot be used
is set aside with one log line, like the snapshot.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tlsmilter.assess.mtasts import CachedPolicy
from tlsmilter.store import snapshot

log = logging.getLogger(__name__)

FILE_NAME = "sts-policies.json"
VERSION = 1


def save_policies(path: Path, items: list[tuple[str, CachedPolicy]]) -> bool:
    """Write ``items`` to ``path``; False (logged at debug) when that fails."""
    text = json.dumps({"version": VERSION,
                       "policies": {domain: cached.to_json() for domain, cached in items}},
                      separators=(",", ":"))  # in order: least recently used first
    try:
        snapshot.write_atomically(path, text.encode())
    except OSError as exc:
        log.debug("cannot save MTA-STS policies to %s: %s", path, exc.strerror or exc)
        return False
    return True


def load_policies(path: Path, *, set_aside: bool = True) -> list[tuple[str, CachedPolicy]]:
    """The saved policies; none when there is no file. An unusable file is set aside (with
    ``set_aside``; a reader that does not own the file, ``tlsmilter check``, leaves it)."""
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"not version {VERSION}")
        policies = data["policies"]
        if not isinstance(policies, dict):
            raise ValueError("no policies")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError) as exc:
        if not set_aside:
            log.debug("MTA-STS policy cache %s not read: %s", path, exc)
            return []
        log.warning("MTA-STS policy cache %s not loaded, %s: %s", path,
                    snapshot.set_aside(path, ".corrupt"), exc)
        return []
    items = []
    for domain, raw in policies.items():
        cached = CachedPolicy.from_json(raw)
        if isinstance(domain, str) and cached is not None:
            items.append((domain, cached))
    return items
