"""Debian's filter-senderscore 0.1.1, unmodified, under Pigeon
(transcripts/senderscore-session.txt, filters-ecosystem.md section 2).

The filter resolves ``1.0.0.127.score.senderscore.com`` for a client on 127.0.0.1. As in
the original capture, each filter process runs in a private mount namespace whose
/etc/hosts maps that name to ``127.0.4.SCORE``: the ``proc`` command is a small wrapper
(``unshare -m``, a bind mount, then ``setpriv`` back to nobody) and nothing of the host is
touched. Needs root (unshare -m); CI runs the suite as root.
"""

from __future__ import annotations

import os
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

FILTER = Path("/usr/libexec/opensmtpd/filter-senderscore")
HOST = "mx.example.test"
LOOKUP = "1.0.0.127.score.senderscore.com"  # 127.0.0.1 reversed, as the filter asks
NOBODY = 65534
# listener -> (score in the DNS answer, filter options, filter protocol)
CASES = {
    "junk": (70, "-blockBelow 50 -junkBelow 80 -scoreHeader", "0.6"),
    "block": (40, "-blockBelow 50 -junkBelow 80 -scoreHeader", "0.6"),
    "pass": (90, "-blockBelow 50 -junkBelow 80 -scoreHeader", "0.7"),
}


def _skip_reason() -> str | None:
    if not FILTER.exists():
        return f"{FILTER} missing (Debian package opensmtpd-filter-senderscore)"
    if os.geteuid() != 0:
        return "needs root: the filter's DNS answer comes from a private mount namespace"
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "unshare/setpriv (util-linux) missing"
    return None


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        d = self.work.path
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        (d / "users").write_text(f"bob {uid}:{gid}:{self.mail / 'bob'}\n")
        self.ports = {name: free_port() for name in CASES}
        lines = [f"table users file:{d / 'users'}"]
        for name, (score, options, protocol) in CASES.items():
            hosts = d / f"hosts-{name}"
            hosts.write_text(f"127.0.0.1 localhost\n127.0.4.{score} {LOOKUP}\n")
            wrapper = d / f"senderscore-{name}.sh"
            inner = (
                f"mount --bind {hosts} /etc/hosts && exec setpriv --reuid={NOBODY} "
                f"--regid={NOBODY} --clear-groups {FILTER} {options}"
            )
            wrapper.write_text(
                f"#!/bin/sh\nexec unshare -m --propagation private sh -c '{inner}'\n"
            )
            wrapper.chmod(0o755)
            lines += [
                f'proc ss_{name} "{wrapper}" user root protocol "{protocol}"',
                f"filter ss_{name} proc ss_{name}",
                f"listen on 127.0.0.1 port {self.ports[name]} hostname {HOST} filter ss_{name}",
            ]
        lines += [
            'action "local" maildir junk userbase <users>',
            'match from any for any action "local"',
        ]
        self.daemon = PigeonDaemon(d, "\n".join(lines) + "\n", port=self.ports["junk"])

    def find(self, subject: str) -> tuple[bytes, bool]:
        maildir = self.mail / "bob" / "Maildir"
        found: list[tuple[bytes, bool]] = []

        def arrived() -> bool:
            for junk, box in ((False, maildir), (True, maildir / ".Junk")):
                found.extend(
                    (m, junk) for m in maildir_messages(box) if f"Subject: {subject}".encode() in m
                )
            return bool(found)

        wait_for(arrived, what=f"delivery of {subject}")
        return found[0]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    s = Site()
    s.daemon.start(timeout=30)
    try:
        yield s
    finally:
        s.daemon.stop()
        s.work.cleanup()


def send(site: Site, listener: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", site.ports[listener], timeout=30) as client:
        client.ehlo("client.example.test")
        client.sendmail(
            "alice@example.test",
            [f"bob@{HOST}"],
            f"From: Alice <alice@example.test>\r\nTo: bob@{HOST}\r\nSubject: {subject}\r\n"
            f"\r\nhello\r\n",
        )


def headers(message: bytes) -> list[bytes]:
    return message.split(b"\n\n", 1)[0].split(b"\n")


def test_score_below_junk_threshold_junks_with_its_header(site: Site) -> None:
    send(site, "junk", "senderscore 70")
    message, junk = site.find("senderscore 70")
    top = headers(message)
    score = top.index(b"X-SenderScore: 70")
    spam = top.index(b"X-Spam: yes")
    received = next(i for i, h in enumerate(top) if h.startswith(b"Received:"))
    # As under OpenSMTPD: the filter's header above the MTA's X-Spam, then Received.
    assert score < spam < received
    assert junk
    assert "score=70" in site.daemon.log()  # the filter's own stderr line, logged by Pigeon


def test_score_below_block_threshold_disconnects_at_connect(site: Site) -> None:
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP("127.0.0.1", site.ports["block"], timeout=30)
    assert info.value.smtp_code == 550
    assert info.value.smtp_error == b"your IP reputation is too low for this MX"


def test_good_score_passes_with_the_score_header_only(site: Site) -> None:
    send(site, "pass", "senderscore 90")
    message, junk = site.find("senderscore 90")
    assert b"X-SenderScore: 90" in headers(message)
    assert b"X-Spam" not in message
    assert not junk
