"""Reload under load: a client streams messages while the config is reloaded twice (SIGHUP
with a valid change, `pigeon reload` with a broken file): nothing lost, no session dropped."""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

DOMAIN = "mx.reload.test"
SESSIONS = 6
PER_SESSION = 10


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        self.users = self.work.path / "users"
        self.users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        self.port = free_port()
        self.second_port = free_port()
        self.daemon = PigeonDaemon(self.work.path, self.config(), port=self.port)

    def config(self, *, second_listener: bool = False, broken: bool = False) -> str:
        text = f"""
table users file:{self.users}
listen on 127.0.0.1 port {self.port} hostname {DOMAIN}
action "local" maildir userbase <users>
match from any for domain "{DOMAIN}" action "local"
"""
        if second_listener:
            text += f"listen on 127.0.0.1 port {self.second_port} hostname {DOMAIN}\n"
        if broken:
            text += 'action "x" frobnicate\n'
        return text

    def maildir_count(self) -> int:
        return len(maildir_messages(self.mail / "alice" / "Maildir"))


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


class Streamer(threading.Thread):
    """Sends SESSIONS x PER_SESSION messages, a little at a time; records every failure."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        for session in range(SESSIONS):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as client:
                    for i in range(PER_SESSION):
                        body = f"Subject: load {session}/{i}\r\n\r\nmessage {session}/{i}\r\n"
                        client.sendmail("load@example.org", [f"alice@{DOMAIN}"], body)
                        self.sent += 1
                        time.sleep(0.02)
            except (smtplib.SMTPException, OSError) as exc:
                self.errors.append(f"session {session}: {exc!r}")


def test_reload_twice_under_load(site: Site) -> None:
    streamer = Streamer(site.port)
    streamer.start()
    wait_for(lambda: streamer.sent >= 5, what="the stream to start")

    # 1. A valid change, by signal: a second listener appears.
    site.daemon.conf.write_text(site.config(second_listener=True))
    assert site.daemon.proc is not None
    site.daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in site.daemon.log(), what="SIGHUP reload")
    with socket.create_connection(("127.0.0.1", site.second_port), timeout=5) as s:
        assert s.recv(512).startswith(b"220 ")

    # 2. A broken file: refused, the reason logged, the running config kept.
    sent_before = streamer.sent
    site.daemon.conf.write_text(site.config(second_listener=True, broken=True))
    result = site.daemon.ctl("reload", check=False)
    assert result.returncode != 0
    assert "reload failed" in result.stderr and "smtpd.conf:" in result.stderr
    assert "reload failed, keeping the running configuration" in site.daemon.log()
    with socket.create_connection(("127.0.0.1", site.second_port), timeout=5) as s:
        assert s.recv(512).startswith(b"220 ")
    wait_for(lambda: streamer.sent > sent_before, what="the stream to go on after the reloads")

    streamer.join(120)
    assert not streamer.is_alive()
    assert streamer.errors == []
    assert streamer.sent == SESSIONS * PER_SESSION
    wait_for(lambda: site.maildir_count() == SESSIONS * PER_SESSION, what="every delivery")
    site.daemon.wait_queue_empty()
    assert "smtp disconnected reason=io-error" not in site.daemon.log()


def test_removed_listener_stops_listening(site: Site) -> None:
    site.daemon.conf.write_text(site.config())
    result = site.daemon.ctl("reload")
    assert "reloaded" in result.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", site.second_port), timeout=2).close()
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("x@example.org", [f"alice@{DOMAIN}"], "Subject: after\r\n\r\nok\r\n")
    wait_for(lambda: site.maildir_count() == SESSIONS * PER_SESSION + 1, what="delivery")
