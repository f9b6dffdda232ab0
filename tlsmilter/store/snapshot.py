"""The embedded cache on disk, so assessments survive a restart: a versioned file, written
atomically.

The file is a header and the entries, each with its assessment exactly as the memory cache
holds it (``store.packing``), so saving and loading never parse JSON. Nothing in it is
executed or unpickled: a damaged file fails the checksum or the framing and is set aside.

    header  MAGIC, format version (u16), packing dictionary id (8 bytes), entry count (u32),
            CRC-32 of the body (u32)
    entry   stored_at, fresh_until, usable_until (wall-clock seconds, f64 each), lengths of
            level (u8), domain (u16) and packed assessment (u32), then those three

Times are wall-clock on disk: the memory cache's monotonic clock starts again at each boot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from tlsmilter.errors import TlsmilterError
from tlsmilter.store.packing import DICTIONARY_ID

log = logging.getLogger(__name__)

MAGIC = b"TLSMSNAP"
VERSION = 1
FILE_NAME = "assessments.snapshot"
_HEADER = struct.Struct("<8sH8sII")
_ENTRY = struct.Struct("<dddBHI")


class SnapshotError(TlsmilterError):
    """A snapshot that cannot be loaded: damaged, or written by an incompatible release."""

    def __init__(self, reason: str, *, incompatible: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.incompatible = incompatible


class Record(NamedTuple):
    """One saved cache entry; times are wall-clock (``time.time()``) seconds.

    A tuple: 100k of them are made at every save and load (a frozen dataclass is 3x slower).
    """

    domain: str
    level: str
    stored_at: float
    fresh_until: float
    usable_until: float
    packed: bytes


def encode(records: Iterable[Record]) -> bytes:
    """The snapshot file's bytes for ``records`` (kept in their order)."""
    body = bytearray()
    count = 0
    for record in records:
        level, domain = record.level.encode(), record.domain.encode()
        body += _ENTRY.pack(record.stored_at, record.fresh_until, record.usable_until,
                            len(level), len(domain), len(record.packed))
        body += level + domain + record.packed
        count += 1
    return _HEADER.pack(MAGIC, VERSION, DICTIONARY_ID, count, zlib.crc32(body)) + body


def decode(data: bytes) -> list[Record]:
    """The records in a snapshot file's bytes; ``SnapshotError`` when it cannot be used."""
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise SnapshotError("not a tlsmilter snapshot")
    _magic, version, dictionary, count, crc = _HEADER.unpack_from(data)
    if version != VERSION:
        raise SnapshotError(f"format version {version}, this release reads {VERSION}",
                            incompatible=True)
    if dictionary != DICTIONARY_ID:
        raise SnapshotError("written by a release that packs assessments differently",
                            incompatible=True)
    body = memoryview(data)[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise SnapshotError("checksum mismatch (truncated or damaged)")
    try:
        records = list(_records(body))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"damaged entry: {exc}") from None
    if len(records) != count:
        raise SnapshotError(f"{len(records)} entries, the header says {count}")
    return records


def _records(body: memoryview) -> Iterator[Record]:
    offset = 0
    while offset < len(body):
        stored_at, fresh_until, usable_until, n_level, n_domain, n_packed = \
            _ENTRY.unpack_from(body, offset)
        offset += _ENTRY.size
        end = offset + n_level + n_domain + n_packed
        if end > len(body):
            raise ValueError("entry runs past the end of the file")
        level = str(body[offset:offset + n_level], "utf-8")
        domain = str(body[offset + n_level:offset + n_level + n_domain], "utf-8")
        yield Record(domain, level, stored_at, fresh_until, usable_until,
                     bytes(body[offset + n_level + n_domain:end]))
        offset = end


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader (or a crash) sees the old file or the new one,
    never a part. Written to a temporary file in the same directory, synced, renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    # The rename itself is durable only once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def set_aside(path: Path, suffix: str) -> str:
    """Rename an unusable state file to ``<name><suffix>`` so the next save starts afresh;
    what became of it, for the one log line that says so."""
    aside = path.with_name(path.name + suffix)
    try:
        path.replace(aside)
    except OSError as exc:
        return f"left in place ({exc.strerror or exc})"
    return f"set aside as {aside.name}"


class StateFile:
    """The snapshot file in a state directory; failures are logged, never raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    @classmethod
    def open(cls, state_dir: str) -> StateFile | None:
        """The state file in ``state_dir``, created if missing; None (logged once) when the
        directory cannot be made or written: tlsmilter then runs without persistence."""
        directory = Path(state_dir)
        probe = directory / f".{FILE_NAME}.probe"
        try:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            log.warning("cache.state_dir %s is not writable (%s): assessments will not "
                        "survive a restart", directory, exc.strerror or exc)
            return None
        return cls(directory / FILE_NAME)

    def load(self) -> list[Record]:
        """The saved records; none when there is no file. A file that cannot be used is set
        aside (renamed) with one log line, so the next save starts afresh."""
        try:
            return decode(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, SnapshotError) as exc:
            reason = exc.reason if isinstance(exc, SnapshotError) else (exc.strerror or exc)
            incompatible = isinstance(exc, SnapshotError) and exc.incompatible
            where = set_aside(self.path, ".incompatible" if incompatible else ".corrupt")
            log.warning("cache snapshot %s not loaded, %s: %s; starting with an empty cache",
                        self.path, where, reason)
            return []

    def save(self, records: Iterable[Record]) -> bool:
        """Write ``records``; a failure is logged once until a save works again."""
        try:
            write_atomically(self.path, encode(records))
        except OSError as exc:
            if not self._failing:
                log.warning("cannot save the cache snapshot %s: %s", self.path,
                            exc.strerror or exc)
            self._failing = True
            return False
        if self._failing:
            log.info("cache snapshot %s saved again", self.path)
        self._failing = False
        return True
