"""End-to-end relay benchmark: N messages accepted by Pigeon and relayed to a sink.

Usage: python bench/relay.py [-n 3000] [--runs 3] [--concurrency 10] [--relay worker]

``--relay worker`` runs the daemon with its relay worker process (``pigeon run --relay
worker``); the worker's CPU per message is then printed too.

Each run, in alternation:

* accept only: Pigeon with the MTA paused (``-P mta``) takes N messages over kept-open
  connections (``--concurrency`` clients); messages/s = N / time to the last 250.
* end to end: the same load with the MTA running; messages/s = N / time from the first
  MAIL FROM until a loopback sink has received all N (by smarthost relay, smtp+notls).

Prints the medians and the ratio end-to-end / accept-only. Target: ratio >= 0.8 and at
least 1,000 messages/s relayed. The sink is a minimal pipelining SMTP server in its own
process (on uvloop when installed), so it is not what limits the figure.

On a shared VM the machine's speed can swing by a third between runs: use many runs (``-n
10000 --runs 9``) and read the per-run ratios printed at the end along with the medians.

``--pin`` (Linux, 2 or more CPUs) gives the daemon CPU 0 to itself and puts everything else
(the relay worker, the load generator, the sink) on the other CPUs, in both phases. On a
2-core machine it stands for a host where the peers are elsewhere and Pigeon's processes
have a core each: without it, four busy processes share two cores and the kernel's wake-up
placement keeps preempting the daemon (about 2 involuntary context switches per message end
to end, against 0.01 accepting only), which is what the plain figure mostly measures there.

Each run also prints the CPU time (user + system, from /proc) per message of the daemon,
the load generator and the sink. The daemon's figure is the steadier one on a shared
machine: accept-only gives the cost of receiving, end to end that of receiving and
relaying, so their difference is what relaying costs. The daemon is one process (one
core), so once it is busy the ratio cannot beat receive / (receive + relay).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accept import (  # noqa: E402 - the accept benchmark's client and helpers
    BODY,
    close_session,
    command,
    free_port,
    open_session,
    raise_nofile,
    wait_port,
)

SINK = textwrap.dedent(
    """
    import asyncio, sys, time
    target = int(sys.argv[2])
    count = 0

    class Sink(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.buf = b""
            self.data = False
            transport.write(b"220 sink ESMTP\\r\\n")

        def data_received(self, chunk):
            global count
            self.buf += chunk
            out = []
            while True:
                if self.data:
                    end = self.buf.find(b"\\r\\n.\\r\\n")
                    if end < 0:
                        break
                    self.buf = self.buf[end + 5:]
                    self.data = False
                    count += 1
                    out.append(b"250 2.0.0 Ok\\r\\n")
                    if count == target:
                        print(time.time(), flush=True)
                    continue
                end = self.buf.find(b"\\r\\n")
                if end < 0:
                    break
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                verb = line[:4].upper()
                if verb == b"EHLO":
                    out.append(b"250-sink\\r\\n250-PIPELINING\\r\\n250 8BITMIME\\r\\n")
                elif verb == b"DATA":
                    self.data = True
                    self.buf = b"\\r\\n" + self.buf  # the end marker may follow at once
                    out.append(b"354 go\\r\\n")
                elif verb == b"QUIT":
                    out.append(b"221 bye\\r\\n")
                    self.t.write(b"".join(out))
                    self.t.close()
                    return
                else:
                    out.append(b"250 2.0.0 Ok\\r\\n")
            if out:
                self.t.write(b"".join(out))

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Sink, "127.0.0.1", int(sys.argv[1]), backlog=1024)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()

    try:  # as cheap as we can make it: it shares the cores with what is measured
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    """
)


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sink:
    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SINK, str(self.port), str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        if PIN:
            _pin(self.proc.pid, _other_cpus())

    def wait_all(self, timeout: float) -> float:
        """Wall-clock time at which the sink had every message."""
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), True)
        deadline = time.time() + timeout
        import select

        while time.time() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                return float(self.proc.stdout.readline())
        raise RuntimeError("the sink did not get every message in time")

    def cpu_seconds(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _children_cpu(pid: int) -> float:
    """CPU time of the daemon's running children (the relay worker, with --relay worker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    return sum(_proc_cpu(int(child)) for child in children)


RELAY_MODE = "in-process"  # `pigeon run --relay` (main() sets it from --relay)
PIN = False  # --pin: the daemon alone on CPU 0, the rest on the other CPUs


def _daemon_cpus() -> set[int]:
    return {0}


def _other_cpus() -> set[int]:
    return set(range(1, os.cpu_count() or 2))


def _pin(pid: int, cpus: set[int]) -> None:
    for task in os.listdir(f"/proc/{pid}/task"):  # every thread of the process
        os.sched_setaffinity(int(task), cpus)


class Pigeon:
    def __init__(self, sink_port: int, *, paused: bool, profile: Path | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
        conf = self.dir / "smtpd.conf"
        conf.write_text(
            f"listen on 127.0.0.1 port {self.port}\n"
            f'action "relay" relay host smtp+notls://127.0.0.1:{sink_port}\n'
            'match from any for domain "sink.test" action "relay"\n'
        )
        run = [sys.executable, "-m", "pigeon"]
        if profile is not None:
            run = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "pigeon"]
        args = [*run, "run", "-d", "-f", str(conf), "--spool", str(self.dir / "spool")]
        if paused:
            args += ["-P", "mta"]
        args += ["--relay", RELAY_MODE]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        if PIN:
            _pin(self.proc.pid, _daemon_cpus())
            deadline = time.monotonic() + 10
            while RELAY_MODE == "worker" and not self._children():
                if time.monotonic() > deadline:
                    raise RuntimeError("the relay worker did not start")
                time.sleep(0.05)
            for child in self._children():
                _pin(child, _other_cpus())

    def _children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(child) for child in path.read_text().split()]
        except OSError:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon used so far (Linux /proc)."""
        return _proc_cpu(self.proc.pid)

    def worker_cpu_seconds(self) -> float:
        return _children_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def relay_transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await command(reader, writer, b"MAIL FROM:<bench@example.test>\r\n", b"250")
    await command(reader, writer, b"RCPT TO:<bench@sink.test>\r\n", b"250")
    await command(reader, writer, b"DATA\r\n", b"354")
    await command(reader, writer, BODY + b".\r\n", b"250")


async def load(port: int, total: int, concurrency: int) -> None:
    counter = iter(range(total))

    async def worker() -> None:
        session = None
        per_session = 0
        for _ in counter:
            if session is None:
                session = await open_session(port)
            await relay_transaction(*session)
            per_session += 1
            if per_session >= 100:  # servers cap mails per session (OpenSMTPD: 100)
                await close_session(*session)
                session, per_session = None, 0
        if session is not None:
            await close_session(*session)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


@dataclass
class RunResult:
    rate: float  # messages/s (accept-only: accepted; end to end: at the sink)
    daemon_ms: float  # daemon CPU (user + system) per message, during the load
    client_ms: float  # load generator CPU per message
    sink_ms: float  # sink CPU per message
    accepted_rate: float = 0.0  # end to end: messages/s accepted, same run
    worker_ms: float = 0.0  # relay worker CPU per message (--relay worker)


def _settle(cpu: Callable[[], float], *, limit: float = 5.0) -> float:
    """The daemon's CPU time once it stopped using CPU (the last outcomes recorded)."""
    deadline = time.monotonic() + limit
    last = cpu()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = cpu()
        if now == last:
            break
        last = now
    return last


def accept_only(n: int, concurrency: int) -> RunResult:
    sink = Sink(n)
    pigeon = Pigeon(sink.port, paused=True)
    try:
        cpu0, own0 = pigeon.cpu_seconds(), time.process_time()
        start = time.perf_counter()
        asyncio.run(load(pigeon.port, n, concurrency))
        elapsed = time.perf_counter() - start
        own = time.process_time() - own0
        daemon = _settle(pigeon.cpu_seconds) - cpu0
        return RunResult(n / elapsed, daemon * 1000 / n, own * 1000 / n, 0.0)
    finally:
        pigeon.stop()
        sink.stop()


def end_to_end(n: int, concurrency: int, profile: Path | None = None) -> RunResult:
    """Messages/s to the sink and messages/s accepted, in the same run."""
    sink = Sink(n)
    pigeon = Pigeon(sink.port, paused=False, profile=profile)
    try:
        cpu0, own0, sink0 = pigeon.cpu_seconds(), time.process_time(), sink.cpu_seconds()
        worker0 = pigeon.worker_cpu_seconds()
        start = time.time()
        asyncio.run(load(pigeon.port, n, concurrency))
        accepted = time.time()
        own = time.process_time() - own0
        done = sink.wait_all(timeout=max(60.0, n / 50))
        daemon = _settle(pigeon.cpu_seconds) - cpu0
        sink_cpu = sink.cpu_seconds() - sink0
        worker = pigeon.worker_cpu_seconds() - worker0
        return RunResult(
            n / (done - start),
            daemon * 1000 / n,
            own * 1000 / n,
            sink_cpu * 1000 / n,
            accepted_rate=n / (accepted - start),
            worker_ms=worker * 1000 / n,
        )
    finally:
        pigeon.stop()
        sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--profile", type=Path, help="cProfile the daemon of one relay run")
    parser.add_argument(
        "--relay",
        choices=["in-process", "worker"],
        default="worker",
        help="where the daemon relays (pigeon run --relay)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="daemon alone on CPU 0, worker, load generator and sink on the others",
    )
    args = parser.parse_args()
    global RELAY_MODE, PIN
    RELAY_MODE = args.relay
    PIN = args.pin
    if PIN:
        if (os.cpu_count() or 1) < 2:
            parser.error("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, _other_cpus())
    raise_nofile()
    if args.profile is not None:
        result = end_to_end(args.n, args.concurrency, profile=args.profile)
        print(f"profiled run: {result.rate:.0f} msg/s relayed; profile in {args.profile}")
        return
    accepts: list[RunResult] = []
    relays: list[RunResult] = []
    for run in range(args.runs):
        accepts.append(accept_only(args.n, args.concurrency))
        relays.append(end_to_end(args.n, args.concurrency))
        a, r = accepts[-1], relays[-1]
        print(
            f"run {run + 1}: accept-only {a.rate:.0f} msg/s "
            f"(daemon {a.daemon_ms:.2f} ms CPU/msg, client {a.client_ms:.2f}), "
            f"end-to-end {r.rate:.0f} msg/s (accepted at {r.accepted_rate:.0f}; "
            f"daemon {r.daemon_ms:.2f} ms CPU/msg, relay worker {r.worker_ms:.2f}, "
            f"client {r.client_ms:.2f}, sink {r.sink_ms:.2f})",
            flush=True,
        )
    accept = statistics.median(a.rate for a in accepts)
    relay = statistics.median(r.rate for r in relays)
    receive_ms = statistics.median(a.daemon_ms for a in accepts)
    total_ms = statistics.median(r.daemon_ms for r in relays)
    ratio = relay / accept
    run_ratios = " ".join(f"{r.rate / a.rate:.2f}" for a, r in zip(accepts, relays, strict=True))
    print(
        f"\n{args.n} messages, {args.concurrency} clients, medians of {args.runs} runs, "
        f"relay {args.relay}{', pinned (--pin)' if PIN else ''}\n"
        f"accept only : {accept:8.0f} msg/s\n"
        f"end to end  : {relay:8.0f} msg/s (accepted and relayed to the sink)\n"
        f"ratio       : {ratio:8.2f}x  (target >= 0.80x and >= 1000 msg/s: "
        f"{'met' if ratio >= 0.8 and relay >= 1000 else 'MISSED'})\n"
        f"daemon CPU  : {receive_ms:8.2f} ms/msg receiving, {total_ms:.2f} ms/msg receiving "
        f"and relaying (relay share {total_ms - receive_ms:.2f} ms/msg)\n"
        f"run ratios  : {run_ratios} "
        f"(each end-to-end run against the accept-only run just before it)"
    )


if __name__ == "__main__":
    main()
