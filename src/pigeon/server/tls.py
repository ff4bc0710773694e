"""TLS contexts for listeners (``pki``, ``ca``, ``verify``, ``ciphers``, ``protocols``, SNI)
and for relaying.

Everything that can be wrong with the files is found when the context is built, and raised
as :class:`TLSConfigError` naming the pki or ca and the file, so ``pigeon check`` and
``pigeon run`` can report it before any client connects.

OpenSMTPD (libtls) semantics kept here:

* ``protocols`` is libtls's list: ``tlsv1.0``, ``tlsv1.1``, ``tlsv1.2``, ``tlsv1.3``,
  ``tlsv1`` (= 1.0 and 1.1), ``all``/``legacy`` (every version), ``default``/``secure``
  (1.2 and 1.3, also what an unset ``protocols`` means); separated by ``,`` or ``:``; a
  ``!`` removes versions (starting from ``all`` when it comes first).
* ``ciphers`` is an OpenSSL cipher list (default ``HIGH:!aNULL:!MD5``) or one of libtls's
  keywords ``secure``/``default``, ``compat``/``legacy``, ``all``/``insecure``. It applies
  to TLS 1.2 and lower; TLS 1.3 suites are OpenSSL's.
* Several ``pki`` on one listener: the certificate is chosen from the client's SNI name, the
  first pki's when nothing matches (libtls ``tls_config_add_keypair_file``).
* ``verify``: a client certificate is required and must chain to the listener's ``ca``, or
  to the system's trust store when the listener has no ``ca``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from pigeon.config.model import Ca, Pki

log = logging.getLogger("pigeon.tls")

DEFAULT_CIPHERS = "HIGH:!aNULL:!MD5"  # OpenSMTPD's `smtp ciphers` default

_VERSIONS = (
    ssl.TLSVersion.TLSv1,
    ssl.TLSVersion.TLSv1_1,
    ssl.TLSVersion.TLSv1_2,
    ssl.TLSVersion.TLSv1_3,
)
_PROTOCOL_WORDS: dict[str, frozenset[ssl.TLSVersion]] = {
    "all": frozenset(_VERSIONS),
    "legacy": frozenset(_VERSIONS),
    "default": frozenset(_VERSIONS[2:]),
    "secure": frozenset(_VERSIONS[2:]),
    "tlsv1": frozenset(_VERSIONS[:2]),
    "tlsv1.0": frozenset({ssl.TLSVersion.TLSv1}),
    "tlsv1.1": frozenset({ssl.TLSVersion.TLSv1_1}),
    "tlsv1.2": frozenset({ssl.TLSVersion.TLSv1_2}),
    "tlsv1.3": frozenset({ssl.TLSVersion.TLSv1_3}),
}
# libtls's cipher keywords, as OpenSSL cipher lists
_CIPHER_WORDS = {
    "secure": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20",
    "default": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20",
    "compat": "HIGH:!aNULL",
    "legacy": "HIGH:!aNULL",
    "all": "ALL:!aNULL:!eNULL",
    "insecure": "ALL:!aNULL:!eNULL",
}


class TLSConfigError(Exception):
    """A pki, ca, ciphers or protocols setting that cannot be used. ``path`` is the file at
    fault, when there is one."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def parse_protocols(text: str | None) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """The (minimum, maximum) TLS versions a ``protocols`` string allows."""
    if text is None:
        return ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    allowed: set[ssl.TLSVersion] = set()
    for raw in text.replace(":", ",").split(","):
        word = raw.strip().lower()
        negate = word.startswith("!")
        if negate:
            word = word[1:]
            if not allowed:
                allowed = set(_VERSIONS)
        versions = _PROTOCOL_WORDS.get(word)
        if versions is None:
            raise TLSConfigError(f'invalid protocols "{text}": unknown protocol "{raw.strip()}"')
        if negate:
            allowed -= versions
        else:
            allowed |= versions
    if not allowed:
        raise TLSConfigError(f'invalid protocols "{text}": no protocol left')
    ordered = [v for v in _VERSIONS if v in allowed]
    first, last = _VERSIONS.index(ordered[0]), _VERSIONS.index(ordered[-1])
    if len(ordered) != last - first + 1:
        # OpenSSL only has a minimum and a maximum; a hole cannot be expressed safely
        raise TLSConfigError(f'invalid protocols "{text}": the versions must be contiguous')
    return ordered[0], ordered[-1]


def _apply_ciphers_protocols(
    context: ssl.SSLContext, ciphers: str | None, protocols: str | None
) -> None:
    spec = ciphers if ciphers is not None else DEFAULT_CIPHERS
    try:
        context.set_ciphers(_CIPHER_WORDS.get(spec.lower(), spec))
    except ssl.SSLError:
        raise TLSConfigError(f'invalid ciphers "{spec}": no cipher can be selected') from None
    context.minimum_version, context.maximum_version = parse_protocols(protocols)


def _check_pem(owner: str, what: str, path: str | None, marker: str) -> str:
    """Read ``path`` once to give a precise error; return it."""
    if not path:
        raise TLSConfigError(f"{owner}: no {what} file configured")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TLSConfigError(
            f'{owner}: cannot read {what} file "{path}": {exc.strerror}', path
        ) from None
    if marker.encode() not in data:
        raise TLSConfigError(f'{owner}: {what} file "{path}" does not contain a PEM {marker}', path)
    return path


def _refuse_passphrase() -> str:
    # a daemon cannot prompt; OpenSMTPD refuses encrypted keys too
    raise TLSConfigError("encrypted key")


def _load_keypair(context: ssl.SSLContext, pki: Pki) -> None:
    owner = f'pki "{pki.name}"'
    cert = _check_pem(owner, "certificate", pki.cert, "CERTIFICATE")
    key = _check_pem(owner, "key", pki.key, "PRIVATE KEY")
    _warn_if_exposed(owner, key)
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except TLSConfigError:
        raise TLSConfigError(f'{owner}: key file "{key}" is encrypted', key) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f'{owner}: key file "{key}" does not match certificate "{cert}"', key
            ) from None
        raise TLSConfigError(
            f'{owner}: cannot load certificate "{cert}" with key "{key}": {exc.reason or exc}',
            cert,
        ) from None


def _warn_if_exposed(owner: str, key: str) -> None:
    """smtpd refuses a key file that is more open than rwxr----- (0740); Pigeon takes it,
    but says so: anyone who can read it can impersonate this server."""
    try:
        mode = os.stat(key).st_mode & 0o777
    except OSError:
        return  # loading it says why
    if mode & 0o037:
        log.warning(
            'warn: %s: key file "%s" has insecure permissions %04o (others or the group can '
            "write or read it; smtpd refuses it): chmod 600 or 640",
            owner,
            key,
            mode,
        )


def _load_ca(context: ssl.SSLContext, ca: Ca) -> None:
    owner = f'ca "{ca.name}"'
    path = _check_pem(owner, "certificate", ca.cert, "CERTIFICATE")
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f'{owner}: cannot load certificate file "{path}": {exc.reason or exc}', path
        ) from None


@dataclass(frozen=True)
class _Candidate:
    pki: Pki
    context: ssl.SSLContext
    names: tuple[str, ...]  # lower-cased DNS names of the certificate (SAN, else CN)


def certificate_names(path: str) -> tuple[str, ...]:
    """The DNS names a PEM certificate is valid for: its subjectAltName DNS entries, or its
    common name when it has none (the rule libtls applies)."""
    from cryptography import x509  # only listeners with several pki need it

    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(attr.value)
            for attr in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    return tuple(n.lower() for n in names)


def _wildcard_match(server_name: str, pattern: str) -> bool:
    """``*.example.com`` covers exactly one more label: ``a.example.com``."""
    if not pattern.startswith("*."):
        return False
    head, _, rest = server_name.partition(".")
    return bool(head) and rest == pattern[2:]


def _pick(candidates: Sequence[_Candidate], server_name: str | None) -> _Candidate:
    if server_name:
        name = server_name.lower().rstrip(".")
        for c in candidates:  # exact names first, so a wildcard does not shadow them
            if name == c.pki.name.lower() or name in c.names:
                return c
        for c in candidates:
            if any(_wildcard_match(name, pattern) for pattern in c.names):
                return c
    return candidates[0]


def server_context(
    pkis: Sequence[Pki],
    *,
    ca: Ca | None,
    verify: bool,
    ciphers: str | None,
    protocols: str | None,
) -> ssl.SSLContext:
    """A server context for a listener. With several pki, the returned context (the first
    pki's) switches to the one matching the client's SNI name."""
    if not pkis:
        raise TLSConfigError("a TLS listener needs a pki")
    parse_protocols(protocols)  # report a bad setting before touching any file

    def build(pki: Pki) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE  # libtls prefers the server's
        _apply_ciphers_protocols(context, ciphers, protocols)
        _load_keypair(context, pki)
        if ca is not None:
            _load_ca(context, ca)
        if verify:
            if ca is None:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    contexts = [build(pki) for pki in pkis]
    if len(pkis) == 1:
        return contexts[0]

    candidates = [
        _Candidate(pki, context, certificate_names(str(pki.cert)))
        for pki, context in zip(pkis, contexts, strict=True)
    ]

    def choose(
        connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        chosen = _pick(candidates, server_name).context
        if connection.context is not chosen:
            connection.context = chosen

    contexts[0].sni_callback = choose
    return contexts[0]


def client_context(
    verify: bool,
    ca_file: str | None = None,
    cert: Pki | None = None,
    *,
    ciphers: str | None = None,
    protocols: str | None = None,
) -> ssl.SSLContext:
    """A context for relaying: with ``verify``, the server's certificate must chain to
    ``ca_file`` (the system's trust store without one) and match the host name the caller
    passes as ``server_hostname``. ``cert`` is a client certificate to present."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_ciphers_protocols(context, ciphers, protocols)
    if verify:
        if ca_file is not None:
            _load_ca(context, Ca(name=os.path.basename(ca_file), cert=ca_file))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_keypair(context, cert)
    return context


def ciphers_text(transport: asyncio.BaseTransport | None) -> str | None:
    """``VERSION:CIPHER:BITS`` of a TLS transport (smtpd's ``tls ciphers=`` log field),
    None when the transport is not TLS."""
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    cipher = obj.cipher() if obj is not None else None
    if cipher is None:
        return None
    name, version, bits = cipher
    return f"{version}:{name}:{bits}"
