"""The privileged helper's protocol: what it accepts, what it refuses, when it exits."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Workdir, mail_uid_gid, maildir_messages

from pigeon import privsep
from pigeon.delivery.local import LocalTarget, LocalUser
from pigeon.queue.envelope import Envelope


def _header(**changes: Any) -> dict[str, Any]:
    user = LocalUser("alice", 1000, 1000, "/home/alice")
    target = LocalTarget("maildir", "/home/alice/Maildir", user)
    env = Envelope(
        evpid=5, dispatcher="d", type="mda", sender="s@x", rcpt="a@y", dest="a@y", ctime=0
    )
    data = privsep.encode_request(7, target, env, b"body")
    (length,) = struct.unpack(">I", data[:4])
    header: dict[str, Any] = json.loads(data[4 : 4 + length])
    header.update(changes)
    return header


def test_round_trip() -> None:
    ident, target, env, size = privsep.decode_request(_header())
    assert (ident, target.method, target.user.uid, env.rcpt, size) == (7, "maildir", 1000, "a@y", 4)


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "exec"},
        {"user": {"name": "root", "uid": 0, "gid": 0, "home": "/root"}},
        {"user": {"name": "x", "uid": 1000, "gid": 0, "home": "/"}},
        {"user": {"name": "x", "uid": True, "gid": 5, "home": "/"}},
        {"target": "/tmp/a\0b"},
        {"target": ""},
        {"size": -1},
        {"size": privsep.MAX_MESSAGE + 1},
        {"id": 0},
        {"extra": 1},
    ],
)
def test_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(privsep.PrivsepError):
        privsep.decode_request(_header(**changes))


def test_default_user_missing_is_a_warning_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(privsep, "DEFAULT_USER", "_pigeon_missing_for_test")
    run_as, warning = privsep.resolve_run_as(None)
    assert run_as is None and warning and "_pigeon_missing_for_test" in warning
    with pytest.raises(privsep.PrivsepError):
        privsep.resolve_run_as("_pigeon_missing_for_test")


def test_not_root_nothing_to_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert privsep.resolve_run_as("whoever") == (None, None)


@pytest.fixture
def work() -> Iterator[Workdir]:
    w = Workdir()
    yield w
    w.cleanup()


def test_forked_helper_delivers_and_exits_on_eof(work: Workdir) -> None:
    """As root the delivery runs as the (non-root) mailbox user; otherwise as ourselves."""
    uid, gid = mail_uid_gid()
    mail = work.mailroot()
    client = privsep.start_helper()
    user = LocalUser("alice", uid, gid, str(mail))
    target = LocalTarget("maildir", str(mail / "Maildir"), user)
    env = Envelope(
        evpid=1, dispatcher="d", type="mda", sender="s@x", rcpt="a@y", dest="a@y", ctime=0
    )
    root = LocalTarget("maildir", str(mail / "R"), LocalUser("root", 0, 0, "/root"))

    async def main() -> tuple[str, str]:
        ok = await client.deliver(target, env, b"Subject: t\r\n\r\nhi\r\n")
        refused = await client.deliver(root, env, b"x\r\n")
        client.close()
        return ok.status, refused.status

    assert asyncio.run(main()) == ("ok", "permfail")
    messages = maildir_messages(mail / "Maildir")
    assert len(messages) == 1 and b"Delivered-To: a@y" in messages[0]
    assert (mail / "Maildir" / "new").stat().st_uid == uid
    assert not (mail / "R").exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pid, status = os.waitpid(client.pid, os.WNOHANG)
        if pid:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(client.pid, 9)
    raise AssertionError("helper did not exit after EOF")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a mailbox for a user needs root")
def test_a_first_mbox_delivery_creates_the_users_file_in_a_debian_mail_spool(
    work: Workdir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's /var/mail is root:mail 2775: a user cannot create its own mailbox there, so
    the first mail stayed queued. As mail.local does, root creates it (0600, the user's);
    a path that is not the user's own spool file is never created as root."""
    import grp

    from pigeon.delivery import local

    spool = work.path / "var-mail"
    spool.mkdir()
    os.chown(spool, 0, grp.getgrnam("mail").gr_gid)
    os.chmod(spool, 0o2775)
    monkeypatch.setattr(local, "MAIL_SPOOL", str(spool))
    uid, gid = mail_uid_gid()
    name = "alice"
    user = LocalUser(name, uid, gid, str(work.path))
    env = Envelope(
        evpid=1, dispatcher="d", type="mda", sender="s@x", rcpt="a@y", dest="a@y", ctime=0
    )
    mbox = spool / name
    outcome = asyncio.run(local.deliver(LocalTarget("mbox", str(mbox), user), env, b"hi\r\n"))
    assert outcome.status == "ok", outcome
    assert mbox.stat().st_uid == uid and mbox.stat().st_mode & 0o777 == 0o600
    assert b"hi" in mbox.read_bytes()
    other = spool / "elsewhere"  # e.g. a .forward naming another file there: not created
    outcome = asyncio.run(local.deliver(LocalTarget("mbox", str(other), user), env, b"x\r\n"))
    assert outcome.status != "ok" and not other.exists()
