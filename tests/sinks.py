"""An aiosmtpd handler that records what it is given, shared by the integration tests that
relay or deliver to a sink (SMTP or LMTP). Subclasses refuse on cue in ``refuse_rcpt``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import ClassVar

from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession


@dataclass(frozen=True)
class Received:
    sender: str
    rcpts: list[str]
    data: bytes


@dataclass
class RecordingHandler:
    """Accepts every recipient ``refuse_rcpt`` lets through and every message; records the
    RCPT addresses asked and the messages taken (aiosmtpd runs it in its own thread)."""

    messages: list[Received] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse_rcpt(self, address: str) -> str | None:
        """The reply refusing ``address``, or None to accept it."""
        return None

    async def handle_RCPT(
        self,
        server: AioSMTP,
        session: AioSession,
        envelope: AioEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.lock:
            self.rcpts.append(address)
        refusal = self.refuse_rcpt(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: AioSMTP, session: AioSession, envelope: AioEnvelope) -> str:
        self.record(envelope)
        return self.data_reply

    data_reply: ClassVar[str] = "250 2.0.0 Ok"

    def record(self, envelope: AioEnvelope) -> None:
        message = Received(
            str(envelope.mail_from),
            list(envelope.rcpt_tos),
            bytes(envelope.original_content or b""),
        )
        with self.lock:
            self.messages.append(message)

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def with_subject(self, subject: str) -> list[Received]:
        return [m for m in self.received() if f"Subject: {subject}".encode() in m.data]
