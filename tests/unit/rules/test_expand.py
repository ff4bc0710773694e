"""Recipient expansion: aliases, virtual order, sub-addresses, .forward, loops, only-modes."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest

from pigeon.config import parse_config_text
from pigeon.errors import SMTPError
from pigeon.rules.expand import Destination, Expander, UserInfo, parse_forward, parse_values
from pigeon.rules.ruleset import MatchContext, Ruleset
from pigeon.tables.base import Service, Table, open_tables

USERS = {"bob", "carol", "alice", "vmail"}
CTX = MatchContext(
    local=False, socket=False, src_ip="203.0.113.5", rdns=None, helo="client.example",
    auth_user=None, tls=False, tag=None, mail_from="sender@remote.example",
    rcpt_to="bob@example.org",
)  # fmt: skip


class Env:
    def __init__(self, conf: str, tmp: Path, forwards: dict[str, str] | None = None) -> None:
        self.config = parse_config_text(conf, check_files=False)
        self.tables = open_tables(self.config, {"proc": lambda d, _c: RecordingTable(d.name, {})})
        self.tmp = tmp
        self.forwards = forwards or {}
        self.lookups: list[str] = []

    async def userinfo(self, name: str) -> UserInfo | None:
        return UserInfo(name, 1000, 1000, f"/home/{name}") if name in USERS else None

    async def forward(self, user: UserInfo) -> str | None:
        return self.forwards.get(user.name)

    def expand(self, rcpt: str = "bob@example.org", **changes: object) -> list[Destination]:
        ruleset = Ruleset(self.config, self.tables, local_names=frozenset({"example.org"}))
        exp = Expander(
            self.config, self.tables, ruleset, userinfo=self.userinfo, forward=self.forward
        )
        return asyncio.run(exp.expand(replace(CTX, rcpt_to=rcpt, **changes)))  # type: ignore[arg-type]

    def fails(self, rcpt: str) -> SMTPError:
        with pytest.raises(SMTPError) as e:
            self.expand(rcpt)
        return e.value


def summary(dests: list[Destination]) -> list[tuple[str, str, str | None, str | None]]:
    return [(d.dispatcher, d.dest, d.user, d.mda_exec) for d in dests]


BASE = (
    'action "local" maildir alias <aliases>\naction "out" relay\n'
    'match from any for domain "example.org" action "local"\n'
    'match from local for any action "out"\n'
)


def test_plain_user_and_unknown_user(tmp_path: Path) -> None:
    env = Env('table aliases { "x" = "y" }\n' + BASE, tmp_path)
    assert summary(env.expand()) == [("local", "bob@example.org", "bob", None)]
    err = env.fails("nobody@example.org")
    assert (err.code, err.enhanced, err.text) == (
        550,
        None,
        "Invalid recipient: <nobody@example.org>",
    )


def test_no_matching_rule_and_reject_rule(tmp_path: Path) -> None:
    env = Env('table aliases { "x" = "y" }\n' + BASE, tmp_path)
    assert env.fails("bob@elsewhere.example").text == "Invalid recipient: <bob@elsewhere.example>"
    env = Env('action "a" mbox\nmatch from any for any reject\n', tmp_path)
    assert env.fails("bob@example.org").code == 550


def test_aliases_users_addresses_pipes_files_and_rematching(tmp_path: Path) -> None:
    aliases = (
        'table aliases { "postmaster" = "root", "root" = "bob, carol@example.org, '
        'dave@remote.example, |/usr/bin/log, /var/log/mail.txt" }\n'
    )
    env = Env(aliases + BASE, tmp_path)
    result = env.expand("Postmaster@example.org")
    assert summary(result) == [
        ("local", "Postmaster@example.org", "bob", None),
        ("local", "carol@example.org", "carol", None),
        ("out", "dave@remote.example", None, None),
        # an alias's commands and files run as the daemon's account, not as the alias key
        # (smtpd: its own user); a `root` account is never involved
        ("local", "Postmaster@example.org", "<daemon>", "|/usr/bin/log"),
        ("local", "Postmaster@example.org", "<daemon>", "/var/log/mail.txt"),
    ]
    assert all(d.internal for d in result) and {d.rcpt for d in result} == {
        "Postmaster@example.org"
    }


def test_alias_to_same_user_delivers_to_that_user(tmp_path: Path) -> None:
    env = Env('table aliases { "bob" = "bob, carol" }\n' + BASE, tmp_path)
    assert [d.user for d in env.expand()] == ["bob", "carol"]


def test_alias_loop_ends(tmp_path: Path) -> None:
    env = Env('table aliases { "bob" = "carol", "carol" = "bob" }\n' + BASE, tmp_path)
    err = env.fails("bob@example.org")
    assert (err.code, err.enhanced) == (524, "5.2.4")


def test_depth_limit(tmp_path: Path) -> None:
    chain = ", ".join(f'"u{i}" = "u{i + 1}"' for i in range(12))
    env = Env(f"table aliases {{ {chain} }}\n" + BASE, tmp_path)
    assert env.fails("u0@example.org").text == "Mailing list expansion problem: <u0@example.org>"


def test_alias_error_entry(tmp_path: Path) -> None:
    env = Env('table aliases { "gone" = "error:550 5.1.6 moved away" }\n' + BASE, tmp_path)
    err = env.fails("gone@example.org")
    assert (err.code, err.enhanced, err.text) == (550, "5.1.6", "moved away")
    env = Env('table aliases { "busy" = "error:450 try later" }\n' + BASE, tmp_path)
    assert env.fails("busy@example.org").code == 450


def test_subaddress(tmp_path: Path) -> None:
    env = Env('table aliases { "list+x" = "carol" }\n' + BASE, tmp_path)
    (d,) = env.expand("bob+news@example.org")
    assert (d.user, d.subaddress) == ("bob", "news")
    assert [d.user for d in env.expand("list+x@example.org")] == ["carol"]


def test_include_file(tmp_path: Path) -> None:
    inc = tmp_path / "members"
    inc.write_text("# members\nbob\ncarol, \\\n alice\n")
    env = Env(f'table aliases {{ "team" = ":include:{inc}" }}\n' + BASE, tmp_path)
    assert [d.user for d in env.expand("team@example.org")] == ["bob", "carol", "alice"]


class RecordingTable(Table):
    def __init__(self, name: str, data: dict[str, str]) -> None:
        self.name = name
        self.data = data
        self.keys: list[str] = []

    def services(self) -> frozenset[Service]:
        return frozenset(Service)

    async def _lookup(self, service: Service, key: str) -> str | None:
        self.keys.append(key)
        return self.data.get(key)

    async def _check(self, service: Service, key: str) -> bool:
        return key in self.data


VIRTUAL = (
    'table virt proc:/x\naction "v" maildir virtual <virt>\naction "out" relay\n'
    'match from any for domain "example.org" action "v"\nmatch from local for any action "out"\n'
)


def virtual_env(tmp_path: Path, data: dict[str, str]) -> tuple[Env, RecordingTable]:
    env = Env(VIRTUAL, tmp_path)
    table = RecordingTable("virt", data)
    env.tables["virt"] = table
    return env, table


def test_virtual_lookup_order_and_miss(tmp_path: Path) -> None:
    env, table = virtual_env(tmp_path, {})
    err = env.fails("Nobody+tag@Example.org")
    assert (err.code, err.enhanced) == (524, "5.2.4")
    assert table.keys == [
        "nobody+tag@example.org", "nobody@example.org", "nobody+tag", "nobody",
        "@example.org", "@",
    ]  # fmt: skip


def test_virtual_catch_all_and_username_lookup(tmp_path: Path) -> None:
    env, table = virtual_env(
        tmp_path,
        {"@example.org": "vmail", "abuse@example.org": "bob@example.org, x@remote.example"},
    )
    assert summary(env.expand("anyone@example.org")) == [("v", "anyone@example.org", "vmail", None)]
    assert table.keys[-2:] == ["vmail@", "vmail"]
    assert summary(env.expand("abuse@example.org")) == [
        ("v", "bob@example.org", "vmail", None),
        ("out", "x@remote.example", None, None),
    ]


def test_relay_destination(tmp_path: Path) -> None:
    env = Env('table aliases { "x" = "y" }\n' + BASE, tmp_path)
    (d,) = env.expand("someone@remote.example", local=True)
    assert (d.dispatcher, d.dest, d.user, d.internal) == (
        "out",
        "someone@remote.example",
        None,
        False,
    )


def test_userbase_table_and_fixed_user(tmp_path: Path) -> None:
    conf = (
        'action "md" maildir userbase { "zed" = "2000:2000:/var/vmail" }\n'
        'action "vm" maildir user vmail\n'
        'match from any for domain "example.org" action "md"\n'
        'match from any for domain "example.net" action "vm"\n'
    )
    env = Env(conf, tmp_path)
    assert [d.user for d in env.expand("zed@example.org")] == ["zed"]
    assert env.fails("bob@example.org").code == 550  # not in that user base
    # `user vmail` gives the delivery vmail's uid and gid only (the daemon's local_target):
    # the recipient must still be a user, as in smtpd 6.8, and stays the one delivered to
    assert [d.user for d in env.expand("bob@example.net")] == ["bob"]
    assert env.fails("anyone@example.net").code == 550


FORWARDING = (
    'action "local" maildir\naction "fo" forward-only\naction "eo" expand-only\n'
    'action "out" relay\n'
    'match from any for domain "example.org" action "local"\n'
    'match from any for domain "fwd.example" action "fo"\n'
    'match from any for domain "exp.example" action "eo"\n'
    'match from local for any action "out"\n'
)


def test_forward_file(tmp_path: Path) -> None:
    env = Env(FORWARDING, tmp_path, {"bob": "# mine\n\\bob, bob@remote.example\n|/bin/filter\n"})
    assert summary(env.expand()) == [
        ("local", "bob@example.org", "bob", None),
        ("out", "bob@remote.example", None, None),
        ("local", "bob@example.org", "bob", "|/bin/filter"),
    ]


def test_forward_only(tmp_path: Path) -> None:
    env = Env(FORWARDING, tmp_path, {"bob": "bob@remote.example\n", "carol": "|/bin/x\n"})
    assert summary(env.expand("bob@fwd.example")) == [("out", "bob@remote.example", None, None)]
    err = env.fails("carol@fwd.example")
    assert (err.code, err.enhanced) == (424, "4.2.4")
    assert env.fails("alice@fwd.example").code == 424  # no .forward: temporary


def test_expand_only(tmp_path: Path) -> None:
    env = Env(FORWARDING, tmp_path, {"bob": "carol@example.org\n"})
    assert summary(env.expand("bob@exp.example")) == [("local", "carol@example.org", "carol", None)]
    assert env.fails("alice@exp.example").code == 524


def test_duplicates_are_removed(tmp_path: Path) -> None:
    env = Env('table aliases { "team" = "bob, bob, carol, bob@example.org" }\n' + BASE, tmp_path)
    assert [d.user for d in env.expand("team@example.org")] == ["bob", "carol"]


def test_parse_values_and_forward() -> None:
    nodes = parse_values('bob, "|cmd a, b", /f, x@y.z, :include:/i, error:550 no')
    assert [(n.kind, n.value) for n in nodes] == [
        ("username", "bob"), ("pipe", "cmd a, b"), ("filename", "/f"), ("address", "x@y.z"),
        ("include", "/i"), ("error", "error:550 no"),
    ]  # fmt: skip
    with pytest.raises(ValueError):
        parse_values("bad user!")
    assert [n.value for n in parse_forward(":include:/x, bob # c\n")] == ["bob"]


def test_real_forward_file_checks(tmp_path: Path) -> None:
    from pigeon.rules.expand import ForwardError, read_forward

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    me = UserInfo("me", os.getuid(), os.getgid(), str(home))
    assert asyncio.run(read_forward(me)) is None
    fwd = home / ".forward"
    fwd.write_text("bob@remote.example\n")
    fwd.chmod(0o644)
    assert asyncio.run(read_forward(me)) == "bob@remote.example\n"
    # unsafe files are refused (forward(5), smtpd: 524), not silently skipped: the user's
    # forwarding must not stop without a word
    fwd.chmod(0o666)
    with pytest.raises(ForwardError, match="permissions") as unsafe:
        asyncio.run(read_forward(me))
    assert unsafe.value.permanent
    fwd.chmod(0o644)
    other = UserInfo("other", os.getuid() + 1, os.getgid(), str(home))
    with pytest.raises(ForwardError, match="owner"):
        asyncio.run(read_forward(other))
    fwd.rename(home / "real")
    fwd.symlink_to(home / "real")
    with pytest.raises(ForwardError, match="symbolic link"):
        asyncio.run(read_forward(me))
    fwd.unlink()
    fwd.write_text("# " + "x" * 5000 + "\n")
    with pytest.raises(ForwardError, match="too large") as big:
        asyncio.run(read_forward(me))
    assert not big.value.permanent
    fwd.write_text("bob@remote.example\n")
    home.chmod(0o775)
    with pytest.raises(ForwardError, match="home directory"):
        asyncio.run(read_forward(me))


def test_a_forward_with_an_invalid_entry_is_refused_not_trimmed(tmp_path: Path) -> None:
    from pigeon.rules.expand import parse_forward

    assert [n.value for n in parse_forward("bob, carol@example.org\n")] == [
        "bob",
        "carol@example.org",
    ]
    for text in ("bob\n!!!invalid\n", "<bob@example.org>\n", "~/fwd.mbox\n"):
        with pytest.raises(ValueError, match="invalid entry"):
            parse_forward(text)


def test_lmtp_names_the_user_the_address_resolved_to(tmp_path: Path) -> None:
    """As smtpd's ``mail.lmtp -u``: the alias or virtual target, not the address's local
    part. No account is needed (an LMTP server such as Dovecot has its own users)."""
    conf = (
        'table aliases { "alias-test" = "doom" }\n'
        'table vusers { "doom@example.org" = "doom" }\n'
        'action "a" lmtp "127.0.0.1:24" alias <aliases>\n'
        'action "v" lmtp "127.0.0.1:24" virtual <vusers>\n'
        'match from any for rcpt-to "alias-test@example.org" action "a"\n'
        'match from any for rcpt-to "doom@example.org" action "v"\n'
    )
    env = Env(conf, tmp_path)
    assert summary(env.expand("alias-test@example.org")) == [
        ("a", "alias-test@example.org", "doom", None)
    ]
    assert summary(env.expand("doom@example.org")) == [("v", "doom@example.org", "doom", None)]


def test_a_bad_forward_refuses_the_recipient_with_smtpds_codes(tmp_path: Path) -> None:
    from pigeon.rules.expand import ForwardError

    conf = 'table aliases { "x" = "y" }\n' + BASE
    env = Env(conf, tmp_path, forwards={"bob": "carol\n!!!invalid\n"})
    err = env.fails("bob@example.org")
    assert (err.code, err.enhanced) == (424, "4.2.4")  # was: delivered to carol only

    class Unsafe(Env):
        async def forward(self, user: UserInfo) -> str | None:
            raise ForwardError("/home/bob/.forward: unsecure file (owner)", permanent=True)

    err = Unsafe(conf, tmp_path).fails("bob@example.org")
    assert (err.code, err.enhanced) == (524, "5.2.4")  # was: delivered to bob's mailbox


def test_lmtp_follows_the_forward_of_a_user_that_has_one(tmp_path: Path) -> None:
    """As smtpd: alice (a user) forwards to bob, so LMTP is asked for bob; a name with no
    account still goes to LMTP as it is (Dovecot knows users the system does not)."""
    conf = 'action "l" lmtp "127.0.0.1:24"\nmatch from any for domain "example.org" action "l"\n'
    env = Env(conf, tmp_path, forwards={"alice": "bob"})
    assert [d.user for d in env.expand("alice@example.org")] == ["bob"]
    assert [d.user for d in env.expand("ghost@example.org")] == ["ghost"]
