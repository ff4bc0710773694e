"""Maildir and mbox writers: atomic, junk folder, sub-address folder, mbox quoting."""

from __future__ import annotations

import os
from pathlib import Path

from pigeon.delivery.mailbox import is_junk, maildir_deliver, mbox_deliver

MSG = b"Subject: hi\r\n\r\nline one\r\nFrom me\r\n"


def test_maildir_creates_folders_and_writes_lf(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    path = Path(maildir_deliver(str(md), MSG))
    assert path.parent == md / "new"
    assert path.read_bytes() == b"Subject: hi\n\nline one\nFrom me\n"
    assert sorted(os.listdir(md)) == ["cur", "new", "tmp"]
    assert os.listdir(md / "tmp") == []


def test_maildir_junk_goes_to_junk_folder(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    spam = b"X-Spam: yes\r\nSubject: buy\r\n\r\nx\r\n"
    assert Path(maildir_deliver(str(md), spam, junk=True)).parent == md / ".Junk" / "new"
    assert Path(maildir_deliver(str(md), MSG, junk=True)).parent == md / "new"
    # Without the junk option, spam stays in the inbox.
    assert Path(maildir_deliver(str(md), spam)).parent == md / "new"


def test_is_junk_looks_at_headers_only() -> None:
    assert is_junk(b"X-Spam-Flag: YES\r\n\r\n")
    assert not is_junk(b"Subject: x\r\n\r\nX-Spam: yes\r\n")
    assert not is_junk(b"X-Spam: yes (score 9)\r\n\r\n")


def test_subaddress_folder_used_when_it_exists(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    (md / ".lists").mkdir(parents=True)
    assert Path(maildir_deliver(str(md), MSG, extension="lists")).parent == md / ".lists" / "new"
    assert Path(maildir_deliver(str(md), MSG, extension="other")).parent == md / "new"
    (md / ".lists.work").mkdir()  # Maildir++ sub-folder: the dot stays, as in smtpd
    got = Path(maildir_deliver(str(md), MSG, extension="lists.work"))
    assert got.parent == md / ".lists.work" / "new"
    assert Path(maildir_deliver(str(md), MSG, extension="../x")).parent == md / "new"


def test_mbox_appends_with_from_line_and_quoting(tmp_path: Path) -> None:
    box = tmp_path / "mbox"
    mbox_deliver(str(box), "alice@example.test", MSG)
    mbox_deliver(str(box), "", MSG)
    data = box.read_bytes()
    assert data.startswith(b"From alice@example.test ")
    assert b"\nFrom MAILER-DAEMON " in data
    assert data.count(b">From me\n") == 2
    assert not (tmp_path / "mbox.lock").exists()


def test_a_file_where_the_maildir_should_be_is_retried_not_bounced(tmp_path: Path) -> None:
    """An admin's mistake (a file in the way) is temporary, as smtpd retries it; the mail
    must not bounce at once."""
    import pytest

    from pigeon.delivery.mailbox import DeliveryFailure

    (tmp_path / "home").write_text("not a directory")
    with pytest.raises(DeliveryFailure) as failure:
        maildir_deliver(str(tmp_path / "home" / "Maildir"), MSG)
    assert failure.value.temporary
