"""The transport side of an in-memory peer for an ``asyncio.Protocol`` under test (the relay
client's ClientSession): subclasses decide what to answer in ``write``."""

from __future__ import annotations

import asyncio
from typing import Any


class FakeTransport:
    def __init__(self, protocol: asyncio.Protocol) -> None:
        self.session: Any = protocol
        self.loop = asyncio.get_running_loop()
        self.closing = False

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def say(self, data: bytes) -> None:
        """Bytes from the peer, delivered as a later loop callback (as a socket would)."""
        self.loop.call_soon(self.session.data_received, data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.session.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default
