"""pigeon-smtpd: smtpd(8)'s command line, run as Pigeon."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.smtpd_cli import main, translate


def test_smtpd_flags_become_pigeon_ones() -> None:
    assert translate(["-dv", "-f", "/etc/smtpd.conf"]) == [
        "run", "-f", "/etc/smtpd.conf", "-d", "-v",
    ]  # fmt: skip
    assert translate(["-F", "-D", "a=b", "-P", "mta", "-P", "mda"]) == [
        "run", "-D", "a=b", "-d", "--log", "syslog", "-P", "mta", "-P", "mda",
    ]  # fmt: skip
    assert translate(["-n", "-f", "x.conf", "-D", "a=b"]) == ["check", "-f", "x.conf", "-D", "a=b"]
    assert translate(["-h"]) is None


def test_configtest_answers_as_smtpd_n(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.conf"
    good.write_text('listen on lo\naction "a" mbox\nmatch for local action "a"\n')
    assert main(["-n", "-f", str(good)]) == 0
    assert "configuration OK" in capsys.readouterr().err  # on stderr, as smtpd -n
    bad = tmp_path / "bad.conf"
    bad.write_text('listen on lo\naction "a" mbox\nmatch for local action "b"\n')
    assert main(["-n", "-f", str(bad)]) == 1
    assert f"{bad}:3:" in capsys.readouterr().err


def test_version_and_unknown_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-h"]) == 0
    assert capsys.readouterr().out.startswith("version: Pigeon ")
    with pytest.raises(SystemExit) as exit_:
        main(["-x"])
    assert exit_.value.code == 2
