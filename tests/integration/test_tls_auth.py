"""TLS and AUTH through a running daemon: STARTTLS and smtps with real certificates, SNI,
client certificates checked against a ``ca``, ``tls-require``, AUTH PLAIN/LOGIN against
``$6$`` and ``$2b$`` hashes, ``senders``/``masquerade``, ``received-auth`` and ``mask-src``."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import trustme
from harness import (
    PigeonDaemon,
    Workdir,
    free_port,
    mail_uid_gid,
    maildir_messages,
    pigeon_encrypt,
    wait_for,
)

DOMAIN = "tls.test"
MX = "mx.tls.test"
OTHER = "other.tls.test"
ALICE_PASSWORD = "alice's sha512 secret"
BOB_PASSWORD = "bob bcrypt secret"


class Site:
    """One daemon, one listener per TLS/AUTH flavour, all delivering to local maildirs."""

    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        d = self.work.path
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.stranger_ca = trustme.CA()  # signs a client certificate nobody trusts
        for name in (MX, OTHER):
            cert = self.ca.issue_cert(name)
            cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
            cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.crt"))
        self.client_ca.cert_pem.write_to_path(str(d / "clientca.crt"))
        self.client_cert = self.client_ca.issue_cert("client.tls.test")
        self.stranger_cert = self.stranger_ca.issue_cert("client.tls.test")

        uid, gid = mail_uid_gid()
        (d / "users").write_text(
            "".join(f"{u} {uid}:{gid}:{self.mail / u}\n" for u in ("alice", "bob", "carol"))
        )
        self.alice_hash = pigeon_encrypt(ALICE_PASSWORD)
        assert self.alice_hash.startswith("$6$")
        self.bob_hash = bcrypt.hashpw(BOB_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        assert self.bob_hash.startswith("$2b$")
        (d / "creds").write_text(f"alice {self.alice_hash}\nbob bob:{self.bob_hash}\n")
        (d / "senders").write_text(f"alice alice@{DOMAIN}\nbob bob@{DOMAIN}, @bob.example\n")

        self.port_starttls = free_port()
        self.port_smtps = free_port()
        self.port_require = free_port()
        self.port_verify = free_port()
        self.port_mask = free_port()
        self.port_nopki = free_port()  # tls without pki: smtpd 6.8 takes the hostname's
        self.port_nomatch = free_port()  # ... and no pki of that name: the first one
        config = f"""
pki {MX} cert "{d / (MX + ".crt")}"
pki {MX} key "{d / (MX + ".key")}"
pki {OTHER} cert "{d / (OTHER + ".crt")}"
pki {OTHER} key "{d / (OTHER + ".key")}"
ca clientca cert "{d / "clientca.crt"}"
table users file:{d / "users"}
table creds file:{d / "creds"}
table sendermap file:{d / "senders"}
listen on 127.0.0.1 port {self.port_starttls} hostname {MX} tls pki {MX} pki {OTHER} \\
    auth-optional <creds> senders <sendermap> masquerade received-auth
listen on 127.0.0.1 port {self.port_smtps} hostname {MX} smtps pki {MX} auth <creds>
listen on 127.0.0.1 port {self.port_require} hostname {MX} tls-require pki {MX}
listen on 127.0.0.1 port {self.port_verify} hostname {MX} tls-require verify pki {MX} \\
    ca clientca
listen on 127.0.0.1 port {self.port_mask} hostname {MX} tls pki {MX} auth <creds> mask-src
listen on 127.0.0.1 port {self.port_nopki} hostname {OTHER} tls
listen on 127.0.0.1 port {self.port_nomatch} hostname nomatch.tls.test tls
action "local" maildir userbase <users>
match from any for domain "{DOMAIN}" action "local"
"""
        self.daemon = PigeonDaemon(d, config, port=self.port_starttls)

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def client_context(self, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """Trusts the site's CA and checks the server's name, like a careful client."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        return ctx

    def ca_file(self) -> str:
        path = self.work.path / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.work.cleanup()


def message(subject: str, sender: str = f"someone@{DOMAIN}") -> str:
    return f"From: Some One <{sender}>\r\nTo: x@{DOMAIN}\r\nSubject: {subject}\r\n\r\nbody\r\n"


def delivered(site: Site, user: str, subject: str) -> email.message.EmailMessage:
    needle = f"Subject: {subject}".encode()
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [m for m in maildir_messages(site.maildir(user)) if needle in m]
        return bool(found)

    wait_for(arrived, what=f"{subject!r} in {user}'s maildir")
    msg = email.message_from_bytes(found[0], policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def received(msg: email.message.EmailMessage) -> str:
    value = msg.get_all("Received")
    assert value, msg
    return " ".join(str(value[0]).split())


class Transcript:
    """A hand-driven SMTP client, so SNI and the TLS handshake are under the test's control."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=10
        )
        self.file = self.sock.makefile("rb")

    def tls(self, context: ssl.SSLContext, server_name: str) -> ssl.SSLSocket:
        assert not isinstance(self.sock, ssl.SSLSocket)
        wrapped = context.wrap_socket(self.sock, server_hostname=server_name)
        self.sock = wrapped
        self.file = wrapped.makefile("rb")
        return wrapped

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline(1000).decode()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line[4:].rstrip("\r\n"))
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def starttls_peer(site: Site, port: int, server_name: str) -> tuple[ssl.SSLSocket, Transcript]:
    t = Transcript(port)
    assert t.reply()[0] == 220
    assert t.cmd("EHLO client.test")[0] == 250
    assert t.cmd("STARTTLS")[0] == 220
    return t.tls(site.client_context(), server_name), t


def peer_names(sock: ssl.SSLSocket) -> set[str]:
    cert = sock.getpeercert()
    assert cert is not None
    return {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}


# ---------------------------------------------------------------------------- TLS


def test_starttls_with_smtplib_delivers_with_tls_in_received(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port_starttls, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # AUTH only after TLS
        client._host = MX  # type: ignore[attr-defined]  # SNI and name check against MX
        client.starttls(context=site.client_context())
        client.ehlo("client.test")
        assert client.has_extn("auth")
        client.sendmail(f"x@{DOMAIN}", [f"alice@{DOMAIN}"], message("starttls-smtplib"))
    head = received(delivered(site, "alice", "starttls-smtplib"))
    assert "with ESMTPS id" in head
    # smtpd's line after the handshake: version, cipher, bits
    assert re.search(
        r"^[0-9a-f]{16} smtp tls ciphers=TLSv1\.[23]:\S+:\d+$", site.daemon.log(), re.M
    )
    assert "TLSv1." in head and ":NO)" in head
    # received-auth on this listener: an unauthenticated session says so
    assert "auth=no" in head


def test_tls_without_pki_serves_the_certificate_of_the_listener_hostname(site: Site) -> None:
    """smtpd 6.8's rule: no `pki` on the listener, the pki named after its `hostname`; a
    client asking for another configured name by SNI gets that one."""
    for name in (OTHER, MX):
        with smtplib.SMTP("127.0.0.1", site.port_nopki, timeout=10) as client:
            client._host = name  # type: ignore[attr-defined]  # SNI and the name check
            client.starttls(context=site.client_context())  # fails on the wrong certificate
            assert client.noop()[0] == 250
    with smtplib.SMTP("127.0.0.1", site.port_nopki, timeout=10) as client:
        ctx = site.client_context()
        ctx.check_hostname = False
        client.starttls(context=ctx)  # no SNI: the hostname's
        assert client.sock is not None
        peer = client.sock.getpeercert()  # type: ignore[attr-defined]
        names = [value for kind, value in peer["subjectAltName"] if kind == "DNS"]
        assert names == [OTHER]


def test_tls_without_pki_and_no_pki_of_its_name_serves_the_first_with_a_warning(
    site: Site,
) -> None:
    """smtpd 6.8 takes such a config and fails every handshake; Pigeon keeps TLS working."""
    assert 'no pki named nomatch.tls.test or "*": TLS uses pki ' + MX in site.daemon.log()
    with smtplib.SMTP("127.0.0.1", site.port_nomatch, timeout=10) as client:
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        assert client.noop()[0] == 250


def test_starttls_with_swaks(site: Site) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(site.port_starttls),
            "--tls",
            "--tls-ca-path",
            site.ca_file(),
            "--tls-verify",
            "--tls-sni",
            MX,
            "--from",
            f"x@{DOMAIN}",
            "--to",
            f"bob@{DOMAIN}",
            "--header",
            "Subject: starttls-swaks",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTTLS" in result.stdout
    assert "ESMTPS" in received(delivered(site, "bob", "starttls-swaks"))


def test_sni_chooses_the_pki_named_by_the_client(site: Site) -> None:
    for name in (MX, OTHER):
        sock, t = starttls_peer(site, site.port_starttls, name)
        try:
            assert peer_names(sock) == {name}
            assert t.cmd("EHLO client.test")[0] == 250
        finally:
            t.close()


def test_sni_unknown_name_gets_the_first_pki(site: Site) -> None:
    t = Transcript(site.port_starttls)
    try:
        t.reply()
        t.cmd("EHLO client.test")
        assert t.cmd("STARTTLS")[0] == 220
        ctx = site.client_context()
        ctx.check_hostname = False  # the name asked for is not on any certificate
        sock = t.tls(ctx, "unknown.example")
        assert peer_names(sock) == {MX}
    finally:
        t.close()


def test_smtps_with_smtplib(site: Site) -> None:
    class SMTPSByAddress(smtplib.SMTP_SSL):
        """Connects to 127.0.0.1 but checks the certificate against MX."""

        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            raw = socket.create_connection(("127.0.0.1", port), timeout)
            return self.context.wrap_socket(raw, server_hostname=MX)

    with SMTPSByAddress(MX, site.port_smtps, timeout=10, context=site.client_context()) as c:
        c.ehlo("client.test")
        assert not c.has_extn("starttls")  # already encrypted
        assert c.has_extn("auth")
        c.login("alice", ALICE_PASSWORD)
        c.sendmail(f"alice@{DOMAIN}", [f"carol@{DOMAIN}"], message("smtps-smtplib"))
    head = received(delivered(site, "carol", "smtps-smtplib"))
    assert "with ESMTPSA id" in head


def test_tls_require_refuses_mail_before_starttls(site: Site) -> None:
    t = Transcript(site.port_require)
    try:
        t.reply()
        code, text = t.cmd("EHLO client.test")
        assert code == 250 and "STARTTLS" in text
        code, text = t.cmd(f"MAIL FROM:<x@{DOMAIN}>")
        assert code == 530 and "STARTTLS" in text
        assert t.cmd("STARTTLS")[0] == 220
        t.tls(site.client_context(), MX)
        assert t.cmd("EHLO client.test")[0] == 250
        assert t.cmd(f"MAIL FROM:<x@{DOMAIN}>")[0] == 250
        assert t.cmd(f"RCPT TO:<alice@{DOMAIN}>")[0] == 250
        assert t.cmd("DATA")[0] == 354
        t.sock.sendall(b"Subject: tls-require\r\n\r\nbody\r\n.\r\n")
        assert t.reply()[0] == 250
        t.cmd("QUIT")
    finally:
        t.close()
    assert "ESMTPS" in received(delivered(site, "alice", "tls-require"))


# ---------------------------------------------------------------------------- client certificates


def test_verify_accepts_a_client_certificate_from_the_ca(site: Site) -> None:
    t = Transcript(site.port_verify)
    try:
        t.reply()
        t.cmd("EHLO client.test")
        assert t.cmd("STARTTLS")[0] == 220
        t.tls(site.client_context(site.client_cert), MX)
        assert t.cmd("EHLO client.test")[0] == 250
        assert t.cmd(f"MAIL FROM:<x@{DOMAIN}>")[0] == 250
        assert t.cmd(f"RCPT TO:<bob@{DOMAIN}>")[0] == 250
        assert t.cmd("DATA")[0] == 354
        t.sock.sendall(b"Subject: verified-client\r\n\r\nbody\r\n.\r\n")
        assert t.reply()[0] == 250
    finally:
        t.close()
    head = received(delivered(site, "bob", "verified-client"))
    assert ":YES)" in head  # the client certificate was verified


@pytest.mark.parametrize("which", ["none", "stranger"])
def test_verify_refuses_missing_or_foreign_client_certificates(site: Site, which: str) -> None:
    cert = site.stranger_cert if which == "stranger" else None
    t = Transcript(site.port_verify)
    try:
        t.reply()
        t.cmd("EHLO client.test")
        assert t.cmd("STARTTLS")[0] == 220
        # TLS 1.3 reports the refusal on the first read after the handshake
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            t.tls(site.client_context(cert), MX)
            t.cmd("EHLO client.test")
            t.cmd(f"MAIL FROM:<x@{DOMAIN}>")
    finally:
        t.close()


# ---------------------------------------------------------------------------- AUTH


def swaks_auth(
    site: Site, port: int, mech: str, user: str, password: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(port),
            "--tls",
            "--auth",
            mech,
            "--auth-user",
            user,
            "--auth-password",
            password,
            *(extra or ("--to", f"carol@{DOMAIN}")),
        ],
        stdin=subprocess.DEVNULL,  # swaks prompts for what it misses
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("mech", "user", "password"),
    [
        ("PLAIN", "alice", ALICE_PASSWORD),
        ("LOGIN", "alice", ALICE_PASSWORD),
        ("PLAIN", "bob", BOB_PASSWORD),
        ("LOGIN", "bob", BOB_PASSWORD),
    ],
)
def test_swaks_auth_with_sha512_and_bcrypt_hashes(
    site: Site, mech: str, user: str, password: str
) -> None:
    subject = f"auth-{mech}-{user}"
    result = swaks_auth(
        site,
        site.port_starttls,
        mech,
        user,
        password,
        "--from",
        f"{user}@{DOMAIN}",
        "--to",
        f"carol@{DOMAIN}",
        "--header",
        f"Subject: {subject}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235" in result.stdout
    head = received(delivered(site, "carol", subject))
    assert "with ESMTPSA id" in head
    assert f"auth=yes user={user}" in head  # received-auth


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_auth_wrong_password_is_refused(site: Site, mech: str) -> None:
    result = swaks_auth(site, site.port_starttls, mech, "alice", "not the password")
    assert result.returncode != 0
    assert "535" in result.stdout


def test_auth_unknown_user_is_refused(site: Site) -> None:
    result = swaks_auth(site, site.port_starttls, "PLAIN", "mallory", ALICE_PASSWORD)
    assert result.returncode != 0
    assert "535" in result.stdout


def test_auth_refused_before_tls(site: Site) -> None:
    t = Transcript(site.port_starttls)
    try:
        t.reply()
        code, text = t.cmd("EHLO client.test")
        assert "AUTH" not in text
        token = base64.b64encode(f"\0alice\0{ALICE_PASSWORD}".encode()).decode()
        code, _ = t.cmd(f"AUTH PLAIN {token}")
        assert code == 503
        # and nothing was granted: the session is still unauthenticated
        assert t.cmd(f"MAIL FROM:<alice@{DOMAIN}>")[0] == 250
    finally:
        t.close()


def test_auth_required_listener_refuses_mail_without_auth(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port_mask, timeout=10) as client:
        client.ehlo("client.test")
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        client.ehlo("client.test")
        code, text = client.mail(f"x@{DOMAIN}")
        assert code == 530 and b"AUTH" in text


def test_swaks_without_tls_cannot_auth(site: Site) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(site.port_starttls),
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            ALICE_PASSWORD,
            "--to",
            f"carol@{DOMAIN}",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "235" not in result.stdout


# ---------------------------------------------------------------------------- senders / masquerade


def test_senders_refuses_a_foreign_mail_from(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port_starttls, timeout=10) as client:
        client.ehlo("client.test")
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        client.ehlo("client.test")
        client.login("alice", ALICE_PASSWORD)
        code, _ = client.mail(f"bob@{DOMAIN}")
        assert code == 530
        client.rset()
        code, _ = client.mail("alice@elsewhere.example")
        assert code == 530
        client.rset()
        assert client.mail(f"alice@{DOMAIN}")[0] == 250
        client.rset()
    with smtplib.SMTP("127.0.0.1", site.port_starttls, timeout=10) as client:
        client.ehlo("client.test")
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        client.ehlo("client.test")
        client.login("bob", BOB_PASSWORD)
        assert client.mail("anyone@bob.example")[0] == 250  # "@bob.example" entry
        client.rset()
        assert client.mail(f"alice@{DOMAIN}")[0] == 530


def test_masquerade_rewrites_from_header(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port_starttls, timeout=10) as client:
        client.ehlo("client.test")
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        client.ehlo("client.test")
        client.login("alice", ALICE_PASSWORD)
        client.sendmail(
            f"alice@{DOMAIN}",
            [f"bob@{DOMAIN}"],
            message("masquerade", sender="the-boss@forged.example"),
        )
    msg = delivered(site, "bob", "masquerade")
    assert str(msg["From"]) == f"Some One <alice@{DOMAIN}>"


def test_unauthenticated_mail_keeps_its_from_header(site: Site) -> None:
    # masquerade applies to authenticated sessions only
    with smtplib.SMTP("127.0.0.1", site.port_starttls, timeout=10) as client:
        client.ehlo("client.test")
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        client.sendmail(
            "x@outside.example",
            [f"bob@{DOMAIN}"],
            message("no-masquerade", sender="someone@outside.example"),
        )
    msg = delivered(site, "bob", "no-masquerade")
    assert "someone@outside.example" in str(msg["From"])


# ---------------------------------------------------------------------------- Received header


def test_mask_src_hides_the_client_in_received(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port_mask, timeout=10) as client:
        client.ehlo("secret-helo.client.test")
        client._host = MX  # type: ignore[attr-defined]
        client.starttls(context=site.client_context())
        client.ehlo("secret-helo.client.test")
        client.login("bob", BOB_PASSWORD)
        client.sendmail(f"bob@{DOMAIN}", [f"alice@{DOMAIN}"], message("mask-src"))
    msg = delivered(site, "alice", "mask-src")
    head = received(msg)
    assert "secret-helo" not in head and "127.0.0.1" not in head
    assert head.startswith(f"by {MX} ")
    assert "with ESMTPSA id" in head
    assert "auth=" not in head  # no received-auth on this listener


def test_swaks_is_installed() -> None:
    assert shutil.which("swaks"), "swaks is needed (apt-get install swaks)"
