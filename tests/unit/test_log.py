"""pigeon.log: OpenSMTPD-style lines, parsed into JSON fields."""

from __future__ import annotations

import json
import logging

import pytest

from pigeon import log as plog


def test_parse_session_line() -> None:
    line = "e706f4ed9ca38df3 smtp connected address=127.0.0.1 host=localhost"
    assert plog.parse_line(line) == {
        "session": "e706f4ed9ca38df3",
        "event": "smtp connected",
        "address": "127.0.0.1",
        "host": "localhost",
    }


def test_parse_quoted_values() -> None:
    line = (
        "e706f4f398c54e68 mta delivery evpid=ce3b871bf7f61a57 from=<alice@example.test> "
        'to=<dave@sink.test> rcpt=<-> source="127.0.0.1" relay="127.0.0.1 (localhost)" '
        'delay=0s result="Ok" stat="250 2.0.0 Ok"'
    )
    fields = plog.parse_line(line)
    assert fields["event"] == "mta delivery"
    assert fields["relay"] == "127.0.0.1 (localhost)"
    assert fields["stat"] == "250 2.0.0 Ok"
    assert fields["from"] == "<alice@example.test>"
    assert fields["rcpt"] == "<->"


def test_parse_plain_line() -> None:
    assert plog.parse_line("info: Pigeon starting") == {"event": "info: Pigeon starting"}


class Captured:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Captured:
    return Captured(capsys)


def test_text_format_is_the_bare_line(captured: Captured) -> None:
    plog.setup_logging(foreground=True, verbose=False)
    logging.getLogger("pigeon.smtp").info("%s smtp connected address=%s", "0" * 16, "::1")
    logging.getLogger("pigeon.smtp").debug("not shown unless verbose")
    assert captured.getvalue() == f"{'0' * 16} smtp connected address=::1\n"


def test_json_format(captured: Captured) -> None:
    plog.setup_logging(foreground=True, verbose=True, fmt="json")
    logging.getLogger("pigeon.mda").info(
        "%s mda delivery evpid=%s result=Ok stat=Delivered", "a" * 16, "b" * 16
    )
    record = json.loads(captured.getvalue())
    assert record["session"] == "a" * 16
    assert record["event"] == "mda delivery"
    assert record["result"] == "Ok"
    assert record["level"] == "info"
    assert record["logger"] == "pigeon.mda"
    assert record["message"].endswith("stat=Delivered")


def test_verbose_toggles_at_run_time(captured: Captured) -> None:
    plog.setup_logging(foreground=True, verbose=False)
    logger = logging.getLogger("pigeon.smtp")
    logger.debug("hidden")
    plog.set_verbose(True)
    logger.debug("shown")
    plog.set_verbose(False)
    assert captured.getvalue() == "shown\n"
