"""Probe one MX address: connect, EHLO, STARTTLS, handshake, keep the presented chain.

The handshake is deliberately unverified and allows TLS 1.0 so that we can *see* what a server
offers (old versions, self-signed certificates) and judge it afterwards in ``certs``; the
session never carries mail.
"""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import functools
import ssl
import time
import warnings

from cryptography import x509

from tlsmilter.assess.model import AddressProbe

SMTP_PORT = 25
MAX_REPLY_LINES = 100  # a server that sends more is broken or hostile


class _SmtpFailure(Exception):
    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


@functools.cache
def _probe_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # Accept everything so the version actually offered can be reported; the rating decides.
    # Python deprecates TLS 1.0 for use; seeing it is exactly what we need it for.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


async def probe_address(
    address: str,
    host: str,
    *,
    ehlo_name: str,
    connect_timeout: float,
    smtp_timeout: float,
    tls_timeout: float,
    port: int = SMTP_PORT,
) -> tuple[AddressProbe, list[x509.Certificate]]:
    """Probe ``address`` (serving MX ``host``); never raises for remote behaviour."""
    result = AddressProbe(address=address)
    chain: list[x509.Certificate] = []
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(address, port)
        except (OSError, TimeoutError) as exc:
            raise _SmtpFailure(f"connect failed: {_describe(exc)}", temporary=True) from None
        result.connected = True
        await _expect(reader, None, 220, smtp_timeout, "greeting")
        code, lines = await _command(reader, writer, f"EHLO {ehlo_name}", smtp_timeout)
        if code != 250:
            await _expect(reader, writer, 250, smtp_timeout, f"HELO {ehlo_name}")
            lines = []
        result.starttls = any(line[4:].strip().upper() == "STARTTLS" for line in lines[1:])
        if not result.starttls:
            await _quit(reader, writer)
            return result, chain
        code, lines = await _command(reader, writer, "STARTTLS", smtp_timeout)
        if code != 220:
            result.error = f"STARTTLS refused: {lines[-1] if lines else code}"
            return result, chain
        try:
            async with asyncio.timeout(tls_timeout):
                await writer.start_tls(_probe_context(), server_hostname=host)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            result.error = f"TLS handshake failed: {_describe(exc)}"
            return result, chain
        ssl_object = writer.get_extra_info("ssl_object")
        result.tls_version = ssl_object.version()
        cipher = ssl_object.cipher()
        result.cipher = cipher[0] if cipher else None
        chain = _peer_chain(ssl_object)
        result.chain = [c.subject.rfc4514_string() for c in chain]
        with contextlib.suppress(_SmtpFailure, OSError, TimeoutError, ssl.SSLError):
            await _command(reader, writer, f"EHLO {ehlo_name}", smtp_timeout)
            await _quit(reader, writer)
    except _SmtpFailure as exc:
        result.error = str(exc)
        result.temporary = exc.temporary
    finally:
        result.duration = time.monotonic() - started
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()
    return result, chain


def _peer_chain(ssl_object: ssl.SSLObject) -> list[x509.Certificate]:
    """The whole presented chain, leaf first.

    Python 3.11 has no public API for it (3.13 adds ``get_unverified_chain``); the private
    method exists since 3.10. Fall back to the leaf alone.
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        inner = getattr(ssl_object, "_sslobj", None)
        getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        ders = [c.public_bytes(_ssl.ENCODING_DER) if hasattr(c, "public_bytes") else c
                for c in getter() or []]
    else:
        leaf = ssl_object.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(der) for der in ders]


async def _read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, list[str]]:
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while len(lines) < MAX_REPLY_LINES:
            raw = await reader.readline()
            if not raw:
                raise _SmtpFailure("connection closed by server", temporary=True)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
    code = lines[-1][:3] if lines else ""
    if not code.isdigit():
        raise _SmtpFailure(f"malformed SMTP reply {lines[-1][:60]!r}", temporary=False)
    return int(code), lines


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: str,
                   timeout: float) -> tuple[int, list[str]]:
    writer.write(command.encode("ascii") + b"\r\n")
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
        return await _read_reply(reader, timeout)
    except TimeoutError:
        raise _SmtpFailure(f"timed out waiting for reply to {command.split()[0]}",
                           temporary=True) from None
    except OSError as exc:
        raise _SmtpFailure(f"{command.split()[0]}: {_describe(exc)}", temporary=True) from None


async def _expect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                  code: int, timeout: float, what: str) -> None:
    """Read the greeting (no writer) or send ``what`` as a command, and require ``code``."""
    try:
        if writer is None:
            got, lines = await _read_reply(reader, timeout)
        else:
            got, lines = await _command(reader, writer, what, timeout)
    except TimeoutError:
        raise _SmtpFailure(f"timed out waiting for {what}", temporary=True) from None
    except OSError as exc:
        raise _SmtpFailure(f"{what}: {_describe(exc)}", temporary=True) from None
    if got != code:
        # 4xx is the server saying "later"; anything else is a refusal.
        raise _SmtpFailure(f"{what} answered {lines[-1][:80]!r}", temporary=400 <= got < 500)


async def _quit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(_SmtpFailure, OSError, TimeoutError):
        await _command(reader, writer, "QUIT", 2.0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
