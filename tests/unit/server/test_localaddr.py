"""``from local``: the host's own addresses, as OpenSMTPD's ``<localhost>`` (not all of 127/8)."""

from __future__ import annotations

import pytest

from pigeon.server import localaddr


@pytest.fixture
def own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        localaddr, "local_addresses", lambda: frozenset({"127.0.0.1", "::1", "192.0.2.1"})
    )


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "192.0.2.1", "::ffff:127.0.0.1"])
def test_own_addresses_are_local(own: None, address: str) -> None:
    assert localaddr.is_local(address)


@pytest.mark.parametrize("address", ["127.0.0.2", "192.0.2.2", "::2", "local", ""])
def test_other_loopback_and_foreign_addresses_are_not(own: None, address: str) -> None:
    assert not localaddr.is_local(address)


def test_the_real_host_has_its_loopback_address() -> None:
    assert {"127.0.0.1", "::1"} <= localaddr.local_addresses()
