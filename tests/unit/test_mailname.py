"""The default mail name, found as smtpd's getmailname() finds it."""

from __future__ import annotations

import socket
from pathlib import Path

from pigeon.mailname import canonical, mailname, read_mailname


def test_the_first_line_of_the_mailname_file(tmp_path: Path) -> None:
    path = tmp_path / "mailname"
    path.write_text("mx.example.org\nignored\n")
    assert read_mailname(path) == "mx.example.org"
    path.write_text("\n")
    assert read_mailname(path) is None
    assert read_mailname(tmp_path / "missing") is None


def test_a_short_hostname_is_canonicalized_a_dotted_one_kept() -> None:
    assert canonical("mx.example.org") == "mx.example.org"  # dotted: not looked up
    assert canonical("localhost") == "localhost"  # /etc/hosts names it so


def test_the_mail_name_is_this_hosts_unless_a_mailname_file_says_otherwise() -> None:
    from_file = read_mailname()
    assert mailname() == (from_file or canonical(socket.gethostname()))
