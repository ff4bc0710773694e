"""A real rspamd daemon on 127.0.0.1 for tests, with a minimal local configuration.

Usage::

    with RspamdServer() as rspamd:       # or: rspamd = shared_rspamd()  (one per process)
        rspamd.url          # "http://127.0.0.1:<port>"  (POST <url>/checkv2)
        rspamd.socket_path  # the same scanner on a unix socket
        rspamd.log()        # rspamd's own log, for failure messages

Network modules are off (no DNS reaches the network: the resolver is a dead local port),
GTUBE test patterns are on (``enable_test_patterns``), so the GTUBE strings give: ``XJS*C4J...``
reject (550 "Gtube pattern"), ``YJS*...`` add header, ``ZJS*...`` rewrite subject to
``*** SPAM *** <subject>``. milter_headers adds Authentication-Results, X-Spamd-Bar, ...
for local and authenticated senders too.

As root, rspamd refuses to keep root privileges: it is started with ``-u _rspamd -g _rspamd``
(the Debian package's user) and its work directories are handed to that user; without that
user, ``-i`` (run insecurely as root) is used. Not root: rspamd runs as ourselves.

For the answers real rspamd cannot be made to give on demand, :func:`canned_replies` reads
the captured replies of ``transcripts/rspamd-actions.txt`` and :class:`FakeRspamd` serves one
(asyncio, TCP or unix socket, optional delay, records the requests).

Skips the calling test (pytest.skip) when ``/usr/bin/rspamd`` is missing (Debian package
``rspamd``; CI installs it through the Makefile's TEST_DEBS).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

__all__ = [
    "GTUBE",
    "GTUBE_ADD_HEADER",
    "GTUBE_REWRITE_SUBJECT",
    "FakeRequest",
    "FakeRspamd",
    "RspamdServer",
    "canned_replies",
    "rspamd_binary",
    "shared_rspamd",
]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_ADD_HEADER = "YJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_REWRITE_SUBJECT = "ZJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# Modules that would reach the network, need redis, or slow every scan down.
_DISABLED_MODULES = [
    "rbl",
    "fuzzy_check",
    "asn",
    "dcc",
    "spamassassin",
    "phishing",
    "spf",
    "dmarc",
    "dkim",
    "mx_check",
    "rspamd_update",
    "neural",
    "reputation",
    "url_redirector",
    "greylist",
    "ratelimit",
    "history_redis",
    "multimap",
    "bimi",
    "arc",
    "emails",
    "surbl",
]


def rspamd_binary() -> str | None:
    return shutil.which("rspamd") or (
        "/usr/bin/rspamd" if os.path.exists("/usr/bin/rspamd") else None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RspamdServer:
    """Start with ``with`` (or :meth:`start`/:meth:`stop`); one per test module is enough."""

    def __init__(self, *, extra_options: str = "", start_timeout: float = 60.0) -> None:
        self.port = _free_port()
        self.controller_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._extra_options = extra_options
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        # Not pytest's tmp_path: that is 0700 under root, and rspamd runs as _rspamd.
        self.dir = Path(tempfile.mkdtemp(prefix="pigeon-rspamd-"))
        self.dir.chmod(0o755)
        self.socket_path = str(self.dir / "run" / "rspamd.sock")

    # -- configuration ---------------------------------------------------------------

    def _write_config(self) -> None:
        local = self.dir / "local.d"
        local.mkdir()
        for sub in ("db", "run", "log"):
            (self.dir / sub).mkdir()
        dead_dns = _free_port()  # nothing listens there: lookups fail fast, offline
        (local / "options.inc").write_text(
            "enable_test_patterns = true;\n"
            f'dns {{ nameserver = ["127.0.0.1:{dead_dns}"]; timeout = 0.3s; retransmits = 1; }}\n'
            f"{self._extra_options}\n"
        )
        for module in _DISABLED_MODULES:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        (local / "milter_headers.conf").write_text(
            'use = ["x-spamd-bar", "x-spam-level", "x-spam-status", "x-rspamd-queue-id",'
            ' "authentication-results", "x-virus"];\n'
            "skip_local = false;\nskip_authenticated = false;\n"
        )
        (local / "logging.inc").write_text('level = "info";\n')
        (self.dir / "rspamd.conf").write_text(
            '.include "$CONFDIR/common.conf"\n'
            "options {\n"
            '    pidfile = "$RUNDIR/rspamd.pid";\n'
            '    .include "$CONFDIR/options.inc"\n'
            '    .include(priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"\n'
            "}\n"
            "logging {\n"
            '    type = "file";\n'
            '    filename = "$LOGDIR/rspamd.log";\n'
            '    .include "$CONFDIR/logging.inc"\n'
            '    .include(priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/logging.inc"\n'
            "}\n"
            'worker "normal" {\n'
            f'    bind_socket = "127.0.0.1:{self.port}";\n'
            f'    bind_socket = "{self.socket_path} mode=0666";\n'
            '    .include "$CONFDIR/worker-normal.inc"\n'
            "    count = 1;\n"
            "}\n"
            'worker "controller" {\n'
            f'    bind_socket = "127.0.0.1:{self.controller_port}";\n'
            '    .include "$CONFDIR/worker-controller.inc"\n'
            "    count = 1;\n"
            "}\n"
        )

    def _privilege_args(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        try:
            user = pwd.getpwnam("_rspamd")
        except KeyError:
            return ["-i"]
        for sub in ("db", "run", "log"):
            os.chown(self.dir / sub, user.pw_uid, user.pw_gid)
        return ["-u", "_rspamd", "-g", "_rspamd"]

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> RspamdServer:
        binary = rspamd_binary()
        if binary is None:
            shutil.rmtree(self.dir, ignore_errors=True)
            pytest.skip("rspamd is not installed (Debian package rspamd)")
        self._write_config()
        argv = [
            binary,
            "-f",
            "-c",
            str(self.dir / "rspamd.conf"),
            "--var",
            f"LOCAL_CONFDIR={self.dir}",
            "--var",
            f"DBDIR={self.dir / 'db'}",
            "--var",
            f"RUNDIR={self.dir / 'run'}",
            "--var",
            f"LOGDIR={self.dir / 'log'}",
            *self._privilege_args(),
        ]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "stdout.txt", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as reply:
                    if reply.read().strip() == b"pong":
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        log = self.log()
        self.stop()
        raise RuntimeError(f"rspamd did not start on {self.url}:\n{log[-3000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        parts = []
        for path in (self.dir / "stdout.txt", self.dir / "log" / "rspamd.log"):
            try:
                parts.append(path.read_text(errors="replace"))
            except OSError:
                continue
        return "\n".join(parts)

    def check(self, message: bytes, headers: dict[str, str] | None = None) -> bytes:
        """POST a message to /checkv2 with urllib (a reference client for tests)."""
        request = urllib.request.Request(
            f"{self.url}/checkv2", data=message, headers=headers or {}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            return bytes(reply.read())

    def __enter__(self) -> RspamdServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_shared: RspamdServer | None = None


def shared_rspamd() -> RspamdServer:
    """One rspamd for the whole test process, started on first use and stopped at exit.

    rspamd 3.4 needs about 13 s to load its Lua configuration, so test modules that only
    need *a* default rspamd share this one instead of starting their own.
    """
    global _shared
    if _shared is None:
        server = RspamdServer()
        server.start()
        atexit.register(server.stop)
        _shared = server
    return _shared


# -- canned replies and a fake rspamd ----------------------------------------------------------

TRANSCRIPTS = Path(__file__).parent / "data" / "design" / "transcripts"


def canned_replies(name: str = "rspamd-actions.txt") -> dict[str, tuple[int, bytes]]:
    """``{case: (HTTP status, body)}`` from a captured transcript, e.g. ``"fake-greylist"``."""
    text = (TRANSCRIPTS / name).read_text()
    replies: dict[str, tuple[int, bytes]] = {}
    for block in text.split("== CASE ")[1:]:
        case = block.split("\n", 1)[0].strip()
        _, sep, rest = block.partition("---- response ")
        if not sep:
            continue
        status, _, after = rest.partition(" ----\n")
        body = after.split("\n--- delivered", 1)[0].strip("\n")
        replies[case] = (int(status), body.encode())
    return replies


@dataclass
class FakeRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class FakeRspamd:
    """An asyncio HTTP server playing rspamd: answers ``reply`` (status, body) to every
    request after ``delay`` seconds, and records the requests it got.

    ``async with FakeRspamd() as fake: fake.url`` (TCP on 127.0.0.1), or
    ``FakeRspamd(unix_path=...)`` for a unix socket. ``chunked=True`` answers with
    Transfer-Encoding: chunked, ``close_early=True`` closes without answering.
    """

    reply: tuple[int, bytes] = (200, b'{"action": "no action", "score": 0.0}')
    delay: float = 0.0
    chunked: bool = False
    close_early: bool = False
    unix_path: str | None = None
    requests: list[FakeRequest] = field(default_factory=list)
    url: str = ""
    _server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").split()
            headers: list[tuple[str, str]] = []
            for _ in range(500):
                line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
                if not line:
                    break
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
            length = int(dict((n.lower(), v) for n, v in headers).get("content-length", "0"))
            body = await reader.readexactly(length)
            self.requests.append(FakeRequest(request_line[0], request_line[1], headers, body))
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.close_early:
                return
            status, payload = self.reply
            if self.chunked:
                head = f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                half = len(payload) // 2
                chunks = b"".join(
                    b"%x\r\n%s\r\n" % (len(part), part) for part in (payload[:half], payload[half:])
                )
                writer.write(head + chunks + b"0\r\n\r\n")
            else:
                top = f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n"
                writer.write(top.encode() + b"Connection: close\r\n\r\n" + payload)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> FakeRspamd:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._handle, self.unix_path)
            self.url = self.unix_path
        else:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = self._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
