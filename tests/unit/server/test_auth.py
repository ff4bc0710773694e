"""AUTH credential checks, the senders restriction and the masquerade rewrite."""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path

import bcrypt
import pytest

from pigeon.crypt_hash import hash_password
from pigeon.server.auth import (
    CredentialsChecker,
    masquerade_from,
    parse_credentials,
    sender_allowed,
)
from pigeon.tables.base import TableError

Lookup = Callable[[str, str], Awaitable[str | None]]


def table(service: str, entries: dict[str, str]) -> tuple[Lookup, list[tuple[str, str]]]:
    """A dict-backed lookup for one service, and the log of the queries it received."""
    queries: list[tuple[str, str]] = []

    async def lookup(asked: str, key: str) -> str | None:
        queries.append((asked, key))
        assert asked == service
        return entries.get(key)

    return lookup, queries


async def failing_lookup(service: str, key: str) -> str | None:
    raise TableError("backend down")


def run(coro: Awaitable[bool]) -> bool:
    async def main() -> bool:
        return await coro

    return asyncio.run(main())


SECRET_HASH = hash_password("secret")
BCRYPT_HASH = bcrypt.hashpw(b"hunter2", bcrypt.gensalt(4)).decode()


class TestTableCredentials:
    @pytest.fixture
    def checker(self) -> CredentialsChecker:
        lookup, _ = table(
            "credentials",
            {
                "bob": f"bob:{SECRET_HASH}",
                "alice": BCRYPT_HASH,
                "renamed": f"someone-else:{SECRET_HASH}",
                "nopass": "nopass:",
                "broken": "xy",
            },
        )
        return CredentialsChecker(lookup)

    @pytest.mark.parametrize(
        ("user", "password", "ok"),
        [
            ("bob", "secret", True),
            ("bob", "Secret", False),
            ("bob", "", False),
            ("alice", "hunter2", True),
            ("alice", "secret", False),
            ("renamed", "secret", True),  # the user part of the value is not checked
            ("nopass", "", True),  # empty hash: empty password, as crypt_checkpass
            ("nopass", "x", False),
            ("nobody", "secret", False),
        ],
    )
    def test_check(self, checker: CredentialsChecker, user: str, password: str, ok: bool) -> None:
        assert run(checker.check(user, password)) is ok

    def test_instance_is_an_authenticator(self, checker: CredentialsChecker) -> None:
        assert run(checker("bob", "secret"))
        assert not run(checker("bob", "wrong"))

    def test_malformed_value_is_a_temporary_failure(self, checker: CredentialsChecker) -> None:
        with pytest.raises(TableError):
            run(checker.check("broken", "xy"))

    def test_table_failure_propagates(self) -> None:
        with pytest.raises(TableError):
            run(CredentialsChecker(failing_lookup).check("bob", "secret"))

    def test_lookup_key_is_the_username(self) -> None:
        lookup, queries = table("credentials", {})
        run(CredentialsChecker(lookup).check("bob@example.org", "pw"))
        assert queries == [("credentials", "bob@example.org")]


def test_auth_service_table_decides_alone() -> None:
    seen: list[str] = []

    async def auth_check(key: str) -> bool:
        seen.append(key)
        return key == "bob:pa:ss"

    lookup, queries = table("credentials", {"bob": f"bob:{SECRET_HASH}"})
    checker = CredentialsChecker(lookup, auth_check=auth_check)
    assert run(checker.check("bob", "pa:ss"))
    assert not run(checker.check("bob", "secret"))  # the credentials hash is not consulted
    assert seen == ["bob:pa:ss", "bob:secret"]
    assert queries == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bob:$6$x$y", ("bob", "$6$x$y")),
        ("$6$x$y", ("key", "$6$x$y")),
        ("bob:", ("bob", "")),
        ("a:b:c", ("a", "b:c")),
    ],
)
def test_parse_credentials(value: str, expected: tuple[str, str]) -> None:
    assert parse_credentials("key", value) == expected


class TestSystemUsers:
    @pytest.fixture
    def me(self) -> str:
        return pwd.getpwuid(os.getuid()).pw_name

    def shadow(self, tmp_path: Path, lines: list[str]) -> str:
        path = tmp_path / "shadow"
        path.write_text("".join(f"{line}\n" for line in lines))
        return str(path)

    def test_password_from_the_shadow_file(self, tmp_path: Path, me: str) -> None:
        path = self.shadow(tmp_path, ["other:!:1::::::", f"{me}:{SECRET_HASH}:19000:0:99999:7:::"])
        checker = CredentialsChecker(shadow_path=path)
        assert run(checker.check(me, "secret"))
        assert not run(checker.check(me, "wrong"))

    def test_user_missing_from_passwd_is_refused(self, tmp_path: Path) -> None:
        path = self.shadow(tmp_path, [f"no-such-user-pigeon:{SECRET_HASH}:::::::"])
        checker = CredentialsChecker(shadow_path=path)
        assert not run(checker.check("no-such-user-pigeon", "secret"))

    @pytest.mark.parametrize("field", ["!", "*", "", f"!{SECRET_HASH}", "!!"])
    def test_locked_and_empty_passwords_are_refused(
        self, tmp_path: Path, me: str, field: str
    ) -> None:
        path = self.shadow(tmp_path, [f"{me}:{field}:19000::::::"])
        checker = CredentialsChecker(shadow_path=path)
        assert not run(checker.check(me, "secret"))
        assert not run(checker.check(me, ""))

    def test_unreadable_shadow_refuses_everyone(self, tmp_path: Path, me: str) -> None:
        checker = CredentialsChecker(shadow_path=str(tmp_path / "missing"))
        # the passwd entry's field is then used: "x" on shadowed systems, never a match
        assert pwd.getpwnam(me).pw_passwd in ("x", "*", "!", "")
        assert not run(checker.check(me, "secret"))
        assert not run(checker.check(me, ""))


class TestSenders:
    @pytest.fixture
    def lookup(self) -> Lookup:
        lookup, _ = table(
            "mailaddrmap",
            {
                "bob": "bob@example.org, @example.net",
                "carol": "carol",
                "admin": "@",
                "quoted": '"x,y@example.org", z@example.org',
            },
        )
        return lookup

    @pytest.mark.parametrize(
        ("user", "mail_from", "ok"),
        [
            ("bob", "bob@example.org", True),
            ("bob", "BOB@Example.ORG", True),
            ("bob", "bob+list@example.org", True),  # the tag is ignored
            ("bob", "alice@example.org", False),
            ("bob", "anyone@example.net", True),
            ("bob", "bob@sub.example.net", False),
            ("bob", "", False),
            ("carol", "carol@anywhere.example", True),
            ("carol", "caroline@anywhere.example", False),
            ("admin", "whoever@whatever.example", True),
            ("admin", "", True),
            ("quoted", "x,y@example.org", True),
            ("quoted", "z@example.org", True),
            ("quoted", "y@example.org", False),
            ("mallory", "mallory@example.org", False),  # unknown user
        ],
    )
    def test_sender_allowed(self, lookup: Lookup, user: str, mail_from: str, ok: bool) -> None:
        assert run(sender_allowed(user, mail_from, lookup)) is ok

    def test_other_subaddress_delimiter(self, lookup: Lookup) -> None:
        assert run(sender_allowed("bob", "bob-list@example.org", lookup, delim="-"))
        assert not run(sender_allowed("bob", "bob-list@example.org", lookup))

    def test_table_failure_propagates(self) -> None:
        with pytest.raises(TableError):
            run(sender_allowed("bob", "bob@example.org", failing_lookup))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (" Bob <bob@example.org>", " Bob <me@example.net>"),
        (" bob@example.org", " me@example.net"),
        (" bob@example.org (Bob Smith)", " me@example.net (Bob Smith)"),
        (' "Smith, Bob" <bob@example.org>', ' "Smith, Bob" <me@example.net>'),
        (" a@example.org,\r\n\tB <b@example.org>", " me@example.net,\r\n\tB <me@example.net>"),
        (" undisclosed-recipients:;", " undisclosed-recipients:;"),
        (' "unterminated <bob@example.org>', ' "unterminated <bob@example.org>'),
        (" <bob@example.org", " <bob@example.org"),
        (" ", " "),
    ],
)
def test_masquerade_from(value: str, expected: str) -> None:
    assert masquerade_from(value, "me@example.net") == expected


def test_a_latin1_password_matches_the_hash_of_its_bytes() -> None:
    """The SMTP state machine hands over credentials that are not UTF-8 as surrogates; the
    check hashes the bytes the client sent, as crypt(3) would in smtpd."""
    from pigeon.crypt_hash import sha_crypt, verify_password

    hashed = sha_crypt(b"p\xe4ss", "$6$abcdefgh")
    assert hashed is not None
    sent = b"p\xe4ss".decode("utf-8", "surrogateescape")
    assert verify_password(sent, hashed)
    assert not verify_password("päss", hashed)  # the UTF-8 spelling is other bytes
    bhash = bcrypt.hashpw(b"p\xe4ss", bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(sent, bhash)
