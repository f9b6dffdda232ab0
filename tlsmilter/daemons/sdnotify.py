"""systemd's notify protocol (``Type=notify``): tell systemd when a daemon is ready or stops."""

from __future__ import annotations

import contextlib
import os
import socket


def sd_notify(message: str) -> None:
    """Send ``message`` (e.g. ``READY=1``) to systemd; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)
