"""Local submission (sendmail, the offline queue) through the ``listen on socket`` listener.

The daemon opens a socketpair, attaches an ordinary SMTP session to one end with the socket
listener's settings, and speaks SMTP on the other end. The mail so takes exactly the path of
any other local submission: ``from socket``/``from local`` rules, the Received line with
ESMTPA from ``localhost [local]``, Date/Message-ID completion, the same logs and stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pigeon.queue.offline import Submission
from pigeon.server.listener import ListenerRuntime

if TYPE_CHECKING:
    from pigeon.config.model import Config
    from pigeon.filters.runtime import FilterManager
    from pigeon.server.services import Services

REPLY_TIMEOUT = 300.0


@dataclass
class SubmitResult:
    ok: bool
    reply: str  # the deciding reply line, e.g. "250 2.0.0 1a2b3c4d Message accepted..."

    @property
    def temporary(self) -> bool:
        return not self.ok and not self.reply.startswith("5")


def socket_runtime(
    config: Config, hostname: str, filters: FilterManager | None = None
) -> ListenerRuntime:
    """Sessions of the local socket listener (always present, implicit when not written);
    ``listen on socket filter NAME`` runs them through that chain of ``filters``."""
    listener = next((lst for lst in config.listeners if lst.kind == "socket"), None)
    smtp = config.smtp
    chain = None
    if filters is not None and listener is not None and listener.filter is not None:
        chain = filters.chain(listener.filter)
    return ListenerRuntime(
        hostname=(listener.hostname if listener and listener.hostname else hostname),
        socket=True,
        tag=listener.tag if listener else None,
        mask_src=bool(listener and listener.mask_src),
        # OpenSMTPD refuses DSN parameters here, which breaks `sendmail -N`
        # (delivery-queue.md 3.4); Pigeon accepts them.
        dsn=True,
        max_message_size=smtp.max_message_size,
        max_rcpt=smtp.max_rcpt,
        max_mails=smtp.max_mails,
        filter_chain=chain,
    )


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, ending in CRLF."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..")


def _xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and non-printables as +HH."""
    out = []
    for ch in value:
        if ch in "+=" or not (33 <= ord(ch) <= 126):
            out.append("".join(f"+{b:02X}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


async def _reply(reader: asyncio.StreamReader) -> str:
    """One (possibly multi-line) reply; its last line."""
    for _ in range(1000):
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if not line:
            raise ConnectionError("session closed")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if len(text) < 4 or text[3] != "-":
            return text
    raise ConnectionError("reply too long")


async def submit(services: Services, runtime: ListenerRuntime, sub: Submission) -> SubmitResult:
    """Enqueue ``sub`` through an in-process session; the result says what the session said."""
    from pigeon.server.session import SMTPSession

    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    try:
        await loop.connect_accepted_socket(lambda: SMTPSession(services, runtime), sock=theirs)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    reader, writer = await asyncio.open_connection(sock=ours)

    async def command(line: str, expect: str) -> str | None:
        writer.write(line.encode() + b"\r\n")
        reply = await _reply(reader)
        return None if reply.startswith(expect) else reply

    try:
        banner = await _reply(reader)
        if not banner.startswith("2"):
            return SubmitResult(False, banner)
        if (bad := await command("EHLO localhost", "2")) is not None:
            return SubmitResult(False, bad)
        mail = f"MAIL FROM:<{sub.sender}>"
        if sub.ret:
            mail += f" RET={sub.ret.upper()}"
        if sub.envid:
            mail += f" ENVID={_xtext(sub.envid)}"
        if (bad := await command(mail, "2")) is not None:
            return SubmitResult(False, bad)
        accepted = 0
        first_refusal = None
        for rcpt in sub.recipients:
            line = f"RCPT TO:<{rcpt}>"
            if sub.notify:
                line += f" NOTIFY={sub.notify.upper()}"
            if rcpt in sub.orcpts:
                line += f" ORCPT=rfc822;{_xtext(sub.orcpts[rcpt])}"
            bad = await command(line, "2")
            if bad is None:
                accepted += 1
            elif first_refusal is None:
                first_refusal = bad
        # sendmail semantics: one refused recipient fails the whole submission, so the
        # caller (or the offline queue) can retry it as a whole.
        if first_refusal is not None or not accepted:
            return SubmitResult(False, first_refusal or "554 5.5.1 No valid recipients")
        if (bad := await command("DATA", "354")) is not None:
            return SubmitResult(False, bad)
        writer.write(dot_stuff(sub.message) + b".\r\n")
        final = await _reply(reader)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await command("QUIT", "2")
        return SubmitResult(final.startswith("2"), final)
    except (ConnectionError, TimeoutError) as exc:
        return SubmitResult(False, f"451 4.3.0 Local submission failed: {exc}")
    finally:
        writer.close()
