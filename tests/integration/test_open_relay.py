"""Never an open relay: the classic relay tricks, sent from an outside address (127.0.0.2 is
not one of the host's own addresses, so not ``local``), are all refused, on a plain listener
and on an AUTH listener without AUTH; the tricks a local client may send to a local domain
are delivered (or refused) locally and never reach the relay.

Every relay action points at a sink, so anything relayed by mistake is seen there."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme
from aiosmtpd.controller import Controller
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from sinks import RecordingHandler

OUTSIDE = "127.0.0.2"
DOMAIN = "relay.test"
MX = "mx.relay.test"
PASSWORD = "alice relays"

# Recipients an outside client must never get accepted. Each is a way to make a naive
# MTA hand mail to evil.example (or somewhere else that is not ours).
RELAY_TRICKS = [
    "victim@evil.example",  # plain relay
    "victim@EVIL.EXAMPLE",
    "Victim@Evil.Example",
    "victim@evil.example.",  # trailing dot
    "victim@evil.example..",
    f"victim@{DOMAIN}.evil.example",  # our domain as a prefix
    f"victim@sub.{DOMAIN}",  # a subdomain is not the domain
    f"victim@evil-{DOMAIN}",
    "victim%evil.example@localhost",  # percent hack via the local names
    f"victim%evil.example@[{OUTSIDE}]",
    "victim%evil.example@[127.0.0.1]",
    f"victim%evil.example@{DOMAIN}",  # percent hack via our domain
    f"victim%evil.example%{DOMAIN}@{DOMAIN}",
    f"victim@evil.example%{DOMAIN}",
    f"evil.example!victim@{DOMAIN}",  # bang paths
    "evil.example!victim@localhost",
    "evil.example!victim",
    f"{DOMAIN}!evil.example!victim",
    f"@{DOMAIN}:victim@evil.example",  # source routes
    f"@{DOMAIN},@{MX}:victim@evil.example",
    f"{DOMAIN}:victim@evil.example",  # OpenSMTPD's looser route form: stripped, then refused
    f"@evil.example:victim@{DOMAIN}",  # (a route to us, for a user we do not have)
    f'"victim@evil.example"@{DOMAIN}',  # quoted local parts with @
    '"victim@evil.example"@localhost',
    f'"victim%evil.example"@{DOMAIN}',
    f'"evil.example!victim"@{DOMAIN}',
    f"victim@evil.example@{DOMAIN}",  # two @
    f"victim@{DOMAIN}@evil.example",
    "victim@[192.0.2.1]",  # IP literals
    "victim@[IPv6:2001:db8::1]",
    "victim@192.0.2.1",
    "victim@[127.0.0.1]",  # from outside, `for local` does not apply
    "victim@localhost",
    "victim@LOCALHOST",
    "postmaster@evil.example",
    "victim@evil.example ",
    "victim",  # no domain at all
    "victim@",
    "@evil.example",
]

# Addresses at our domain whose local part tries to smuggle a route: an outside client gets
# them refused (no such user), and nothing leaves toward evil.example.
LOCAL_DOMAIN_TRICKS = [
    f"alice%evil.example@{DOMAIN}",
    f"alice%evil.example@{DOMAIN.upper()}",
    f"evil.example!alice@{DOMAIN}",
    f'"alice@evil.example"@{DOMAIN}',
    f"alice@evil.example@{DOMAIN}",
]


class Site:
    """The OpenBSD default config (local delivery, relay for local senders), an MX domain,
    and a second listener where authenticated users may relay (smtpd.conf(5) example 2)."""

    def __init__(self) -> None:
        self.sink = RecordingHandler()
        self.sink_port = free_port()
        self.sink_ctl = Controller(self.sink, hostname="127.0.0.1", port=self.sink_port)
        self.sink_ctl.start()
        self.work = Workdir()
        self.mail = self.work.mailroot()
        d = self.work.path
        uid, gid = mail_uid_gid()
        (d / "users").write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        (d / "aliases").write_text("postmaster: alice\nroot: alice\n")
        self.ca = trustme.CA()
        cert = self.ca.issue_cert(MX)
        cert.private_key_pem.write_to_path(str(d / "mx.key"))
        cert.cert_chain_pems[0].write_to_path(str(d / "mx.crt"))
        from pigeon.crypt_hash import hash_password

        (d / "creds").write_text(f"alice {hash_password(PASSWORD)}\n")
        self.port = free_port()
        self.port_auth = free_port()
        config = f"""
pki {MX} cert "{d / "mx.crt"}"
pki {MX} key "{d / "mx.key"}"
table aliases file:{d / "aliases"}
table users file:{d / "users"}
table creds file:{d / "creds"}
listen on 127.0.0.1 port $plain_port hostname {MX}
listen on 127.0.0.1 port {self.port_auth} hostname {MX} tls pki {MX} auth-optional <creds>
action "local" maildir alias <aliases> userbase <users>
action "relay" relay host smtp+notls://127.0.0.1:{self.sink_port}
match for local action "local"
match from any for domain "{DOMAIN}" action "local"
match from local for any action "relay"
match auth from any for any action "relay"
"""
        # the port comes from the command line: `pigeon run -D` works like `smtpd -D`
        self.daemon = PigeonDaemon(
            d, config, port=self.port, extra=["-D", f"plain_port={self.port}"]
        )


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.sink_ctl.stop()
        s.work.cleanup()


class Client:
    """A raw SMTP client bound to a chosen source address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")
        assert self.reply()[0] == 220

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline(1000).decode()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line)
            if line[3:4] != "-":
                return int(line[:3]), "".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, ca: trustme.CA) -> None:
        assert self.cmd("STARTTLS")[0] == 220
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=MX)
        self.file = self.sock.makefile("rb")

    def send_body(self, subject: str) -> tuple[int, str]:
        assert self.cmd("DATA")[0] == 354
        self.sock.sendall(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.cmd("QUIT")
        self.sock.close()


def rcpt_results(client: Client, rcpts: list[str]) -> dict[str, int]:
    """RCPT each address in its own transaction; the reply code of each."""
    out = {}
    for rcpt in rcpts:
        assert client.cmd("MAIL FROM:<attacker@evil.example>")[0] == 250
        out[rcpt] = client.cmd(f"RCPT TO:<{rcpt}>")[0]
        if out[rcpt] < 400:  # accepted: send it, so a mistaken relay would show on the sink
            client.send_body(f"trick {rcpt}")
        else:
            client.cmd("RSET")
    return out


def test_outside_address_is_not_local() -> None:
    from pigeon.server.localaddr import is_local

    assert not is_local(OUTSIDE)


def test_relay_tricks_from_outside_are_refused(site: Site) -> None:
    client = Client(site.port, OUTSIDE)
    try:
        client.cmd("EHLO attacker.evil.example")
        results = rcpt_results(client, RELAY_TRICKS + LOCAL_DOMAIN_TRICKS)
    finally:
        client.close()
    accepted = {r: code for r, code in results.items() if not 500 <= code < 600}
    assert not accepted, f"relay tricks not refused: {accepted}"


def test_relay_tricks_over_tls_without_auth_are_refused(site: Site) -> None:
    client = Client(site.port_auth, OUTSIDE)
    try:
        client.cmd("EHLO attacker.evil.example")
        client.starttls(site.ca)
        client.cmd("EHLO attacker.evil.example")
        results = rcpt_results(client, RELAY_TRICKS + LOCAL_DOMAIN_TRICKS)
    finally:
        client.close()
    accepted = {r: code for r, code in results.items() if not 500 <= code < 600}
    assert not accepted, f"relay tricks not refused: {accepted}"


def test_failed_auth_does_not_open_the_relay(site: Site) -> None:
    import base64

    client = Client(site.port_auth, OUTSIDE)
    try:
        client.cmd("EHLO attacker.evil.example")
        client.starttls(site.ca)
        client.cmd("EHLO attacker.evil.example")
        token = base64.b64encode(b"\0alice\0wrong password").decode()
        assert client.cmd(f"AUTH PLAIN {token}")[0] == 535
        results = rcpt_results(client, ["victim@evil.example", "victim%evil.example@localhost"])
    finally:
        client.close()
    assert all(500 <= code < 600 for code in results.values()), results


def test_mail_for_our_domain_from_outside_is_accepted(site: Site) -> None:
    """The positive control: the outside client is refused for relaying, not for everything."""
    client = Client(site.port, OUTSIDE)
    try:
        client.cmd("EHLO friend.example")
        assert client.cmd("MAIL FROM:<friend@friend.example>")[0] == 250
        assert client.cmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
        assert client.cmd(f"RCPT TO:<ALICE@{DOMAIN.upper()}>")[0] == 250
        assert client.send_body("hello alice from outside")[0] == 250
    finally:
        client.close()
    wait_for(
        lambda: any(
            b"hello alice from outside" in m
            for m in maildir_messages(site.mail / "alice" / "Maildir")
        ),
        what="local delivery",
    )


def test_authenticated_user_may_relay(site: Site) -> None:
    """Another control: the relay works, so the sink would see a mistaken relay."""
    import base64

    client = Client(site.port_auth, OUTSIDE)
    try:
        client.cmd("EHLO laptop.example")
        client.starttls(site.ca)
        client.cmd("EHLO laptop.example")
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert client.cmd(f"AUTH PLAIN {token}")[0] == 235
        assert client.cmd(f"MAIL FROM:<alice@{DOMAIN}>")[0] == 250
        assert client.cmd("RCPT TO:<friend@friend.example>")[0] == 250
        assert client.send_body("authenticated relay")[0] == 250
    finally:
        client.close()
    wait_for(
        lambda: any(b"authenticated relay" in m.data for m in site.sink.received()),
        what="the relayed message on the sink",
    )


def test_local_client_tricks_to_local_names_are_not_relayed(site: Site) -> None:
    """A local client may relay anything, but an address at a local name is local: its
    ``%``, ``!`` or quoted ``@`` must not turn into a relay to evil.example."""
    tricks = [
        "victim%evil.example@localhost",
        "evil.example!victim@localhost",
        '"victim@evil.example"@localhost',
        f"victim%evil.example@{DOMAIN}",
        f"alice%evil.example@{DOMAIN}",
        "victim%evil.example@[127.0.0.1]",
        "alice+victim%evil.example@localhost",  # a sub-address: delivered to alice
    ]
    client = Client(site.port, "127.0.0.1")
    try:
        client.cmd("EHLO localhost")
        results = rcpt_results(client, tricks)
    finally:
        client.close()
    # alice's sub-address is hers; the others name users we do not have
    assert results.pop("alice+victim%evil.example@localhost") == 250
    assert all(500 <= code < 600 for code in results.values()), results
    site.daemon.wait_queue_empty()
    relayed = [m for m in site.sink.received() if b"trick " in m.data]
    assert not relayed, relayed
    assert any(
        b"trick alice+victim%evil.example@localhost" in m
        for m in maildir_messages(site.mail / "alice" / "Maildir")
    )


def test_nothing_from_the_tricks_reached_the_relay(site: Site) -> None:
    site.daemon.wait_queue_empty()
    leaked = [(m.sender, m.rcpts) for m in site.sink.received() if b"trick " in m.data]
    assert not leaked, leaked
    assert all("evil.example" not in " ".join(m.rcpts) for m in site.sink.received())
