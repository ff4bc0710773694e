"""Builtin filters, junk, proc filters and report events, through a real daemon."""

from __future__ import annotations

import os
import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

HOST = "mx.filters.test"
BIN = Path(__file__).parent / "filterbin"
EXAMPLES = Path(__file__).parents[2] / "examples" / "filters"

# name -> (filter directive(s), what the listener attaches)
LISTENERS = {
    "rdns_junk": ("filter check_rdns phase connect match !rdns junk", "check_rdns"),
    "go_away": ('filter go_away phase connect match !rdns disconnect "550 GO AWAY"', "go_away"),
    "src_reject": (
        'filter block_src phase connect match src { "127.0.0.3" } reject "554 5.7.1 blocked"',
        "block_src",
    ),
    "helo_regex": (
        'filter bad_helo phase ehlo match helo regex { "^bad[.]" } reject "550 5.7.1 bad helo"',
        "bad_helo",
    ),
    "mail_junk": (
        'filter spam_from phase mail-from match mail-from { "spam@evil.test" } junk',
        "spam_from",
    ),
    "rcpt_rewrite": (
        'filter redirect phase rcpt-to match rcpt-to { "old@' + HOST + '" } '
        'rewrite "<alice@' + HOST + '>"',
        "redirect",
    ),
    "commit_reject": (
        'filter no_commit phase commit match mail-from regex { "^refuse" } '
        'reject "554 5.7.1 refused at commit"',
        "no_commit",
    ),
    # bypass skips the rest of the chain: fcrdns clients (127.0.0.1 = localhost) are not junked.
    "bypass": (
        "filter trust phase mail-from match fcrdns bypass\n"
        'filter junk_all phase mail-from match mail-from regex { ".*" } junk\n'
        "filter bypass_chain chain { trust, junk_all }",
        "bypass_chain",
    ),
    "rdns_regex": (
        'filter rdns_re phase helo match rdns regex { "^local" } reject "550 5.7.1 local rdns"',
        "rdns_re",
    ),
    "data_junk": ("filter data_junk phase data match !auth junk", "data_junk"),
}


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        self.logs = self.work.mailroot("logs")
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        self.ports = {
            name: free_port() for name in [*LISTENERS, "proc", "proc06", "stamp", "procrej"]
        }
        self.record = self.logs / "record.log"
        self.record06 = self.logs / "record06.log"
        lines = [f"table users file:{users}"]
        for name, (decl, attach) in LISTENERS.items():
            lines.append(decl)
            lines.append(
                f"listen on 127.0.0.1 port {self.ports[name]} hostname {HOST} filter {attach}"
            )
        py = sys.executable
        lines += [
            f'proc recorder "/usr/bin/python3 {BIN / "recorder.py"} {self.record} dataline"',
            f'proc recorder06 "/usr/bin/python3 {BIN / "recorder.py"} {self.record06}"'
            ' protocol "0.6"',
            "filter rec proc recorder",
            "filter rec06 proc recorder06",
            'filter note phase connect match src { "127.0.0.0/8" } report "hello builtin"',
            f"listen on 127.0.0.1 port {self.ports['proc']} hostname {HOST} filter {{ note, rec }}",
            f"listen on 127.0.0.1 port {self.ports['proc06']} hostname {HOST} filter rec06",
            'filter rcptno phase rcpt-to match rcpt-to regex "^nobody@" reject "550 not here"',
            f"listen on 127.0.0.1 port {self.ports['procrej']} hostname {HOST}"
            " filter { rec, rcptno }",
            f'filter stamp proc-exec "{py} {EXAMPLES / "add_header.py"} X-Stamp pigeon"',
            f"listen on 127.0.0.1 port {self.ports['stamp']} hostname {HOST} filter stamp",
            'action "local" maildir junk userbase <users>',
            'match from any for any action "local"',
        ]
        port = self.ports["rdns_junk"]
        self.daemon = PigeonDaemon(self.work.path, "\n".join(lines) + "\n", port=port)

    def maildir(self) -> Path:
        return self.mail / "alice" / "Maildir"

    def all_messages(self) -> list[bytes]:
        return maildir_messages(self.maildir()) + maildir_messages(self.maildir() / ".Junk")


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def connect(site: Site, name: str, src: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", site.ports[name], source_address=(src, 0), timeout=15)


def deliver(
    site: Site,
    name: str,
    subject: str,
    *,
    src: str = "127.0.0.1",
    sender: str = "sender@example.net",
    rcpt: str = f"alice@{HOST}",
) -> bytes:
    """Send one message and return it as delivered (from new/ or .Junk/new)."""
    with connect(site, name, src) as client:
        client.ehlo("client.example.net")
        client.sendmail(sender, [rcpt], f"Subject: {subject}\r\n\r\nhello\r\n.dot\r\n")
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [m for m in site.all_messages() if f"Subject: {subject}".encode() in m]
        return bool(found)

    wait_for(arrived, what=f"delivery of {subject}")
    return found[0]


def is_junk(site: Site, subject: str) -> bool:
    junk = maildir_messages(site.maildir() / ".Junk")
    return any(f"Subject: {subject}".encode() in m for m in junk)


def test_no_rdns_client_is_junked_with_x_spam_yes(site: Site) -> None:
    message = deliver(site, "rdns_junk", "rdns-junk-1", src="127.0.0.2")
    headers = message.split(b"\n\n", 1)[0].split(b"\n")
    x_spam = [i for i, h in enumerate(headers) if h.startswith(b"X-Spam:")]
    received = [i for i, h in enumerate(headers) if h.startswith(b"Received:")]
    assert headers[x_spam[0]].strip() == b"X-Spam: yes"
    assert x_spam[0] < received[0]  # before Pigeon's Received:, as smtpd does
    assert is_junk(site, "rdns-junk-1")


def test_client_with_rdns_is_not_junked(site: Site) -> None:
    message = deliver(site, "rdns_junk", "rdns-junk-2", src="127.0.0.1")
    assert b"X-Spam" not in message
    assert not is_junk(site, "rdns-junk-2")


def test_session_junk_applies_to_every_message_of_the_session(site: Site) -> None:
    with connect(site, "rdns_junk", "127.0.0.2") as client:
        client.ehlo("client.example.net")
        for n in (1, 2):
            client.sendmail("s@example.net", [f"alice@{HOST}"], f"Subject: sess-{n}\r\n\r\nx\r\n")
    wait_for(lambda: is_junk(site, "sess-1") and is_junk(site, "sess-2"), what="junked pair")


def test_disconnect_at_connect_sends_the_text_and_closes(site: Site) -> None:
    with pytest.raises(smtplib.SMTPConnectError) as info:
        connect(site, "go_away", "127.0.0.2")
    assert info.value.smtp_code == 550
    assert b"GO AWAY" in info.value.smtp_error
    with connect(site, "go_away", "127.0.0.1") as client:
        assert client.noop()[0] == 250


def test_src_table_reject_at_connect(site: Site) -> None:
    with pytest.raises(smtplib.SMTPConnectError) as info:
        connect(site, "src_reject", "127.0.0.3")
    assert info.value.smtp_code == 554
    with connect(site, "src_reject", "127.0.0.4") as client:
        assert client.noop()[0] == 250


def test_helo_regex_reject(site: Site) -> None:
    with connect(site, "helo_regex") as client:
        code, text = client.ehlo("bad.example.net")
        assert code == 550 and b"bad helo" in text
        assert client.ehlo("good.example.net")[0] == 250


def test_mail_from_table_junks_only_that_transaction(site: Site) -> None:
    with connect(site, "mail_junk") as client:
        client.ehlo("client.example.net")
        client.sendmail("spam@evil.test", [f"alice@{HOST}"], "Subject: mf-1\r\n\r\nx\r\n")
        client.sendmail("ham@good.test", [f"alice@{HOST}"], "Subject: mf-2\r\n\r\nx\r\n")
    wait_for(lambda: is_junk(site, "mf-1"), what="junked mf-1")
    wait_for(lambda: any(b"Subject: mf-2" in m for m in maildir_messages(site.maildir())))
    assert not is_junk(site, "mf-2")


def test_rcpt_rewrite_delivers_to_the_new_address(site: Site) -> None:
    message = deliver(site, "rcpt_rewrite", "rewritten", rcpt=f"old@{HOST}")
    assert b"Delivered-To: alice@" in message


def test_commit_reject_refuses_the_message(site: Site) -> None:
    with connect(site, "commit_reject") as client:
        client.ehlo("client.example.net")
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("refuse@x.test", [f"alice@{HOST}"], "Subject: commit-no\r\n\r\nx\r\n")
        assert info.value.smtp_code == 554
        client.sendmail("accept@x.test", [f"alice@{HOST}"], "Subject: commit-yes\r\n\r\nx\r\n")
    wait_for(lambda: any(b"Subject: commit-yes" in m for m in site.all_messages()))
    assert not any(b"Subject: commit-no" in m for m in site.all_messages())


def test_bypass_skips_the_rest_of_the_chain(site: Site) -> None:
    deliver(site, "bypass", "bypassed", src="127.0.0.1")  # localhost: fcrdns pass
    assert not is_junk(site, "bypassed")
    deliver(site, "bypass", "not-bypassed", src="127.0.0.2")  # no PTR: fcrdns fail
    assert is_junk(site, "not-bypassed")


def test_rdns_regex_in_helo_phase(site: Site) -> None:
    with connect(site, "rdns_regex", "127.0.0.1") as client:
        assert client.helo("x.example.net")[0] == 550
    with connect(site, "rdns_regex", "127.0.0.2") as client:
        assert client.helo("x.example.net")[0] == 250


def test_junk_in_data_phase_marks_the_message(site: Site) -> None:
    deliver(site, "data_junk", "data-junk")
    assert is_junk(site, "data-junk")


def test_proc_filter_sees_reports_requests_and_data_lines(site: Site) -> None:
    message = deliver(site, "proc", "proc-1")
    assert b"\n.dot\n" in message  # dot-stuffing undone exactly once
    text = site.record.read_text()
    assert "config|protocol|0.7" in text
    for event in (
        "link-connect",
        "link-greeting",
        "link-identify",
        "tx-begin",
        "tx-mail",
        "tx-rcpt",
        "tx-envelope",
        "tx-data",
        "tx-commit",
        "tx-reset",
        "filter-response",
        "protocol-server",
        "link-disconnect",
    ):
        assert f"|smtp-in|{event}|" in text or text.count(f"|{event}|") or f"|{event}" in text, (
            event
        )
    assert "|filter-report|" in text and "|builtin|note|hello builtin" in text
    lines = text.splitlines()
    stream = [
        ln.split("|", 7)[7] for ln in lines if "|data-line|" in ln and ln.startswith("filter|")
    ]
    assert stream[0].startswith("Received: from client.example.net")
    assert "..dot" in stream and stream[-1] == "."
    mail = [ln for ln in lines if "|tx-mail|" in ln][-1]
    assert mail.endswith("|ok|sender@example.net")  # 0.6+ order: result before address


def test_date_and_message_id_are_added_after_the_filters(site: Site) -> None:
    """A local submission without Date and Message-ID gets them, at the end of its header
    and after the filter chain, as smtpd: rspamd behind filter-rspamd must see them missing
    (MISSING_DATE, MISSING_MID), not Pigeon's own."""
    message = deliver(site, "proc", "no-date-no-mid")
    stream = [
        ln.split("|", 7)[7]
        for ln in site.record.read_text().splitlines()
        if "|data-line|" in ln and ln.startswith("filter|")
    ]
    start = max(i for i, line in enumerate(stream) if line.startswith("Received: from"))
    seen = stream[start : stream.index("", start)]
    assert "Subject: no-date-no-mid" in seen
    assert not any(line.startswith(("Date:", "Message-ID:")) for line in seen)
    head = message.split(b"\n\n", 1)[0].split(b"\n")
    names = [line.split(b":", 1)[0] for line in head if not line[:1].isspace()]
    assert names[-3:] == [b"Subject", b"Date", b"Message-ID"]  # appended after the client's


def test_a_command_refused_before_any_phase_is_reported_before_its_reply(site: Site) -> None:
    """smtpd reports every client line: an unknown command or one out of sequence too
    (Pigeon reported only the server's reply to it)."""
    with connect(site, "proc") as client:
        client.ehlo("client.example.net")
        assert client.docmd("FROBNICATE", "now")[0] == 500
        assert client.docmd("RCPT TO:<alice@" + HOST + ">")[0] == 503
    lines = site.record.read_text().splitlines()
    client_at = max(
        i for i, ln in enumerate(lines) if "|protocol-client|" in ln and "FROBNICATE" in ln
    )
    server_at = next(i for i, ln in enumerate(lines) if i > client_at and "|protocol-server|" in ln)
    assert "|500 " in lines[server_at]
    assert any("|protocol-client|" in ln and "RCPT TO:<alice@" in ln for ln in lines)


def test_a_recipient_a_filter_refuses_is_reported_as_a_failed_tx_rcpt(site: Site) -> None:
    with connect(site, "procrej") as client:
        client.ehlo("client.example.net")
        assert client.mail("sender@example.net")[0] == 250
        assert client.rcpt(f"nobody@{HOST}")[0] == 550
    lines = site.record.read_text().splitlines()
    assert any(ln.endswith(f"|permfail|nobody@{HOST}") and "|tx-rcpt|" in ln for ln in lines)


def test_protocol_06_option_speaks_06(site: Site) -> None:
    deliver(site, "proc06", "proc-06")
    text = site.record06.read_text()
    assert "config|smtpd-version|6.8.0p2" in text and "config|protocol" not in text
    assert "report|0.6|" in text and "report|0.7|" not in text


def test_sdk_example_adds_a_header_through_data_lines(site: Site) -> None:
    message = deliver(site, "stamp", "stamped")
    headers = message.split(b"\n\n", 1)[0]
    assert b"\nX-Stamp: pigeon" in headers


def test_mailboxes_belong_to_the_test_user(site: Site) -> None:
    # Sanity: deliveries above went to the configured user's maildir.
    uid, _ = mail_uid_gid()
    assert os.stat(site.maildir()).st_uid == uid
