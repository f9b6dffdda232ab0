"""Test messages, and submitting them to a lab Postfix."""

from __future__ import annotations

import smtplib
from collections.abc import Mapping
from email.message import EmailMessage

SENDER = "sender@postfix.lab.invalid"  # local to the lab Postfix: its bounces are discarded


def message(to: str, subject: str, headers: Mapping[str, str] | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content("lab test body\n")
    return msg


def submit(address: tuple[str, int], msg: EmailMessage) -> None:
    """Send over SMTP; smtplib's exceptions carry Postfix's (or the milter's) refusal."""
    # local_hostname: otherwise smtplib waits on a DNS lookup of this host's name.
    with smtplib.SMTP(*address, local_hostname="client.lab.invalid", timeout=30) as smtp:
        smtp.send_message(msg)


def submit_raw(address: tuple[str, int], recipients: list[str],
               msg: EmailMessage) -> tuple[int, str]:
    """Send with each ``RCPT TO:`` argument exactly as given (smtplib would rewrite odd ones
    such as ``<@domain>``); every recipient must be accepted. The reply to the message."""
    with smtplib.SMTP(*address, local_hostname="client.lab.invalid", timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        for rcpt in recipients:
            code, text = smtp.docmd(f"RCPT TO:{rcpt}")
            assert code == 250, (rcpt, code, text)
        code, reply = smtp.data(msg.as_bytes())
    return code, reply.decode()
