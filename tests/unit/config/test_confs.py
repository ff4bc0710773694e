"""Every numbered example in confs/ gets the verdict OpenSMTPD 6.8 gave (VERIFY-RESULTS.txt).

Files missing on the machine where smtpd ran are missing here too (pointed at a path that
does not exist); every other /etc path is replaced by a stub in tmp, so the results do not
depend on this host's /etc.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pigeon.config import ConfigError, parse_config_text

CONFS = Path("/work/shared/design/confs")
VERIFY = CONFS / "VERIFY-RESULTS.txt"
ETC_PATH = re.compile(r"/etc/[\w.+/-]+")

STUBS = {
    "aliases": "root: bob\npostmaster: root\n",
    "secrets": "bob bob:secret\n",
    "creds": "label user:password\n",
    "other-relays": "192.0.2.1\n203.0.113.0/24\n",
    "domains": "example.net\n",
    "virtuals": "bob@example.net vmail\n",
    "passwd": "bob@example.net $6$abc$def\n",
}

pytestmark = pytest.mark.skipif(not VERIFY.exists(), reason="design confs not available")


def _verdicts() -> dict[str, tuple[list[str], list[str]]]:
    """file -> (lines of the plain run, lines of the stubbed run)."""
    result: dict[str, tuple[list[str], list[str]]] = {}
    name = None
    plain: list[str] = []
    stubbed: list[str] = []
    current = plain
    for line in VERIFY.read_text().splitlines():
        if line.startswith("=== "):
            if name:
                result[name] = (plain, stubbed if stubbed else plain)
            name, plain, stubbed = line[4:], [], []
            current = plain
        elif line.startswith("--- same file"):
            current = stubbed
        elif name:
            current.append(line)
    if name:
        result[name] = (plain, stubbed if stubbed else plain)
    return result


def _missing_paths(plain: list[str]) -> set[str]:
    missing = {line.split(":")[0] for line in plain if "fopen: No such file" in line}
    if any("failed to load certificate file" in line for line in plain):
        missing.add("CERTS")
    return missing


def _prepare(tmp: Path, text: str, missing: set[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        path = m.group(0)
        is_cert = path.startswith("/etc/ssl")
        if path in missing or (is_cert and "CERTS" in missing and "certs/" not in path):
            return str(tmp / "missing" / path.lstrip("/"))
        stub = tmp / "stub" / path.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(STUBS.get(stub.name, "stub\n"))
        return str(stub)

    return ETC_PATH.sub(repl, text)


def _error_lines(lines: list[str], name: str) -> list[int]:
    found = []
    for line in lines:
        m = re.match(rf"^(?:{re.escape(name)}|<tmpdir>/stubbed\.conf):(\d+):", line)
        if m:
            found.append(int(m.group(1)))
    return found


def _run(text: str, name: str) -> list[str] | None:
    try:
        parse_config_text(text, name)
    except ConfigError as e:
        return [str(i) for i in e.issues]
    return None


NUMBERED = sorted(p.name for p in CONFS.glob("[0-9][0-9]-*.conf")) if CONFS.exists() else []


@pytest.mark.parametrize("name", NUMBERED)
def test_stubbed_verdict_matches_opensmtpd(name: str, tmp_path: Path) -> None:
    stubbed = _verdicts()[name][1]
    text = _prepare(tmp_path, (CONFS / name).read_text(), set())
    issues = _run(text, name)
    if stubbed == ["configuration OK"]:
        assert issues is None
    else:
        assert issues is not None
        assert sorted({int(i.split(":")[1]) for i in issues if re.match(r".*:\d+:", i)}) == sorted(
            set(_error_lines(stubbed, name))
        )


@pytest.mark.parametrize("name", NUMBERED)
def test_plain_verdict_matches_opensmtpd(name: str, tmp_path: Path) -> None:
    """With the same files missing as on the reference machine: same verdict; Pigeon's
    first error is on OpenSMTPD's first error line, and every line Pigeon names was named
    by OpenSMTPD too (Pigeon does not repeat cascading errors)."""
    plain, _ = _verdicts()[name]
    text = _prepare(tmp_path, (CONFS / name).read_text(), _missing_paths(plain))
    issues = _run(text, name)
    if plain == ["configuration OK"]:
        assert issues is None
        return
    assert issues is not None
    ours = [int(i.split(":")[1]) for i in issues if re.match(rf"^{re.escape(name)}:\d+:", i)]
    theirs = _error_lines(plain, name)
    if theirs:
        assert ours[0] == theirs[0]
        assert set(ours) <= set(theirs)
    else:  # OpenSMTPD named no line (certificate loading); Pigeon names the pki line
        assert ours


def test_syntax_errors_conf_exact_messages(tmp_path: Path) -> None:
    issues = _run((CONFS / "13-syntax-errors.conf").read_text(), "13.conf")
    assert issues == [
        '13.conf:2:38: syntax error: unexpected "!" (a builtin filter takes exactly one condition)',
        '13.conf:3:42: syntax error: "junk" is not allowed in phase commit',
        "13.conf:4:28: no filter exist with that name: undeclared",
        "13.conf:5:31: no such dispatcher: nonexistent",
        "13.conf: no rules, nothing to do",
    ]


def test_missing_table_file_is_reported_once(tmp_path: Path) -> None:
    text = _prepare(tmp_path, (CONFS / "02-manpage-smarthost.conf").read_text(), {"/etc/secrets"})
    issues = _run(text, "02.conf")
    assert issues is not None and len(issues) == 1
    assert issues[0].startswith("02.conf:3:15: invalid configuration file ")
    assert issues[0].endswith("/etc/secrets for table secrets: No such file or directory")
