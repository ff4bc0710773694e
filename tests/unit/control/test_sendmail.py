"""sendmail(8) command line and message preparation (no daemon)."""

from __future__ import annotations

import email
import email.policy
import io
import os
import stat
from pathlib import Path

import pytest

from pigeon.queue import offline
from pigeon.sendmail import (
    EX_OK,
    EX_USAGE,
    Options,
    UsageError,
    parse_args,
    prepare,
    sendmail_main,
)


def test_usual_flags() -> None:
    opts = parse_args(
        ["-t", "-i", "-oi", "-odb", "-bm", "-F", "Root User", "-froot@example.test",
         "-N", "success,failure", "-R", "hdrs", "-V", "envid-1", "bob@example.test"]
    )  # fmt: skip
    assert opts.from_headers
    assert opts.fullname == "Root User"
    assert opts.sender == "root@example.test"
    assert opts.notify == "SUCCESS,FAILURE"
    assert opts.ret == "HDRS"
    assert opts.envid == "envid-1"
    assert opts.recipients == ["bob@example.test"]


def test_sender_in_angle_brackets_and_null_sender() -> None:
    assert parse_args(["-f", "<a@b.test>", "x@y.test"]).sender == "a@b.test"
    assert parse_args(["-f", "<>", "x@y.test"]).sender == ""


@pytest.mark.parametrize("argv", [["-q"], ["-N", "never,success"], ["-R", "some"], ["-f"]])
def test_bad_usage(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def parse(message: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_t_takes_recipients_from_to_cc_bcc_and_drops_bcc() -> None:
    data = (
        b"Subject: hi\nTo: Bob <bob@example.test>,\n carol@example.test\n"
        b"Cc: dave@example.test\nBcc: secret@example.test,\n\tother@example.test\n\nbody\n"
    )
    opts = Options(from_headers=True, recipients=["extra@example.test"])
    message, rcpts = prepare(data, opts, "root@example.test", "host.test")
    assert rcpts == [
        "extra@example.test", "bob@example.test", "carol@example.test",
        "dave@example.test", "secret@example.test", "other@example.test",
    ]  # fmt: skip
    assert b"secret@" not in message and b"other@" not in message
    msg = parse(message)
    assert msg["Bcc"] is None
    assert msg.get_content().strip() == "body"


def test_missing_from_date_message_id_are_added() -> None:
    opts = Options(fullname="Root User")
    message, _ = prepare(b"Subject: x\n\nbody\n", opts, "root@example.test", "host.test")
    msg = parse(message)
    assert msg["From"] == "Root User <root@example.test>"
    assert msg["Date"] is not None
    assert str(msg["Message-ID"]).endswith("@host.test>")
    assert msg["Subject"] == "x"


def test_present_headers_are_kept_as_they_are() -> None:
    data = (
        b"From: me@x.test\r\nDate: Tue, 24 Nov 2026 20:16:38 +0000\r\n"
        b"Message-ID: <a@b>\r\n\r\nb\r\n"
    )
    message, _ = prepare(data, Options(), "root@example.test", "host.test")
    assert message == data


def test_message_without_headers_gets_them_before_the_body() -> None:
    message, _ = prepare(b"just a body line\n", Options(), "u@h.test", "h.test")
    head, _, body = message.partition(b"\n\n")
    assert body == b"just a body line\n"
    assert b"From: u@h.test" in head


def test_daemon_down_stores_offline_and_exits_zero(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    status = sendmail_main(
        ["--spool", str(spool), "-f", "root@example.test", "-N", "success", "bob@example.test"],
        io.BytesIO(b"Subject: offline\n\nqueued while down\n"),
    )
    assert status == EX_OK
    files = offline.pending(spool)
    assert len(files) == 1
    mode = os.stat(files[0]).st_mode
    assert stat.S_IMODE(mode) == offline.FILE_MODE
    assert stat.S_IMODE(os.stat(offline.offline_dir(spool)).st_mode) == offline.DIR_MODE
    sub, uid = offline.read(files[0])
    assert uid == os.getuid()
    assert sub.sender == "root@example.test"
    assert sub.recipients == ["bob@example.test"]
    assert sub.notify == "SUCCESS"
    assert sub.message.endswith(b"\nqueued while down\n")


def test_no_recipient_is_a_usage_error(tmp_path: Path) -> None:
    status = sendmail_main(["--spool", str(tmp_path)], io.BytesIO(b"Subject: x\n\n"))
    assert status == EX_USAGE
    assert offline.pending(tmp_path) == []


def test_offline_reader_refuses_links(tmp_path: Path) -> None:
    offline.ensure_dir(tmp_path)
    path = offline.write(tmp_path, offline.Submission("a@b.test", ["c@d.test"], b"x\n"))
    os.link(path, tmp_path / "second-link")
    with pytest.raises(offline.OfflineError):
        offline.read(path)
    link = offline.offline_dir(tmp_path) / "symlink"
    link.symlink_to(tmp_path / "second-link")
    with pytest.raises(offline.OfflineError):
        offline.read(link)
