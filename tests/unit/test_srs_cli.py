"""`pigeon srs encode|decode` as a user runs it (argv after `pigeon srs`)."""

from __future__ import annotations

import time

import pytest

from pigeon.srs import srs_timestamp
from pigeon.srs_cli import srs_main

KEY = "s3cr3t-Alpha"
BACKUP = "another secret 2"
NOW = "1795551300"  # 2026-11-24 20:15 UTC, the day the vectors were recorded


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = srs_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_encode_prints_the_rewritten_sender(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "encode", "--key", KEY, "--time", NOW, "alice@example.org", "forwarder.test"
    )
    assert (code, out, err) == (0, "SRS0=cO_U=JN=example.org=alice@forwarder.test\n", "")


def test_encode_wraps_srs0_into_srs1(capsys: pytest.CaptureFixture[str]) -> None:
    sender = "SRS0=abcd=AB=example.org=alice@hop1.test"
    code, out, _ = run(capsys, "encode", "--key", KEY, "--time", NOW, sender, "forwarder.test")
    assert code == 0
    assert out == "SRS1=KTi5=hop1.test==abcd=AB=example.org=alice@forwarder.test\n"


def test_encode_uses_the_clock_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    before = srs_timestamp(int(time.time()))
    code, out, _ = run(capsys, "encode", "--key", KEY, "alice@example.org", "fwd.test")
    after = srs_timestamp(int(time.time()))
    assert code == 0
    assert out[10:12] in (before, after)


def test_decode_prints_the_original_address(capsys: pytest.CaptureFixture[str]) -> None:
    address = "SRS0=cO_U=JN=example.org=alice@forwarder.test"
    code, out, err = run(capsys, "decode", "--key", KEY, "--time", NOW, address)
    assert (code, out, err) == (0, "alice@example.org\n", "")


def test_decode_srs1_gives_the_first_hop(capsys: pytest.CaptureFixture[str]) -> None:
    address = "SRS1=UgVH=hop1.test==abcd=JN=example.org=alice@forwarder.test"
    code, out, _ = run(capsys, "decode", "--key", KEY, "--time", NOW, address)
    assert (code, out) == (0, "SRS0=abcd=JN=example.org=alice@hop1.test\n")


def test_decode_with_backup_key(capsys: pytest.CaptureFixture[str]) -> None:
    address = "SRS0=sWGl=JN=example.org=alice@forwarder.test"
    code, out, _ = run(
        capsys, "decode", "--key", KEY, "--backup-key", BACKUP, "--time", NOW, address
    )
    assert (code, out) == (0, "alice@example.org\n")
    code, out, err = run(capsys, "decode", "--key", KEY, "--time", NOW, address)
    assert (code, out) == (1, "")
    assert err == f"pigeon srs decode: bad hash: {address}\n"


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("SRS0=cO_V=JN=example.org=alice@forwarder.test", "bad hash"),
        ("SRS0=7cfI=JI=example.org=alice@forwarder.test", "expired"),
        ("alice@example.org", "not SRS"),
        ("SRS0=-VbC=jn=example.org=alice@forwarder.test", "malformed"),
    ],
)
def test_decode_failure_exits_1_with_the_reason(
    capsys: pytest.CaptureFixture[str], address: str, reason: str
) -> None:
    code, out, err = run(capsys, "decode", "--key", KEY, "--time", NOW, address)
    assert (code, out) == (1, "")
    assert err == f"pigeon srs decode: {reason}: {address}\n"


def test_decode_ttl_option(capsys: pytest.CaptureFixture[str]) -> None:
    five_days_old = "SRS0=7cfI=JI=example.org=alice@forwarder.test"
    code, out, _ = run(capsys, "decode", "--key", KEY, "--ttl", "5", "--time", NOW, five_days_old)
    assert (code, out) == (0, "alice@example.org\n")
    code, _, err = run(capsys, "decode", "--key", KEY, "--ttl", "3", "--time", NOW, five_days_old)
    assert code == 1 and "expired" in err


def test_decode_postsrsd_option(capsys: pytest.CaptureFixture[str]) -> None:
    minted_by_postsrsd = "SRS0=+sA3=JN=example.org=alice@forwarder.test"
    code, out, _ = run(
        capsys, "decode", "--key", KEY, "--postsrsd", "--time", NOW, minted_by_postsrsd
    )
    assert (code, out) == (0, "alice@example.org\n")
    code, _, err = run(capsys, "decode", "--key", KEY, "--time", NOW, minted_by_postsrsd)
    assert code == 1 and "bad hash" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["encode", "alice@example.org", "forwarder.test"],  # no --key
        ["encode", "--key", KEY, "alice@example.org"],  # no forward domain
        ["decode", "--key", KEY, "--ttl", "0", "SRS0=x@y"],
        ["decode", "--key", KEY, "--ttl", "soon", "SRS0=x@y"],
        ["decode", "--key", KEY, "--time", "noon", "SRS0=x@y"],
        ["frobnicate"],
        ["encode", "--key", "", "alice@example.org", "forwarder.test"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("usage: pigeon srs") or err.startswith("pigeon srs encode:")


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "decode", "--help")
    assert code == 0
    assert "--backup-key" in out and "--postsrsd" in out
