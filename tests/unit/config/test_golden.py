"""Golden files: each ``golden/X.conf`` must give exactly ``golden/X.out`` (Pigeon's
messages and positions). The files were reviewed line by line against parse.y."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.config import ConfigError, load_config

GOLDEN = Path(__file__).with_name("golden")
CASES = sorted(p.stem for p in GOLDEN.glob("*.conf"))


def _check(name: str) -> str:
    try:
        load_config(f"{name}.conf", check_files=False)
    except ConfigError as e:
        return str(e)
    return "configuration OK"


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)
    assert _check(name) == (GOLDEN / f"{name}.out").read_text().rstrip("\n")
