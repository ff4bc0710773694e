"""Durable-accept benchmark: Pigeon against an aiosmtpd + fsync reference, in alternation.

Usage: python bench/accept.py [-n 2000] [--runs 3] [--idle 5000]

For each scenario (concurrency 1, 10, 50; one message per connection "a", or messages over
kept-open connections "b") the same load generator drives Pigeon and the reference in turn,
``--runs`` times each, and prints medians of messages/s and of transaction latency (p50/p99,
from MAIL FROM to the 250 after DATA), with the Pigeon/reference ratio. Pigeon runs at its
default durability (journal + fdatasync before 250) with local delivery paused (``-P mda``),
so both servers do the same work: accept, store durably, reply. The reference is aiosmtpd
with a handler that writes each message to a file, fsyncs it, renames it and fsyncs the
directory before returning 250 (perf-anchors.md). Finally Pigeon's RSS is measured with
``--idle`` idle connections open, and the time a new client then waits for its banner.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = (
    b"From: bench@example.test\r\nTo: bench@localhost\r\nSubject: bench\r\n\r\n"
    + (b"x" * 76 + b"\r\n") * 52
)  # about 4 KiB

REFERENCE_SERVER = textwrap.dedent(
    """
    import asyncio, os, sys, uuid
    from aiosmtpd.controller import Controller

    class Handler:
        def __init__(self, directory):
            self.directory = directory
        async def handle_DATA(self, server, session, envelope):
            name = uuid.uuid4().hex
            tmp = os.path.join(self.directory, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(envelope.original_content or envelope.content)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(self.directory, "new", name))
            fd = os.open(os.path.join(self.directory, "new"), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            return "250 2.0.0 Message accepted for delivery"

    directory, port = sys.argv[1], int(sys.argv[2])
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    controller = Controller(Handler(directory), hostname="127.0.0.1", port=port,
                            data_size_limit=36700160)
    controller.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        controller.stop()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.recv(512)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


class Server:
    name = ""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class PigeonServer(Server):
    name = "pigeon"

    def start(self) -> None:
        conf = self.dir / "smtpd.conf"
        users = self.dir / "users"
        users.write_text(f"bench {os.getuid()}:{os.getgid()}:{self.dir}/bench\n")
        conf.write_text(
            f"table users file:{users}\n"
            f"listen on 127.0.0.1 port {self.port}\n"
            'action "local" maildir userbase <users>\n'
            'match from any for local action "local"\n'
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pigeon",
                "run",
                "-d",
                "-P",
                "mda",
                "-f",
                str(conf),
                "--spool",
                str(self.dir / "spool"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)


class PigeonAsyncioServer(PigeonServer):
    """Pigeon on the standard asyncio event loop, to show what uvloop changes."""

    name = "pigeon-asyncio"

    def start(self) -> None:
        os.environ["PIGEON_EVENT_LOOP"] = "asyncio"
        try:
            super().start()
        finally:
            del os.environ["PIGEON_EVENT_LOOP"]


class ReferenceServer(Server):
    name = "aiosmtpd"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REFERENCE_SERVER, str(self.dir / "maildir"), str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
        super().stop()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: bytes, expect: bytes
) -> None:
    writer.write(cmd)
    reply = await read_reply(reader)
    if not reply.startswith(expect):
        raise RuntimeError(f"{cmd!r} -> {reply!r}")


async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    start = time.perf_counter()
    await command(reader, writer, b"MAIL FROM:<bench@example.test>\r\n", b"250")
    await command(reader, writer, b"RCPT TO:<bench@localhost>\r\n", b"250")
    await command(reader, writer, b"DATA\r\n", b"354")
    await command(reader, writer, BODY + b".\r\n", b"250")
    return time.perf_counter() - start


async def open_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    await command(reader, writer, b"EHLO bench.example.test\r\n", b"250")
    return reader, writer


async def close_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await command(reader, writer, b"QUIT\r\n", b"221")
    writer.close()


@dataclass
class Result:
    rate: float
    p50: float
    p99: float


async def load(port: int, total: int, concurrency: int, keepalive: bool) -> Result:
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        session = None
        per_session = 0
        for _ in counter:
            if session is None:
                session = await open_session(port)
            latencies.append(await transaction(*session))
            per_session += 1
            # Servers cap mails per session (OpenSMTPD: 100); reconnect before the cap.
            if not keepalive or per_session >= 100:
                await close_session(*session)
                session = None
                per_session = 0
        if session is not None:
            await close_session(*session)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return Result(
        rate=len(latencies) / elapsed,
        p50=latencies[len(latencies) // 2] * 1000,
        p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    )


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def idle_test(server: Server, count: int) -> None:
    base = rss_kib(server.pid())
    conns = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await read_reply(reader)
            conns.append((reader, writer))

    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failures = sum(1 for r in results if isinstance(r, BaseException))
    opened = time.perf_counter() - start
    await asyncio.sleep(1.0)
    held = rss_kib(server.pid())
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await read_reply(reader)
    await command(reader, writer, b"EHLO late.example.test\r\n", b"250")
    answer_ms = (time.perf_counter() - t0) * 1000
    writer.close()
    noop_ok = 0
    for r, w in conns[:200]:
        w.write(b"NOOP\r\n")
        if (await read_reply(r)).startswith(b"250"):
            noop_ok += 1
    for _, w in conns:
        w.close()
    per_conn = (held - base) * 1024 / max(1, len(conns))
    print(
        f"idle: {len(conns)} connections held ({failures} failed) opened in {opened:.1f}s; "
        f"RSS {base / 1024:.1f} MiB -> {held / 1024:.1f} MiB = {per_conn / 1024:.2f} KiB/conn; "
        f"new client banner+EHLO in {answer_ms:.1f} ms; NOOP ok on {noop_ok}/200 sampled"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--scenarios", default="a1,a10,a50,b1,b10,b50")
    parser.add_argument(
        "--asyncio-loop", action="store_true", help="also run Pigeon on the standard loop"
    )
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop

        loop_name = "uvloop"
        runner = uvloop.run
    except ImportError:
        loop_name = "asyncio"
        runner = asyncio.run
    print(
        f"load generator on {loop_name}; N={args.n} messages of {len(BODY)} bytes, "
        f"{args.runs} runs per server, alternating"
    )
    table = []
    for scenario in [s for s in args.scenarios.split(",") if s]:
        keepalive = scenario[0] == "b"
        conc = int(scenario[1:])
        servers: list[type[Server]] = [PigeonServer, ReferenceServer]
        if args.asyncio_loop:
            servers.insert(1, PigeonAsyncioServer)
        results: dict[str, list[Result]] = {cls.name: [] for cls in servers}
        for _ in range(args.runs):
            for cls in servers:
                server = cls()
                server.start()
                try:
                    results[cls.name].append(runner(load(server.port, args.n, conc, keepalive)))
                finally:
                    server.stop()
        row = {
            name: Result(
                statistics.median(r.rate for r in rs),
                statistics.median(r.p50 for r in rs),
                statistics.median(r.p99 for r in rs),
            )
            for name, rs in results.items()
        }
        ref = row["aiosmtpd"]
        parts = []
        for name, res in row.items():
            runs = " ".join(f"{x.rate:.0f}" for x in results[name])
            ratio = "" if name == "aiosmtpd" else f" = {res.rate / ref.rate:4.2f}x ref"
            parts.append(
                f"{name} {res.rate:6.0f} msg/s{ratio} (p50 {res.p50:5.2f} ms, "
                f"p99 {res.p99:6.2f} ms; runs {runs})"
            )
        table.append(f"{scenario:>4}  " + " | ".join(parts))
        print(table[-1], flush=True)
    if args.idle:
        server = PigeonServer()
        server.start()
        try:
            runner(idle_test(server, args.idle))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
