"""Netstrings (https://cr.yp.to/proto/netstrings.txt), as Postfix's socketmap speaks them."""

from __future__ import annotations

from tlsmilter.errors import TlsmilterError

MAX_REQUEST = 10_000  # Postfix sends "<name> <domain>": a few hundred bytes at most


class NetstringError(TlsmilterError):
    """Input that is not a netstring (or too long to be a request); carries the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed netstring: {reason}")


def encode_netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


class NetstringDecoder:
    """Incremental netstring parser: ``feed`` bytes as they come, take frames one by one.

    Strict on purpose: Postfix writes canonical netstrings, so anything else (leading
    zeros, whitespace, a missing ``,``, a length over ``max_length``) is an error, found as
    early as possible. Memory stays bounded by ``max_length`` plus one read.
    """

    def __init__(self, max_length: int = MAX_REQUEST) -> None:
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buffer = bytearray()

    @property
    def pending(self) -> bool:
        """True while part of a frame is buffered."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete payload, or None until more bytes arrive."""
        buf = self._buffer
        colon = buf.find(b":", 0, self._max_digits + 1)
        if colon < 0:
            head = bytes(buf[:self._max_digits + 1])
            if not head.isdigit() and head:
                raise NetstringError("length is not a decimal number")
            if len(head) > self._max_digits:
                raise NetstringError(f"length over {self.max_length}")
            self._check_digits(head)
            return None
        digits = bytes(buf[:colon])
        if not digits or not digits.isdigit():
            raise NetstringError("length is not a decimal number")
        self._check_digits(digits)
        length = int(digits)
        if length > self.max_length:
            raise NetstringError(f"length {length} over {self.max_length}")
        end = colon + 1 + length
        if len(buf) <= end:
            return None
        if buf[end] != ord(","):
            raise NetstringError("no ',' after the data")
        payload = bytes(buf[colon + 1:end])
        del buf[:end + 1]
        return payload

    @staticmethod
    def _check_digits(digits: bytes) -> None:
        if len(digits) > 1 and digits.startswith(b"0"):
            raise NetstringError("length has a leading zero")
