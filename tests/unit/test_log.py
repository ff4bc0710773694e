"""pigeon.log: OpenSMTPD-style lines, parsed into JSON fields."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def pigeon_logger_state() -> Iterator[None]:
    """Restores the ``pigeon`` loggers' handlers and levels a test changes."""
    root = logging.getLogger("pigeon")
    saved = (list(root.handlers), root.level, root.propagate)
    mta = logging.getLogger("pigeon.mta")
    saved_mta = mta.level
    yield None
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    mta.setLevel(saved_mta)


@pytest.mark.usefixtures("pigeon_logger_state")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_child_writes_where_the_daemon_writes(tmp_path: Path, fmt: str) -> None:
    """The relay worker's lines land in the daemon's stream, in the daemon's format."""
    path = tmp_path / "daemon.log"
    with open(path, "w") as stream:
        handler = logging.StreamHandler(stream)
        if fmt == "json":
            handler.setFormatter(plog.JSONFormatter())
        logging.getLogger("pigeon").handlers[:] = [handler]
        description = plog.describe_for_child()
        assert description is not None
        assert description["target"] == "fd" and description["format"] == fmt
        # What the child does with it (here with a copy of the descriptor, as it inherits).
        child = plog.child_handler({**description, "fd": os.dup(description["fd"])})
        record = logging.LogRecord(
            "pigeon.mta", logging.INFO, "", 0, "abc mta delivery x=1", None, None
        )
        child.handle(record)
        child.close()
    text = path.read_text()
    if fmt == "json":
        data = json.loads(text)
        assert data["message"] == "abc mta delivery x=1" and data["x"] == "1"
    else:
        assert text == "abc mta delivery x=1\n"


@pytest.mark.usefixtures("pigeon_logger_state")
def test_no_description_without_a_single_known_handler() -> None:
    logging.getLogger("pigeon").handlers[:] = []
    assert plog.describe_for_child() is None
    logging.getLogger("pigeon").handlers[:] = [logging.NullHandler()]
    assert plog.describe_for_child() is None


@pytest.mark.usefixtures("pigeon_logger_state")
def test_levels_travel_to_a_child() -> None:
    """``log verbose`` and ``trace mta`` in the daemon reach the worker's loggers."""
    logging.getLogger("pigeon").setLevel(logging.INFO)
    logging.getLogger("pigeon.mta").setLevel(logging.DEBUG)
    levels = plog.logger_levels()
    assert levels["pigeon"] == logging.INFO and levels["pigeon.mta"] == logging.DEBUG
    # The child starts out different...
    logging.getLogger("pigeon").setLevel(logging.WARNING)
    logging.getLogger("pigeon.mta").setLevel(logging.NOTSET)
    plog.apply_levels(levels)
    assert logging.getLogger("pigeon.mta").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("pigeon.smtp").isEnabledFor(logging.DEBUG)
    # ...and an untrace clears the subsystem's level again.
    plog.apply_levels({"pigeon": logging.INFO})
    assert not logging.getLogger("pigeon.mta").isEnabledFor(logging.DEBUG)


def test_a_relayed_delivery_line_is_smtpds() -> None:
    """The shape of smtpd's own line (delivery-queue.md's capture), parsed back field by field."""
    from pigeon.delivery.logline import delivery_line
    from pigeon.queue.envelope import Envelope

    env = Envelope(
        evpid=0xCE3B871BF7F61A57,
        dispatcher="relay",
        type="mta",
        sender="alice@example.test",
        rcpt="dave@sink.test",
        dest="dave@sink.test",
        ctime=1000,
    )
    line = delivery_line(
        env,
        "ok",
        "250 2.0.0 Ok",
        1000.4,
        session="e706f4f398c54e68",
        source="127.0.0.1",
        relay="127.0.0.1 (localhost)",
    )
    assert line == (
        "e706f4f398c54e68 mta delivery evpid=ce3b871bf7f61a57 from=<alice@example.test> "
        'to=<dave@sink.test> rcpt=<-> source="127.0.0.1" relay="127.0.0.1 (localhost)" '
        'delay=0s result="Ok" stat="250 2.0.0 Ok"'
    )
    fields = plog.parse_line(line)
    assert fields["session"] == "e706f4f398c54e68" and fields["relay"] == "127.0.0.1 (localhost)"
    # Without a session (a failure before any connection) the line gets an id of its own.
    plain = delivery_line(env, "tempfail", "451 no MX", 1000.0)
    assert re.fullmatch(r"[0-9a-f]{16} mta delivery .* rcpt=<-> delay=0s .*", plain), plain


def test_a_local_delivery_line_is_smtpds() -> None:
    """smtpd's mda lines name the original recipient even when it is the destination
    (smtpd-log-deliveries.txt), where its mta lines say ``rcpt=<->``."""
    from pigeon.delivery.logline import delivery_line
    from pigeon.queue.envelope import Envelope

    def env(rcpt: str) -> Envelope:
        return Envelope(
            evpid=0x497D30D0D442DE38,
            dispatcher="local",
            type="mda",
            sender="bob@example.test",
            rcpt=rcpt,
            dest="alice@example.test",
            ctime=1000,
            mda_user="alice",
        )

    assert delivery_line(
        env("alice@example.test"), "ok", "Delivered", 1000.2, session="e706f4ee880afd37"
    ) == (
        "e706f4ee880afd37 mda delivery evpid=497d30d0d442de38 from=<bob@example.test> "
        "to=<alice@example.test> rcpt=<alice@example.test> user=alice delay=0s result=Ok "
        "stat=Delivered"
    )
    aliased = delivery_line(env("carol@example.test"), "ok", "Delivered", 1000.0)
    assert " to=<alice@example.test> rcpt=<carol@example.test> user=alice " in aliased
