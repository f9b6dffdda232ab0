"""daemons.netstring: netstrings as Postfix's socketmap speaks them, table-driven at several
read sizes."""

from __future__ import annotations

import pytest

from tlsmilter.daemons.netstring import NetstringDecoder, NetstringError, encode_netstring


def test_encode_netstring() -> None:
    assert encode_netstring(b"OK dane-only") == b"12:OK dane-only,"
    assert encode_netstring(b"") == b"0:,"


def decode_all(data: bytes, chunk: int, max_length: int = 100) -> tuple[list[bytes], bool]:
    """Feed ``data`` ``chunk`` bytes at a time; frames so far, and whether a frame is pending.

    Raises NetstringError, carrying the frames decoded before it as ``frames``.
    """
    decoder = NetstringDecoder(max_length)
    frames: list[bytes] = []
    for start in range(0, len(data), chunk):
        decoder.feed(data[start:start + chunk])
        try:
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
        except NetstringError as exc:
            exc.add_note(repr(frames))
            raise PartialError(frames, exc) from exc
    return frames, decoder.pending


class PartialError(Exception):
    def __init__(self, frames: list[bytes], error: NetstringError) -> None:
        self.frames = frames
        self.error = error


CHUNKS = [1, 2, 3, 7, 1000]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("data", "frames", "pending"), [
    (b"21:tlspolicy example.com,", [b"tlspolicy example.com"], False),
    (b"3:abc,1:d,0:,", [b"abc", b"d", b""], False),
    (b"5:a:b,c,", [b"a:b,c"], False),
    (b"3:ab,,", [b"ab,"], False),
    (b"3:\xff\x00\xfe,", [b"\xff\x00\xfe"], False),
    (b"100:" + b"x" * 100 + b",", [b"x" * 100], False),
    (b"3:abc,4:de", [b"abc"], True),
    (b"3:abc", [], True),
    (b"3", [], True),
    (b"", [], False),
])
def test_decoder_valid(data: bytes, frames: list[bytes], pending: bool, chunk: int) -> None:
    assert decode_all(data, chunk) == (frames, pending)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(("data", "before"), [
    pytest.param(b"x:abc,", [], id="non-digit-length"),
    pytest.param(b"-1:a,", [], id="negative-length"),
    pytest.param(b"+1:a,", [], id="plus-sign"),
    pytest.param(b" 1:a,", [], id="leading-space"),
    pytest.param(b":abc,", [], id="empty-length"),
    pytest.param(b"01:a,", [], id="leading-zero"),
    pytest.param(b"00:,", [], id="leading-zero-of-zero"),
    pytest.param(b"101:", [], id="length-over-max"),
    pytest.param(b"99999999999999999999", [], id="endless-digits"),
    pytest.param(b"1234", [], id="too-many-digits-no-colon"),
    pytest.param(b"3:abcd", [], id="no-trailing-comma"),
    pytest.param(b"3:ab,,,", [b"ab,"], id="comma-in-data-then-stray-comma"),
    pytest.param(b"1:a,\n1:b,", [b"a"], id="newline-between"),
    pytest.param(b"1:a,,1:b,", [b"a"], id="garbage-between"),
    pytest.param(b"1:a,1:b,xyz", [b"a", b"b"], id="garbage-after"),
])
def test_decoder_malformed(data: bytes, before: list[bytes], chunk: int) -> None:
    with pytest.raises(PartialError) as caught:
        decode_all(data, chunk)
    assert caught.value.frames == before
