"""The client side of the control socket: one JSON request line, one JSON answer line."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

SOCKET_NAME = "control.sock"


def exchange(spool: Path, request: dict[str, Any], timeout: float) -> bytes:
    """Send ``request`` to the daemon of ``spool``; its answer line (b"" if it closed the
    connection without one). Raises OSError when the daemon cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(spool / SOCKET_NAME))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data
