"""crypt(3) hashes: known vectors, wrong passwords, hash_password and ``pigeon encrypt``."""

from __future__ import annotations

import io
import shutil
import subprocess

import bcrypt
import pytest

from pigeon.crypt_hash import (
    encrypt_main,
    hash_password,
    sha_crypt,
    system_crypt,
    verify_password,
)

# From Drepper's SHA-crypt specification.
SPEC_VECTORS = [
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYE"
        "dFCoEOfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0"
        "Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaT"
        "fF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
]

# Produced on this machine with `openssl passwd -6|-5 -salt SALT PASSWORD`.
OPENSSL_VECTORS = [
    ("secret", "$1$abc$iCQ2D3nhptRYi27fDYv2s1"),
    (
        "p@ss wörd",
        "$6$sixteencharsalt.$8ncBKsLK42lO7IGCXRROwHiTF2maGVYEE/u33jUIZV54VIS6qDylgT59Ok4MLbI3CW4K"
        "sDXKD/FQRD8/C1bGC.",
    ),
    (
        "pässwörd",
        "$6$Zz9./ab$3MO7o1vJ44B1pdBMegufdLZkXmj6BVfzqedUvc3OXwOxsccX2eALaMo9V6ZoPd3N2q4y0YvxfGl."
        "hKpRQWrXi1",
    ),
    ("x", "$5$shortsalt$gnP5NgieXd5moa.taKiMsKp5tLH7de0HICDfxDttBY/"),
    ("Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
]

# `echo secret | smtpctl encrypt` and `smtpctl encrypt secret` (OpenSMTPD 6.8, Debian).
SMTPCTL_SECRET = [
    "$6$ZQvX54a0qjf962z3$rOiUc6x2C9izVRIO4UmAW.VGdCC2dQJmK5VzHZeeCp8.j0RTkdR6T9u.du9Ge1oF218666"
    "ZVVsN67m39Jq3h31",
    "$6$..H0iDzjMr7EZaMC$A3nT.O6ZMTBziDike.OEap/6iu5oW/VCrL2AULf.41TYdem0pDZnGPtSqhazjFVa7XCWYIJ"
    "zeHniOlu/YiJHN1",
]

# Openwall crypt_blowfish test vector; $2a$, $2b$ and $2y$ agree on ASCII passwords.
BCRYPT_U_STAR_U = "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"


@pytest.mark.parametrize(("setting", "password", "expected"), SPEC_VECTORS)
def test_sha_crypt_matches_the_specification_vectors(
    setting: str, password: str, expected: str
) -> None:
    assert sha_crypt(password.encode(), setting) == expected
    assert verify_password(password, expected)


@pytest.mark.parametrize(("password", "hashed"), OPENSSL_VECTORS[1:])
def test_sha_crypt_matches_openssl(password: str, hashed: str) -> None:
    assert verify_password(password, hashed)
    assert not verify_password(password + "x", hashed)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("password", ["a", "correct horse battery staple", "ünïcödé", "x" * 80])
def test_hash_password_agrees_with_openssl_passwd(password: str) -> None:
    ours = hash_password(password)
    salt = ours.split("$")[2]
    theirs = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, password],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    assert ours == theirs


@pytest.mark.parametrize("hashed", SMTPCTL_SECRET)
def test_smtpctl_encrypt_output_is_accepted(hashed: str) -> None:
    assert verify_password("secret", hashed)
    assert not verify_password("Secret", hashed)
    assert not verify_password("secret\n", hashed)
    assert not verify_password("", hashed)


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_variants(prefix: str) -> None:
    hashed = prefix + BCRYPT_U_STAR_U[4:]
    assert verify_password("U*U", hashed)
    assert not verify_password("U*V", hashed)


def test_bcrypt_ignores_bytes_after_72_as_crypt_does() -> None:
    password = "p" * 72
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    assert verify_password(password + "anything", hashed)
    assert not verify_password(password[:-1], hashed)


@pytest.mark.skipif(system_crypt(b"secret", "$1$abc") is None, reason="no libxcrypt on this system")
def test_other_schemes_go_to_the_system_libcrypt() -> None:
    password, hashed = OPENSSL_VECTORS[0]
    assert verify_password(password, hashed)
    assert not verify_password("wrong", hashed)


def test_empty_hash_matches_only_the_empty_password() -> None:
    assert verify_password("", "")
    assert not verify_password("x", "")


@pytest.mark.parametrize("hashed", ["garbage", "$6$", "$6$salt$", "$2b$04$short", "*", "!"])
def test_malformed_hashes_never_match(hashed: str) -> None:
    assert not verify_password("", hashed)
    assert not verify_password("garbage", hashed)


def test_hash_password_makes_salted_sha512_crypt() -> None:
    first, second = hash_password("secret"), hash_password("secret")
    assert first != second  # random salts
    for hashed in (first, second):
        _, scheme, salt, digest = hashed.split("$")
        assert scheme == "6"
        assert len(salt) == 16
        assert len(digest) == 86
        assert verify_password("secret", hashed)
        assert not verify_password("secret2", hashed)


def test_encrypt_with_an_argument(capsys: pytest.CaptureFixture[str]) -> None:
    assert encrypt_main(["secret"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert verify_password("secret", out.strip())


def test_encrypt_hashes_each_stdin_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\nother pass\nlast"))
    assert encrypt_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert verify_password("secret", lines[0])
    assert verify_password("other pass", lines[1])
    assert verify_password("last", lines[2])


def test_encrypt_accepts_a_double_dash(capsys: pytest.CaptureFixture[str]) -> None:
    assert encrypt_main(["--", "-secret"]) == 0
    assert verify_password("-secret", capsys.readouterr().out.strip())


def test_encrypt_refuses_two_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert encrypt_main(["a", "b"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage" in captured.err
