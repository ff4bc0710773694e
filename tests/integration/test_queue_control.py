"""Queue control through a running daemon, compared with smtpctl's transcripts
(tests/data/design/transcripts/smtpctl-*.txt)."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession
from harness import PIGEON, PigeonDaemon, Workdir, free_port, mail_uid_gid, wait_for

HOSTNAME = "mx.ctl.test"


@dataclass
class Sink:
    subjects: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: AioSMTP, session: AioSession, envelope: AioEnvelope) -> str:
        data = bytes(envelope.original_content or b"")
        m = re.search(rb"^Subject: (.*?)\r?$", data, re.M)
        with self.lock:
            self.subjects.append(m.group(1).decode() if m else "")
        return "250 2.0.0 Ok"


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        self.sink = Sink()
        self.sink_port = free_port()
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.sink_port)
        self.port = free_port()
        config = f"""table users file:{users}
listen on 127.0.0.1 port {self.port} hostname {HOSTNAME}
action "local" maildir userbase <users>
action "tosink" relay host smtp+notls://127.0.0.1:{self.sink_port}
match from any for domain "{HOSTNAME}" action "local"
match from any for domain "sink.test" action "tosink"
"""
        # MTA paused from the start, as in smtpctl-commands.txt: relayed mail waits.
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port, extra=["-P", "mta"])

    def send(self, rcpts: list[str], subject: str) -> str:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.ehlo("vm")
            client.mail("bob@example.test")
            for rcpt in rcpts:
                client.rcpt(rcpt)
            code, reply = client.data(f"Subject: {subject}\r\n\r\nThis is a test mailing\r\n")
        assert code == 250
        return reply.decode().split()[1]  # "2.0.0 <msgid> Message accepted..."

    def lines(self, *words: str) -> list[str]:
        return self.daemon.ctl(*words).stdout.splitlines()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.controller.start()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.controller.stop()
        s.work.cleanup()


def test_show_queue_fields_for_mail_waiting_on_a_paused_mta(site: Site) -> None:
    msgid = site.send(["dave@sink.test", "eve@sink.test"], "held")
    assert site.lines("show", "status") == ["MDA running", "MTA paused", "SMTP running"]
    rows = [line.split("|") for line in site.lines("show", "queue", msgid)]
    assert len(rows) == 2
    for fields in rows:
        assert len(fields) == 14
        evpid, family, kind, flags, sender, rcpt, dest, ctime, expire, lasttry, retry = fields[:11]
        assert evpid.startswith(msgid) and len(evpid) == 16
        assert (family, kind, flags, sender) == ("inet4", "mta", "", "bob@example.test")
        assert rcpt == dest and dest in ("dave@sink.test", "eve@sink.test")
        assert int(expire) == int(ctime) + 4 * 86400  # the real expiry (6.8 prints ctime)
        assert (lasttry, retry) == ("0", "0")
        assert fields[11:] == ["pending", "-1", ""]  # due, held by the paused agent
    site.daemon.ctl("remove", msgid)


def test_show_queue_with_a_message_id_lists_only_that_message(site: Site) -> None:
    first = site.send(["one@sink.test"], "first")
    second = site.send(["two@sink.test"], "second")
    only = site.lines("show", "queue", second)
    assert len(only) == 1 and only[0].startswith(second)
    everything = site.lines("show", "queue")
    assert any(line.startswith(first) for line in everything)
    site.daemon.ctl("remove", first)
    site.daemon.ctl("remove", second)


def test_pause_and_resume_envelopes(site: Site) -> None:
    msgid = site.send(["p1@sink.test", "p2@sink.test"], "pausable")
    assert site.lines("pause", "envelope", msgid) == ["2 envelopes paused"]
    flags = {line.split("|")[3] for line in site.lines("show", "queue", msgid)}
    assert flags == {"suspend"}
    assert site.lines("resume", "envelope", "all") == ["2 envelopes resumed"]
    flags = {line.split("|")[3] for line in site.lines("show", "queue", msgid)}
    assert flags == {""}
    site.daemon.ctl("remove", msgid)


def test_show_envelope_and_message(site: Site) -> None:
    msgid = site.send(["dave@sink.test"], "shown")
    evpid = site.lines("show", "queue", msgid)[0].split("|")[0]
    envelope = site.lines("show", "envelope", evpid)
    keys = [line.split(": ", 1)[0] for line in envelope]
    assert keys[:3] == ["version", "dispatcher", "type"]
    assert "dispatcher: tosink" in envelope and "rcpt: dave@sink.test" in envelope
    assert keys.index("sender") < keys.index("rcpt") < keys.index("dest") < keys.index("ctime")
    message = site.daemon.ctl("show", "message", evpid).stdout
    assert message.startswith("Received: from vm (localhost [127.0.0.1])")
    assert f"with ESMTP id {msgid}" in message and "Subject: shown" in message
    site.daemon.ctl("remove", msgid)


def test_remove_logs_and_sends_no_bounce(site: Site) -> None:
    msgid = site.send(["r1@sink.test", "r2@sink.test"], "removed")
    assert site.lines("remove", msgid) == ["2 envelopes removed"]
    assert site.lines("show", "queue", msgid) == []
    log = site.daemon.log()
    assert re.search(
        rf"relay: Remove for {msgid}[0-9a-f]{{8}}: from=<bob@example.test>, to=<r1@sink.test>, "
        r"rcpt=<->, delay=\d+s, stat=Removed by administrator",
        log,
    )
    assert site.lines("remove", msgid) == ["0 envelopes removed"]


def test_schedule_and_resume_mta_deliver(site: Site) -> None:
    msgid = site.send(["go@sink.test"], "scheduled")
    assert site.lines("schedule", msgid) == ["1 envelope scheduled"]
    assert site.lines("resume", "mta") == ["command succeeded"]
    try:
        wait_for(lambda: "scheduled" in site.sink.subjects, what="the relayed message")
        wait_for(lambda: site.lines("show", "queue", msgid) == [], what="an empty queue")
    finally:
        assert site.lines("pause", "mta") == ["command succeeded"]
    assert "info: mta resumed" in site.daemon.log()


def test_abbreviated_commands_and_possibilities(site: Site) -> None:
    ambiguous = site.daemon.ctl("sh", "st", check=False)
    assert ambiguous.returncode == 255
    assert ambiguous.stderr.splitlines() == ["possibilities are:", "show stats", "show status"]
    assert site.lines("sh", "statu") == ["MDA running", "MTA paused", "SMTP running"]
    bogus = site.daemon.ctl("bogus", check=False)
    assert bogus.returncode == 255
    assert {"show", "pause", "resume", "remove", "schedule"} <= set(bogus.stderr.splitlines())


def test_pause_smtp_refuses_new_sessions(site: Site) -> None:
    assert site.lines("pause", "smtp") == ["command succeeded"]
    try:
        assert site.lines("show", "status")[2] == "SMTP paused"
        with smtplib.SMTP(timeout=10) as client:
            code, _ = client.connect("127.0.0.1", site.port)
        assert code == 421
    except smtplib.SMTPServerDisconnected:
        pass  # closed right after the 421, before smtplib read it: refused as well
    finally:
        assert site.lines("resume", "smtp") == ["command succeeded"]
    site.send(["x@sink.test"], "after resume")
    site.daemon.ctl("remove", "all")


def test_trace_and_log_commands(site: Site) -> None:
    for words in (("trace", "mta"), ("untrace", "mta"), ("log", "verbose"), ("log", "brief")):
        assert site.lines(*words) == ["command succeeded"]
    bad = site.daemon.ctl("trace", "nosuch", check=False)
    assert bad.returncode == 1 and "invalid subsystem" in bad.stderr


def test_show_stats_uses_smtpctls_names(site: Site) -> None:
    stats = site.daemon.stats()
    for key in (
        "control.session",
        "mda.envelope",
        "mta.envelope",
        "queue.bounce",
        "scheduler.delivery.ok",
        "scheduler.delivery.permfail",
        "scheduler.delivery.tempfail",
        "scheduler.delivery.loop",
        "scheduler.envelope",
        "scheduler.envelope.incoming",
        "scheduler.envelope.inflight",
        "scheduler.envelope.expired",
        "scheduler.ramqueue.envelope",
        "scheduler.ramqueue.message",
        "smtp.session",
        "smtp.session.inet4",
        "smtp.session.local",
        "uptime",
        "uptime.human",
    ):
        assert key in stats, key
    assert int(str(stats["smtp.session.inet4"])) >= 1
    assert stats["smtp.session"] == 0  # current sessions: none open now
    text = site.lines("show", "stats")
    keys = [line.split("=", 1)[0] for line in text]
    assert keys == sorted(keys)  # smtpctl prints them sorted by name
    assert all(re.fullmatch(r"[a-z0-9.]+=\S+", line) for line in text)


def test_monitor_counts_enqueued_and_removed(site: Site) -> None:
    proc = subprocess.Popen(
        [*PIGEON, "monitor", "--spool", str(site.daemon.spool)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        header = [proc.stdout.readline(), proc.stdout.readline()]
        assert header[1].split()[:3] == ["curr", "conn", "disc"]
        totals = proc.stdout.readline().split()
        assert len(totals) == 13
        msgid = site.send(["m1@sink.test", "m2@sink.test"], "monitored")
        site.daemon.ctl("remove", msgid)
        seen = {"conn": 0, "enq": 0, "remove": 0}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen["remove"] < 2:
            row = [int(v) for v in proc.stdout.readline().split()]
            seen["conn"] += row[1]
            seen["enq"] += row[4]
            seen["remove"] += row[11]
        assert seen == {"conn": 1, "enq": 2, "remove": 2}
    finally:
        proc.terminate()
        proc.wait(5)


def test_status_with_the_daemon_down(workdir: Workdir) -> None:
    spool = workdir.path / "spool"
    spool.mkdir()
    result = subprocess.run(
        [*PIGEON, "show", "status", "--spool", str(spool)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "pigeon doesn't seem to be running" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_unprivileged_users_may_only_submit_and_ask_status(site: Site) -> None:
    def as_nobody(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PIGEON, *words, "--spool", str(site.daemon.spool)],
            capture_output=True,
            text=True,
            timeout=30,
            user=65534,
            group=65534,
            extra_groups=[],
        )

    assert as_nobody("show", "status").returncode == 0
    refused = as_nobody("remove", "all")
    assert refused.returncode == 1 and "not permitted" in refused.stderr
