"""Listener and relay TLS contexts, exercised with real in-memory handshakes."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from pigeon.config.model import Ca, Pki
from pigeon.server.tls import (
    TLSConfigError,
    client_context,
    parse_protocols,
    server_context,
)


@dataclass
class Handshake:
    client: ssl.SSLObject
    server: ssl.SSLObject
    client_error: ssl.SSLError | None
    server_error: ssl.SSLError | None


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str | None
) -> Handshake:
    """Run both ends of a TLS handshake over memory BIOs until neither makes progress."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    errors: dict[str, ssl.SSLError | None] = {"client": None, "server": None}
    done = {"client": False, "server": False}

    def step(name: str, obj: ssl.SSLObject) -> None:
        if done[name] or errors[name] is not None:
            return
        try:
            obj.do_handshake()
            done[name] = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            errors[name] = exc

    for _ in range(20):
        step("client", client)
        s_in.write(c_out.read())
        step("server", server)
        c_in.write(s_out.read())
        if (done["client"] or errors["client"]) and (done["server"] or errors["server"]):
            break
    # TLS 1.3: the client finishes first and only hears of a refused certificate later
    if done["client"] and errors["server"] is not None:
        try:
            client.read(1)
        except ssl.SSLError as exc:
            errors["client"] = exc
    return Handshake(client, server, errors["client"], errors["server"])


@dataclass
class Pems:
    ca: trustme.CA
    ca_path: str
    tmp: Path

    def pki(self, name: str, *hostnames: str) -> Pki:
        issued = self.ca.issue_cert(*hostnames)
        cert = self.tmp / f"{name}.crt"
        key = self.tmp / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return Pki(name=name, cert=str(cert), key=str(key))


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Pems:
    tmp = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_path = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return Pems(ca, str(ca_path), tmp)


def trusting_client(pems: Pems) -> ssl.SSLContext:
    return client_context(verify=True, ca_file=pems.ca_path)


def peer_names(obj: ssl.SSLObject) -> set[str]:
    cert = obj.getpeercert()
    assert cert
    entries = cast(tuple[tuple[str, str], ...], cert["subjectAltName"])
    return {value for kind, value in entries if kind == "DNS"}


def listener(pkis: list[Pki], **kw: object) -> ssl.SSLContext:
    options: dict[str, object] = {"ca": None, "verify": False, "ciphers": None, "protocols": None}
    options.update(kw)
    return server_context(pkis, **options)  # type: ignore[arg-type]


def test_single_pki_handshake(pems: Pems) -> None:
    ctx = listener([pems.pki("mx", "mx.example.org")])
    result = handshake(ctx, trusting_client(pems), "mx.example.org")
    assert result.client_error is None and result.server_error is None
    assert peer_names(result.client) == {"mx.example.org"}


def sni_pkis(pems: Pems) -> list[Pki]:
    return [
        pems.pki("mx.example.org", "mx.example.org"),
        pems.pki("other", "mail.example.net", "*.example.net"),
        pems.pki("smtp.example.com", "cert-name.example.com"),
    ]


@pytest.fixture(scope="module")
def sni_ctx(pems: Pems) -> ssl.SSLContext:
    return listener(sni_pkis(pems))


class TestSNI:
    @pytest.fixture
    def ctx(self, sni_ctx: ssl.SSLContext) -> ssl.SSLContext:
        return sni_ctx

    @pytest.mark.parametrize(
        ("server_name", "expected"),
        [
            ("mx.example.org", "mx.example.org"),
            ("mail.example.net", "mail.example.net"),
            ("MAIL.Example.NET", "mail.example.net"),
            ("anything.example.net", "mail.example.net"),  # wildcard SAN
            ("cert-name.example.com", "cert-name.example.com"),
            ("unknown.example", "mx.example.org"),  # no match: the first pki
        ],
    )
    def test_certificate_follows_the_server_name(
        self, pems: Pems, ctx: ssl.SSLContext, server_name: str, expected: str
    ) -> None:
        client = client_context(verify=False)
        result = handshake(ctx, client, server_name)
        assert result.client_error is None and result.server_error is None
        assert expected in {v for _, v in _names_of(result.client)}

    def test_pki_name_selects_its_certificate(self, pems: Pems, ctx: ssl.SSLContext) -> None:
        # the pki is named smtp.example.com, its certificate is for another name
        result = handshake(ctx, client_context(verify=False), "smtp.example.com")
        assert result.server_error is None
        assert "cert-name.example.com" in {v for _, v in _names_of(result.client)}

    def test_no_server_name_gets_the_first_pki(self, pems: Pems, ctx: ssl.SSLContext) -> None:
        result = handshake(ctx, client_context(verify=False), None)
        assert result.server_error is None
        assert {v for _, v in _names_of(result.client)} == {"mx.example.org"}

    def test_verified_client_accepts_the_chosen_certificate(
        self, pems: Pems, ctx: ssl.SSLContext
    ) -> None:
        result = handshake(ctx, trusting_client(pems), "foo.example.net")
        assert result.client_error is None
        assert "*.example.net" in peer_names(result.client)


def _names_of(obj: ssl.SSLObject) -> list[tuple[str, str]]:
    """SAN entries of the peer certificate, even when the client did not verify it."""
    from cryptography import x509

    der = obj.getpeercert(binary_form=True)
    assert der
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [("DNS", name) for name in san.get_values_for_type(x509.DNSName)]


class TestClientVerification:
    def test_client_without_certificate_is_refused(self, pems: Pems) -> None:
        ctx = listener(
            [pems.pki("mx", "mx.example.org")], ca=Ca("clients", pems.ca_path), verify=True
        )
        result = handshake(ctx, trusting_client(pems), "mx.example.org")
        assert result.server_error is not None
        assert result.client_error is not None

    def test_every_sni_certificate_requires_the_client_certificate(self, pems: Pems) -> None:
        ctx = listener(sni_pkis(pems), ca=Ca("clients", pems.ca_path), verify=True)
        for name in ("mx.example.org", "mail.example.net", "smtp.example.com"):
            result = handshake(ctx, client_context(verify=False), name)
            assert result.server_error is not None, name

    def test_client_certificate_signed_by_the_ca_is_accepted(self, pems: Pems) -> None:
        ctx = listener(
            [pems.pki("mx", "mx.example.org")], ca=Ca("clients", pems.ca_path), verify=True
        )
        client = client_context(
            verify=True, ca_file=pems.ca_path, cert=pems.pki("client", "client.example.org")
        )
        result = handshake(ctx, client, "mx.example.org")
        assert result.server_error is None and result.client_error is None
        assert peer_names(result.server) == {"client.example.org"}

    def test_client_certificate_from_another_ca_is_refused(
        self, pems: Pems, tmp_path: Path
    ) -> None:
        ctx = listener(
            [pems.pki("mx", "mx.example.org")], ca=Ca("clients", pems.ca_path), verify=True
        )
        stranger = Pems(trustme.CA(), pems.ca_path, tmp_path)
        client = client_context(
            verify=True, ca_file=pems.ca_path, cert=stranger.pki("intruder", "evil.example")
        )
        result = handshake(ctx, client, "mx.example.org")
        assert result.server_error is not None

    def test_without_verify_no_certificate_is_asked(self, pems: Pems) -> None:
        ctx = listener([pems.pki("mx", "mx.example.org")], ca=Ca("clients", pems.ca_path))
        result = handshake(ctx, trusting_client(pems), "mx.example.org")
        assert result.server_error is None and result.client_error is None
        assert result.server.getpeercert() is None


class TestRelayClient:
    def test_verifying_client_refuses_a_wrong_host_name(self, pems: Pems) -> None:
        ctx = listener([pems.pki("mx", "mx.example.org")])
        result = handshake(ctx, trusting_client(pems), "other.example.org")
        assert result.client_error is not None

    def test_verifying_client_refuses_an_unknown_ca(self, pems: Pems, tmp_path: Path) -> None:
        stranger = Pems(trustme.CA(), pems.ca_path, tmp_path)
        ctx = listener([stranger.pki("mx", "mx.example.org")])
        result = handshake(ctx, trusting_client(pems), "mx.example.org")
        assert result.client_error is not None

    def test_non_verifying_client_accepts_anything(self, pems: Pems, tmp_path: Path) -> None:
        stranger = Pems(trustme.CA(), pems.ca_path, tmp_path)
        ctx = listener([stranger.pki("mx", "mx.example.org")])
        result = handshake(ctx, client_context(verify=False), "whatever.example")
        assert result.client_error is None and result.server_error is None


class TestProtocols:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (None, ("TLSv1_2", "TLSv1_3")),
            ("secure", ("TLSv1_2", "TLSv1_3")),
            ("default", ("TLSv1_2", "TLSv1_3")),
            ("all", ("TLSv1", "TLSv1_3")),
            ("legacy", ("TLSv1", "TLSv1_3")),
            ("tlsv1.2,tlsv1.3", ("TLSv1_2", "TLSv1_3")),
            ("TLSv1.3", ("TLSv1_3", "TLSv1_3")),
            ("tlsv1.2", ("TLSv1_2", "TLSv1_2")),
            ("tlsv1", ("TLSv1", "TLSv1_1")),
            ("all:!tlsv1.0:!tlsv1.1", ("TLSv1_2", "TLSv1_3")),
            ("!tlsv1.3", ("TLSv1", "TLSv1_2")),
            (" tlsv1.1 , tlsv1.2 ", ("TLSv1_1", "TLSv1_2")),
        ],
    )
    def test_parse(self, text: str | None, expected: tuple[str, str]) -> None:
        low, high = parse_protocols(text)
        assert (low.name, high.name) == expected

    @pytest.mark.parametrize(
        "text", ["sslv3", "tlsv1.4", "", "tlsv1.2,", "!all", "tlsv1.0,tlsv1.2"]
    )
    def test_invalid(self, text: str) -> None:
        with pytest.raises(TLSConfigError) as info:
            parse_protocols(text)
        assert text.strip() in str(info.value)

    def test_server_limited_to_tls13_refuses_a_tls12_client(self, pems: Pems) -> None:
        ctx = listener([pems.pki("mx", "mx.example.org")], protocols="tlsv1.3")
        client = client_context(verify=False, protocols="tlsv1.2")
        result = handshake(ctx, client, "mx.example.org")
        assert result.server_error is not None

    def test_negotiated_version_follows_the_setting(self, pems: Pems) -> None:
        ctx = listener([pems.pki("mx", "mx.example.org")], protocols="tlsv1.2")
        result = handshake(ctx, client_context(verify=False), "mx.example.org")
        assert result.server_error is None
        assert result.client.version() == "TLSv1.2"


class TestCiphers:
    def test_cipher_list_is_applied(self, pems: Pems) -> None:
        ctx = listener(
            [pems.pki("mx", "mx.example.org")],
            ciphers="ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256",
            protocols="tlsv1.2",
        )
        result = handshake(ctx, client_context(verify=False), "mx.example.org")
        assert result.server_error is None
        cipher = result.client.cipher()
        assert cipher is not None and "AES128-GCM" in cipher[0]

    @pytest.mark.parametrize("word", ["secure", "default", "compat", "legacy", "all", "insecure"])
    def test_libtls_keywords_are_understood(self, pems: Pems, word: str) -> None:
        ctx = listener([pems.pki("mx", "mx.example.org")], ciphers=word)
        assert handshake(ctx, client_context(verify=False), "mx").server_error is None

    def test_bad_cipher_list_is_reported(self, pems: Pems) -> None:
        with pytest.raises(TLSConfigError, match="NOPE"):
            listener([pems.pki("mx", "mx.example.org")], ciphers="NOPE")


class TestBadFiles:
    def test_missing_certificate(self, pems: Pems, tmp_path: Path) -> None:
        good = pems.pki("mx", "mx.example.org")
        missing = str(tmp_path / "missing.crt")
        with pytest.raises(TLSConfigError) as info:
            listener([Pki("mx", cert=missing, key=good.key)])
        assert missing in str(info.value)
        assert 'pki "mx"' in str(info.value)
        assert "No such file" in str(info.value)
        assert info.value.path == missing

    def test_missing_key(self, pems: Pems, tmp_path: Path) -> None:
        good = pems.pki("mx", "mx.example.org")
        missing = str(tmp_path / "missing.key")
        with pytest.raises(TLSConfigError, match=r"missing\.key"):
            listener([Pki("mx", cert=good.cert, key=missing)])

    def test_no_key_configured(self, pems: Pems) -> None:
        good = pems.pki("mx", "mx.example.org")
        with pytest.raises(TLSConfigError, match="no key file"):
            listener([Pki("mx", cert=good.cert)])

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_unreadable_key(self, pems: Pems) -> None:
        good = pems.pki("locked", "mx.example.org")
        assert good.key
        os.chmod(good.key, 0)
        with pytest.raises(TLSConfigError, match="Permission denied"):
            listener([good])

    def test_unreadable_key_path(self, pems: Pems, tmp_path: Path) -> None:
        good = pems.pki("mx", "mx.example.org")
        with pytest.raises(TLSConfigError, match="cannot read key file") as info:
            listener([Pki("mx", cert=good.cert, key=str(tmp_path))])  # a directory
        assert info.value.path == str(tmp_path)

    def test_not_a_certificate(self, pems: Pems, tmp_path: Path) -> None:
        good = pems.pki("mx", "mx.example.org")
        junk = tmp_path / "junk.crt"
        junk.write_text("hello\n")
        with pytest.raises(TLSConfigError, match=r"junk\.crt.*PEM CERTIFICATE"):
            listener([Pki("mx", cert=str(junk), key=good.key)])

    def test_key_of_another_certificate(self, pems: Pems) -> None:
        one = pems.pki("one", "one.example.org")
        two = pems.pki("two", "two.example.org")
        with pytest.raises(TLSConfigError) as info:
            listener([Pki("one", cert=one.cert, key=two.key)])
        assert "does not match" in str(info.value)
        assert str(two.key) in str(info.value)

    def test_corrupt_certificate(self, pems: Pems, tmp_path: Path) -> None:
        good = pems.pki("mx", "mx.example.org")
        bad = tmp_path / "bad.crt"
        bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        with pytest.raises(TLSConfigError, match=r"bad\.crt"):
            listener([Pki("mx", cert=str(bad), key=good.key)])

    def test_encrypted_key(self, pems: Pems, tmp_path: Path) -> None:
        issued = pems.ca.issue_cert("mx.example.org")
        key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
        encrypted = tmp_path / "enc.key"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        cert = tmp_path / "enc.crt"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        with pytest.raises(TLSConfigError, match=r"enc\.key.*encrypted"):
            listener([Pki("mx", cert=str(cert), key=str(encrypted))])

    def test_missing_ca(self, pems: Pems, tmp_path: Path) -> None:
        missing = str(tmp_path / "ca-missing.pem")
        with pytest.raises(TLSConfigError) as info:
            listener([pems.pki("mx", "mx.example.org")], ca=Ca("clients", missing), verify=True)
        assert 'ca "clients"' in str(info.value) and missing in str(info.value)

    def test_no_pki(self) -> None:
        with pytest.raises(TLSConfigError):
            listener([])

    def test_relay_client_certificate_errors_too(self, tmp_path: Path) -> None:
        with pytest.raises(TLSConfigError, match=r"nope\.crt"):
            client_context(verify=False, cert=Pki("c", cert=str(tmp_path / "nope.crt"), key="k"))


def test_a_key_readable_by_others_is_taken_with_a_warning(
    pems: Pems, caplog: pytest.LogCaptureFixture
) -> None:
    """smtpd 6.8 refuses a key file more open than 0740; Pigeon serves, and warns."""
    pki = pems.pki("exposed", "exposed.test")
    os.chmod(pki.key, 0o644)
    with caplog.at_level("WARNING", logger="pigeon.tls"):
        listener([pki])
    assert f'key file "{pki.key}" has insecure permissions 0644' in caplog.text
    caplog.clear()
    os.chmod(pki.key, 0o640)
    with caplog.at_level("WARNING", logger="pigeon.tls"):
        listener([pki])
    assert "insecure" not in caplog.text
