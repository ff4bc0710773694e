"""Relaying through the relay worker process (``pigeon run --relay worker``): the queue
views come from the worker, and a worker killed while it relays is restarted by the daemon
with no mail lost."""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession
from harness import PigeonDaemon, Workdir, free_port, wait_for

GATE_LIMIT = 15.0  # seconds a held message waits at most for the gate
# Started as root, the daemon drops to this account (one every Debian system has, as in
# test_privsep.py) and so does the worker, which it starts before dropping.
RUN_AS = "daemon"


@dataclass
class GatedSink:
    """Accepts everything; while ``gate`` is clear, a message whose subject says "hold"
    is kept waiting before its 250 (the relay worker is then mid-transaction)."""

    subjects: list[str] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: AioSMTP, session: AioSession, envelope: AioEnvelope) -> str:
        data = bytes(envelope.original_content or b"")
        match = re.search(rb"Subject: (\S+)", data)
        subject = match.group(1).decode() if match else ""
        if "hold" in subject:
            self.held.set()
            deadline = time.monotonic() + GATE_LIMIT
            while not self.gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        with self.lock:
            self.subjects.append(subject)
        return "250 2.0.0 Ok queued"

    def received(self) -> list[str]:
        with self.lock:
            return list(self.subjects)


class Site:
    def __init__(self) -> None:
        self.sink = GatedSink()
        self.sink_port = free_port()
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.sink_port)
        self.controller.start()
        self.work = Workdir()
        self.port = free_port()
        config = f"""listen on 127.0.0.1 port {self.port} hostname mx.local.test
action "smarthost" relay host smtp+notls://127.0.0.1:{self.sink_port}
match from local for domain "smarthost.test" action "smarthost"
"""
        extra = ["--relay", "worker"]
        if os.geteuid() == 0:
            extra += ["--user", RUN_AS]
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port, extra=extra)

    def worker_pids(self) -> list[int]:
        """The relay worker processes the daemon started, oldest first."""
        return [
            int(p) for p in re.findall(r"relay worker: started .* \(pid (\d+)\)", self.daemon.log())
        ]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    try:
        yield s
    finally:
        s.sink.gate.set()
        s.daemon.stop()
        s.controller.stop()
        s.work.cleanup()


def send(site: Site, subject: str, rcpt: str = "dora@smarthost.test") -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("alice@mx.local.test", [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n")


def test_worker_relays_and_shows_relays(site: Site) -> None:
    site.sink.gate.set()
    send(site, "shown")
    wait_for(lambda: "shown" in site.sink.received(), what="the sink to receive it")
    site.daemon.wait_queue_empty()
    relays = site.daemon.ctl("show", "relays").stdout.splitlines()
    assert any(
        line.startswith(f"[relay:127.0.0.1,port={site.sink_port},smtp+notls] refcount=")
        for line in relays
    ), relays
    hoststats = site.daemon.ctl("show", "hoststats").stdout
    assert "smarthost.test|" in hoststats and "250 2.0.0 Ok queued" in hoststats
    log = site.daemon.log()
    # Sessions were opened by the worker; its log lines come out in the daemon's log.
    assert "mta connecting address=smtp://127.0.0.1:" in log
    assert "mta delivery evpid=" in log
    pids = site.worker_pids()
    assert pids and pids[-1] != site.daemon.proc.pid  # type: ignore[union-attr]


def test_each_relayed_envelope_is_logged_once_under_its_mta_session(site: Site) -> None:
    """The worker writes the delivery line of each envelope it relays (the daemon must not
    too), as smtpd's mta: under the id of the session that carried it, which its
    ``connecting`` and ``connected`` lines share, with ``source`` and ``relay``."""
    site.sink.gate.set()
    subjects = [f"once-{i}" for i in range(3)]
    for subject in subjects:
        send(site, subject)
    wait_for(lambda: set(subjects) <= set(site.sink.received()), what="the sink to receive them")
    site.daemon.wait_queue_empty()
    log = site.daemon.log()
    lines = re.findall(
        r"([0-9a-f]{16}) mta delivery evpid=([0-9a-f]{16}) from=<alice@mx.local.test> "
        r'to=<dora@smarthost.test> rcpt=<-> source="127.0.0.1" '
        r'relay="127.0.0.1 \(127.0.0.1\)" delay=\S+ result="Ok" stat="250 2.0.0 Ok queued"',
        log,
    )
    evpids = [evpid for _, evpid in lines]
    counts = {evpid: evpids.count(evpid) for evpid in evpids}
    assert len(counts) >= len(subjects), log
    assert set(counts.values()) == {1}, counts
    for sid, _ in lines:
        assert re.search(
            rf"^{sid} mta connecting address=smtp://127.0.0.1:{site.sink_port} ", log, re.M
        )
        assert re.search(rf"^{sid} mta connected ", log, re.M)


def test_a_session_that_ends_says_so_with_its_message_count(site: Site) -> None:
    """``SID mta disconnected reason=quit messages=N``, as smtpd (here when the daemon stops
    a kept session at reload: `mta limit session-keepalive 0` ends sessions at once)."""
    site.sink.gate.set()
    send(site, "counted")
    wait_for(lambda: "counted" in site.sink.received(), what="the sink to receive it")
    site.daemon.wait_queue_empty()
    conf = site.daemon.conf.read_text()
    site.daemon.conf.write_text(conf + "mta limit session-keepalive 0\n")
    try:
        assert "reloaded" in site.daemon.ctl("reload").stdout
        send(site, "counted-2")
        wait_for(
            lambda: re.search(
                r"^[0-9a-f]{16} mta disconnected reason=quit messages=[1-9]\d*$",
                site.daemon.log(),
                re.M,
            ),
            what="a disconnected line",
        )
    finally:
        site.daemon.conf.write_text(conf)
        site.daemon.ctl("reload")


def test_worker_runs_unprivileged_when_started_as_root(site: Site) -> None:
    if os.geteuid() != 0:
        pytest.skip("started as an ordinary user: nothing to drop")
    user = pwd.getpwnam(RUN_AS)
    pid = site.worker_pids()[-1]
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
    assert uids is not None and int(uids.group(1)) == int(uids.group(2)) == user.pw_uid


def test_killed_worker_is_restarted_and_no_mail_is_lost(site: Site) -> None:
    site.sink.gate.clear()
    site.sink.held.clear()
    subjects = [f"hold-{i}" for i in range(3)] + [f"after-{i}" for i in range(3)]
    for subject in subjects[:3]:
        send(site, subject, rcpt=f"{subject}@smarthost.test")
    wait_for(site.sink.held.is_set, what="the worker to be in a transaction")
    old = site.worker_pids()[-1]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: site.worker_pids()[-1] != old, what="the daemon to start a new relay worker")
    site.sink.gate.set()
    for subject in subjects[3:]:
        send(site, subject, rcpt=f"{subject}@smarthost.test")
    # Mail in flight when the worker died was tempfailed: it waits for its retry time.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not set(subjects) <= set(site.sink.received()):
        site.daemon.ctl("schedule", "all", check=False)
        time.sleep(0.5)
    assert set(subjects) <= set(site.sink.received()), site.daemon.log()
    site.daemon.wait_queue_empty()
    assert "relay worker went away" in site.daemon.log()
    assert site.daemon.proc is not None and site.daemon.proc.poll() is None


def test_reload_hands_new_limits_to_the_worker(site: Site) -> None:
    site.sink.gate.set()

    def hosts() -> str:
        return site.daemon.ctl("show", "hosts").stdout

    send(site, "kept")
    wait_for(lambda: "kept" in site.sink.received(), what="the first message")
    # (Sessions that earlier tests left open may be kept too.)
    wait_for(lambda: re.search(r" nconn=[1-9]", hosts()), what="the session to be kept for reuse")
    # No keepalive any more: a session ends after its transaction.
    site.daemon.conf.write_text(site.daemon.conf.read_text() + "mta limit session-keepalive 0\n")
    assert "reloaded" in site.daemon.ctl("reload").stdout
    # Sessions kept under the old settings end at the reload (the next one uses the new).
    wait_for(lambda: " nconn=0 " in hosts(), timeout=5, what="kept sessions to end")
    send(site, "not-kept")
    wait_for(lambda: "not-kept" in site.sink.received(), what="the second message")
    # At once, not when the old 10 s keepalive ran out.
    wait_for(lambda: " nconn=0 " in hosts(), timeout=5, what="the session to be closed")


DIALOGUE = re.compile(r"^mta: 0x[0-9a-f]+: (?:>>>|<<<) ", re.M)


def relay_one(site: Site, subject: str) -> None:
    send(site, subject)
    wait_for(lambda: subject in site.sink.received(), what=f"the sink to receive {subject}")
    site.daemon.wait_queue_empty()


def test_trace_mta_logs_the_relay_dialogue_and_log_verbose_does_not(site: Site) -> None:
    site.sink.gate.set()
    daemon = site.daemon
    conf = daemon.conf.read_text()
    try:
        # No session kept between messages: the traced one opens its own (greeting, EHLO, id).
        daemon.conf.write_text(conf + "mta limit session-keepalive 0\n")
        assert "reloaded" in daemon.ctl("reload").stdout
        daemon.ctl("log", "verbose")
        start = len(daemon.log())
        relay_one(site, "verbose-only")
        assert not DIALOGUE.search(daemon.log()[start:]), daemon.log()[start:]

        daemon.ctl("trace", "mta")
        start = len(daemon.log())
        relay_one(site, "traced")
        mail = re.compile(r"^mta: (0x[0-9a-f]+): >>> MAIL FROM:<alice@mx\.local\.test>", re.M)
        wait_for(lambda: mail.search(daemon.log(), start), what="the traced MAIL FROM")
        found = mail.search(daemon.log(), start)
        assert found is not None
        session = found.group(1)
        traced = [
            line.split(": ", 2)[2]
            for line in daemon.log()[start:].splitlines()
            if line.startswith(f"mta: {session}: ")
        ]
        # A new session: the greeting and every line of the sink's multiline EHLO reply.
        assert f"debug: mta: {session}: spawned for relay" in daemon.log()[start:]
        assert traced[0].startswith("<<< 220 "), traced
        assert "<<< 250-8BITMIME" in traced, traced
        # The trace names the session id its `SID mta ...` log lines carry.
        sid = re.search(rf"^debug: mta: {session}: session ([0-9a-f]{{16}})$", daemon.log(), re.M)
        assert sid is not None, daemon.log()[start:]
        assert re.search(rf"^{sid.group(1)} mta connected ", daemon.log(), re.M)
        assert "RCPT TO:<dora@smarthost.test>" in " ".join(traced)
        assert "<<< 250 2.0.0 Ok queued" in traced, traced
        assert any(re.fullmatch(r">>> \[\.\.\.\d+ bytes\.\.\.\]", line) for line in traced), traced
        assert ">>> ." in traced and not any("body" in line for line in traced), traced
        handling = f"debug: mta: {session}: handling next task for relay [relay:127.0.0.1,"
        assert handling in daemon.log()[start:]

        daemon.ctl("untrace", "mta")
        start = len(daemon.log())
        relay_one(site, "untraced")
        assert not DIALOGUE.search(daemon.log()[start:]), daemon.log()[start:]
    finally:
        daemon.ctl("untrace", "mta")
        daemon.ctl("log", "brief")
        daemon.conf.write_text(conf)
        daemon.ctl("reload")
