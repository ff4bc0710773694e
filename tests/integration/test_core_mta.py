"""A real daemon, real clients: receive, queue, deliver, bounce, control."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    PigeonDaemon,
    Workdir,
    free_port,
    mail_uid_gid,
    maildir_messages,
    wait_for,
)

HOSTNAME = "mx.pigeon.test"


class Site:
    """One daemon for the module, with mailboxes for alice, bob and a few special users."""

    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(
            "".join(
                f"{name} {uid}:{gid}:{self.mail / name}\n"
                for name in ("alice", "bob", "carol", "perm", "soft", "wrapped")
            )
        )
        aliases = self.work.path / "aliases"
        aliases.write_text(
            "team: alice, bob\npostmaster: alice\n"
            f'fmt: "|echo %{{rcpt}} %{{rcpt.user:uppercase}} >> {self.mail}/fmt.out"\n'
        )
        self.flag = self.work.path / "soft-ok"
        self.port = free_port()
        config = f"""
table users file:{users}
table aliases file:{aliases}
smtp limit max-rcpt 5
smtp max-message-size 100K
listen on 127.0.0.1 port {self.port} hostname {HOSTNAME}
action "local" maildir alias <aliases> userbase <users>
action "perm" mda "echo no such mailbox here; exit 67" userbase <users>
action "soft" mda "test -e {self.flag} && cat > {self.mail}/soft.out || exit 75" userbase <users>
mda wrapper "note" "echo wrapped %{{rcpt.user}} >> {self.mail}/wrapper.out; %{{mda}}"
action "wrapped" mda "cat > {self.mail}/wrapped.out" userbase <users> wrapper "note"
match from any for rcpt-to "wrapped@{HOSTNAME}" action "wrapped"
match from any for rcpt-to "perm@{HOSTNAME}" action "perm"
match from any for rcpt-to "soft@{HOSTNAME}" action "soft"
match from any for local action "local"
match from any for domain "{HOSTNAME}" action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def send(site: Site, rcpts: list[str], body: str, sender: str = "sender@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.sendmail(sender, rcpts, body)


def test_ehlo_advertises_extensions(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        code, _banner = client.ehlo("client.example.org")
        assert code == 250
        for ext in ("pipelining", "8bitmime", "enhancedstatuscodes", "smtputf8", "dsn"):
            assert client.has_extn(ext), ext
        assert client.esmtp_features["size"] == str(100 * 1024)


def test_smtplib_message_is_delivered_with_headers(site: Site) -> None:
    # smtplib dot-stuffs the ".dot" line on the wire; Pigeon must store it unstuffed.
    body = "From: sender@example.org\r\nSubject: hello alice\r\n\r\nHi Alice.\r\n.dot\r\n"
    send(site, [f"alice@{HOSTNAME}"], body)
    wait_for(lambda: any(b"hello alice" in m for m in maildir_messages(site.maildir("alice"))))
    msg = next(m for m in maildir_messages(site.maildir("alice")) if b"hello alice" in m)
    assert msg.startswith(b"Return-Path: <sender@example.org>\nDelivered-To: alice@")
    assert b"Received: from client.example.org (localhost [127.0.0.1])" in msg
    assert f"by {HOSTNAME} (Pigeon) with ESMTP id ".encode() in msg
    assert f"for <alice@{HOSTNAME}>;".encode() in msg
    assert b"\n.dot\n" in msg and b"..dot" not in msg  # dot-stuffing undone
    assert b"\r\n" not in msg  # mailboxes on disk use LF


def test_swaks_delivers(site: Site) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (make test installs it as root)")
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{site.port}",
            "--to",
            f"bob@{HOSTNAME}",
            "--from",
            "swaks@example.org",
            "--header",
            "Subject: via swaks",
            "--helo",
            "swaks.test",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Message accepted for delivery" in result.stdout
    wait_for(lambda: any(b"via swaks" in m for m in maildir_messages(site.maildir("bob"))))


def test_alias_expands_to_two_mailboxes(site: Site) -> None:
    send(site, [f"team@{HOSTNAME}"], "Subject: for the team\r\n\r\nhi\r\n")
    for user in ("alice", "bob"):
        wait_for(
            lambda u=user: any(b"for the team" in m for m in maildir_messages(site.maildir(u)))
        )


def test_unknown_user_and_foreign_domain_are_refused(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        code, _ = client.rcpt(f"nobody-here@{HOSTNAME}")
        assert code == 550
        code, text = client.rcpt("victim@elsewhere.example.com")  # never an open relay
        assert code == 550, text
        code, _ = client.rcpt(f"alice@{HOSTNAME}")
        assert code == 250


def raw_session(port: int, payload: bytes, expect_replies: int) -> bytes:
    """Send ``payload`` in one write (pipelining) and read until enough replies came."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.recv(1024)  # banner
        s.sendall(payload)
        data = b""
        for _ in range(200):
            if data.count(b"\r\n") >= expect_replies and not data.endswith(b"-"):
                lines = [ln for ln in data.split(b"\r\n") if ln]
                finals = [ln for ln in lines if ln[3:4] == b" "]
                if len(finals) >= expect_replies:
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_pipelined_transaction_in_one_write(site: Site) -> None:
    payload = (
        b"EHLO pipe.example.org\r\n"
        b"MAIL FROM:<pipe@example.org>\r\n"
        b"RCPT TO:<carol@" + HOSTNAME.encode() + b">\r\n"
        b"DATA\r\n"
        b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"
        b"QUIT\r\n"
    )
    data = raw_session(site.port, payload, 6)
    finals = [ln for ln in data.split(b"\r\n") if ln[3:4] == b" "]
    codes = [ln[:3] for ln in finals]
    assert codes == [b"250", b"250", b"250", b"354", b"250", b"221"], data
    wait_for(lambda: any(b"pipelined" in m for m in maildir_messages(site.maildir("carol"))))


@pytest.mark.parametrize(
    "smuggled",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n\x00.\r\n", b"\r\n.\r"],
)
def test_smtp_smuggling_is_refused(site: Site, smuggled: bytes) -> None:
    marker = f"smuggle-{smuggled.hex()}".encode()
    payload = (
        b"EHLO smuggler.example.org\r\n"
        b"MAIL FROM:<s@example.org>\r\n"
        b"RCPT TO:<carol@" + HOSTNAME.encode() + b">\r\n"
        b"DATA\r\n"
        b"Subject: "
        + marker
        + b"\r\n\r\nfirst part"
        + smuggled
        + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<carol@"
        + HOSTNAME.encode()
        + b">\r\n"
        b"DATA\r\nSubject: smuggled " + marker + b"\r\n\r\nevil\r\n.\r\n"
        b"QUIT\r\n"
    )
    data = raw_session(site.port, payload, 6)
    finals = [ln for ln in data.split(b"\r\n") if ln[3:4] == b" "]
    end_of_data = finals[4]
    assert end_of_data[:1] == b"5", data  # refused after the real end of data
    assert not any(marker in m for m in maildir_messages(site.maildir("carol")))


def test_limits_rcpt_and_size(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        codes = [client.rcpt(f"alice@{HOSTNAME}")[0] for _ in range(6)]
        assert codes[:5] == [250] * 5
        assert codes[5] == 451  # OpenSMTPD: 451 4.5.3 Too many recipients
        client.rset()
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail(
                "sender@example.org", [f"alice@{HOSTNAME}"], "Subject: big\r\n\r\n" + "y" * 200_000
            )
        assert info.value.smtp_code == 552


def test_formats_in_an_alias_command_are_expanded(site: Site) -> None:
    """As smtpd, an alias's |command gets its %{...} formats expanded (they were passed on
    literally)."""
    send(site, [f"fmt@{HOSTNAME}"], "Subject: fmt\r\n\r\nx\r\n")
    out = site.mail / "fmt.out"
    wait_for(out.exists, what="the alias command")
    assert out.read_text() == f"fmt@{HOSTNAME} FMT\n"


def test_an_mda_wrapper_runs_instead_with_the_command_as_mda(site: Site) -> None:
    """smtpd.conf(5): with `wrapper NAME`, the wrapper's command runs instead of the MDA's,
    which it gets as %{mda} (it was checked, then ignored)."""
    send(site, [f"wrapped@{HOSTNAME}"], "Subject: wrapped\r\n\r\nthrough the wrapper\r\n")
    out = site.mail / "wrapped.out"
    wait_for(lambda: out.exists() and b"through the wrapper" in out.read_bytes(), what="mda")
    assert (site.mail / "wrapper.out").read_text() == "wrapped wrapped\n"


def test_permanent_failure_bounces_to_sender(site: Site) -> None:
    send(
        site,
        [f"perm@{HOSTNAME}"],
        "Subject: doomed\r\n\r\nwill fail\r\n",
        sender=f"alice@{HOSTNAME}",
    )

    def bounce() -> bytes | None:
        for m in maildir_messages(site.maildir("alice")):
            if b"Delivery status notification: failed" in m:
                return m
        return None

    wait_for(lambda: bounce() is not None, what="bounce")
    raw = bounce()
    assert raw is not None
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Return-Path"] is None or "<>" in str(msg["Return-Path"])
    parts = list(msg.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    text = raw.decode()
    assert f"Final-Recipient: rfc822; perm@{HOSTNAME}" in text
    assert "Action: failed" in text
    assert "Status: 5." in text
    assert "no such mailbox here" in text


def test_temporary_failure_is_retried(site: Site) -> None:
    send(site, [f"soft@{HOSTNAME}"], "Subject: retry me\r\n\r\nlater\r\n")

    def soft_row() -> dict[str, object] | None:
        rows = [r for r in site.daemon.queue() if r["dest"] == f"soft@{HOSTNAME}"]
        return rows[0] if rows else None

    wait_for(
        lambda: (r := soft_row()) is not None and int(str(r["retry"])) >= 1,
        what="a failed first attempt",
    )
    row = soft_row()
    assert row is not None and row["runstate"] == "pending"
    assert "temporary failure" in str(row["errorline"])
    site.flag.touch()
    out = site.daemon.ctl("schedule", str(row["evpid"])).stdout
    assert "1 envelope scheduled" in out
    # The queue entry goes once the mda has finished writing: then the file is complete.
    wait_for(lambda: soft_row() is None, what="the envelope to leave the queue")
    assert b"retry me" in (site.mail / "soft.out").read_bytes()


def test_show_stats_and_envelope(site: Site) -> None:
    stats = site.daemon.stats()
    assert int(str(stats["smtp.session.inet4"])) >= 1  # smtp.session: current, as smtpctl
    assert int(str(stats["scheduler.delivery.ok"])) >= 1
    text = site.daemon.ctl("show", "stats").stdout
    assert "uptime=" in text and "scheduler.delivery.ok=" in text
    bad = site.daemon.ctl("show", "envelope", "0123456789abcdef", check=False)
    assert bad.returncode == 1


def test_log_lines_in_opensmtpd_format(site: Site) -> None:
    log = site.daemon.log()
    assert " smtp connected address=127.0.0.1 host=localhost" in log
    assert " smtp message msgid=" in log
    assert " mda delivery evpid=" in log and "result=Ok stat=Delivered" in log


def test_disconnected_lines_say_how_the_session_ended(site: Site) -> None:
    """As smtpd: ``quit`` after QUIT, ``disconnect`` when the client just goes away; one
    line per session. (An unknown command with a marker names each session in the log.)"""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
        sock.recv(1000)
        sock.sendall(b"XGONE went-away\r\n")
        sock.recv(1000)
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
        sock.recv(1000)
        sock.sendall(b"XQUIT said-quit\r\nQUIT\r\n")
        while sock.recv(1000):  # until the server closes (bounded by the timeout)
            pass

    def session(marker: str) -> str:
        wait_for(lambda: marker in site.daemon.log(), what=marker)
        return next(ln for ln in site.daemon.log().splitlines() if marker in ln).split()[0]

    def ended(sid: str) -> list[str]:
        prefix = f"{sid} smtp disconnected "
        return [ln[len(prefix) :] for ln in site.daemon.log().splitlines() if ln.startswith(prefix)]

    gone, quit_ = session("XGONE went-away"), session("XQUIT said-quit")
    wait_for(lambda: ended(gone) and ended(quit_), what="both disconnected lines")
    assert ended(gone) == ["reason=disconnect"]
    assert ended(quit_) == ["reason=quit"]


def test_messages_queued_while_paused_survive_restart(workdir: Workdir) -> None:
    mail = workdir.mailroot()
    uid, gid = mail_uid_gid()
    users = workdir.path / "users"
    users.write_text(f"dave {uid}:{gid}:{mail / 'dave'}\n")
    port = free_port()
    conf = f"""table users file:{users}
listen on 127.0.0.1 port {port}
action "local" maildir userbase <users>
match from any for local action "local"
"""
    daemon = PigeonDaemon(workdir.path, conf, port=port, extra=["-P", "mda"])
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("x@example.org", ["dave@localhost"], "Subject: kept\r\n\r\nx\r\n")
        rows = daemon.queue()
        assert len(rows) == 1 and rows[0]["dest"] == "dave@localhost"
        assert rows[0]["runstate"] == "pending" and rows[0]["delay"] == -1  # held, as smtpctl
    finally:
        daemon.stop()
    offline = daemon.ctl("show", "queue")
    assert "|offline|" in offline.stdout
    daemon.extra = []
    daemon.start()
    try:
        wait_for(lambda: len(maildir_messages(mail / "dave" / "Maildir")) == 1)
        daemon.wait_queue_empty()
    finally:
        daemon.stop()
    assert os.path.isdir(mail / "dave" / "Maildir" / "cur")
