"""``pigeon check`` entry point: output and exit status."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.config.check import check_main


def test_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "smtpd.conf"
    conf.write_text('listen on $iface\naction "a" mbox\nmatch for local action "a"\n')
    assert check_main(str(conf), {"iface": "lo"}) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == ("configuration OK\n", "")


def test_errors_go_to_stderr_in_file_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "smtpd.conf"
    conf.write_text(
        f'pki mx.example.org cert "{tmp_path}/missing.crt"\n'
        'pki mx.example.org key "/dev/null"\n'
        "action a mbox user x\n"
    )
    assert check_main(str(conf), {}) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == [
        f"{conf}:1:25: failed to load certificate file {tmp_path}/missing.crt: No such file",
        f"{conf}:3:15: user may not be specified for this dispatcher",
        f"{conf}: no rules, nothing to do",
    ]


def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main(str(tmp_path / "nope.conf"), {}) == 1
    assert (
        capsys.readouterr().err == f"{tmp_path}/nope.conf: cannot read: No such file or directory\n"
    )
