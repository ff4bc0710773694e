"""The Received: header Pigeon adds, field by field as OpenSMTPD writes it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from pigeon.server.received import ReceivedInfo, received_date, received_header

WHEN = 1_793_000_000.0  # a fixed instant


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def info(**kw: object) -> ReceivedInfo:
    base: dict[str, object] = {
        "helo": "client.example.org",
        "rdns": "client.example.org",
        "ip": "192.0.2.7",
        "hostname": "mx.example.net",
        "msgid": "0123abcd",
        "esmtp": True,
    }
    base.update(kw)
    return ReceivedInfo(**base)  # type: ignore[arg-type]


def test_plain_session_with_one_recipient() -> None:
    assert received_header(info(single_rcpt="bob@example.net"), WHEN) == (
        b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
        b"\tby mx.example.net (Pigeon) with ESMTP id 0123abcd\r\n"
        b"\tfor <bob@example.net>;\r\n"
        b"\t" + received_date(WHEN).encode() + b"\r\n"
    )


def test_date_is_time_to_text() -> None:
    assert received_date(0.0 + 86400 * 3) == "Sun, 4 Jan 1970 00:00:00 +0000 (UTC)"


def test_tls_auth_and_received_auth() -> None:
    head = received_header(
        info(
            tls="TLSv1.3:TLS_AES_256_GCM_SHA384:256:YES",
            authenticated=True,
            auth_user="alice",
            received_auth=True,
        ),
        WHEN,
    ).decode()
    assert (
        "\tby mx.example.net (Pigeon) with ESMTPSA id 0123abcd "
        "(TLSv1.3:TLS_AES_256_GCM_SHA384:256:YES) auth=yes user=alice;\r\n" in head
    )


def test_received_auth_without_tls_adds_nothing() -> None:
    head = received_header(info(received_auth=True), WHEN).decode()
    assert "auth=" not in head


def test_received_auth_unauthenticated() -> None:
    head = received_header(info(tls="TLSv1.2:X:128:NO", received_auth=True), WHEN).decode()
    assert "(TLSv1.2:X:128:NO) auth=no;" in head


def test_mask_src_hides_helo_and_address() -> None:
    head = received_header(info(mask_src=True, esmtp=False), WHEN).decode()
    assert head.startswith("Received: by mx.example.net (Pigeon) with SMTP id 0123abcd;\r\n")
    assert "192.0.2.7" not in head and "client.example.org" not in head


def test_ipv6_and_local_socket_addresses() -> None:
    assert b"(localhost IPv6:::1)" in received_header(info(ip="::1", rdns="localhost"), WHEN)
    assert b"(localhost [local])" in received_header(info(ip="", rdns="localhost"), WHEN)
