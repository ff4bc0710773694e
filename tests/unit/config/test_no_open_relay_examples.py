"""The built-in default and every example configuration relay only for local or
authenticated senders: each rule that leads to a ``relay`` action is limited to local
clients, the local socket, authenticated users or a source-address table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.config import ConfigError, parse_config_text
from pigeon.config.model import Config, Match
from pigeon.control.cli import DEFAULT_CONFIG

CONFS = Path(__file__).parents[2] / "data" / "design" / "confs"
EXAMPLES = sorted(p.name for p in CONFS.glob("[0-9][0-9]-*.conf") if "syntax-errors" not in p.name)
TRUSTED_SOURCES = {"from-local", "from-socket", "auth", "from-src"}


def relay_rules(config: Config) -> list[Match]:
    out = []
    for rule in config.matches:
        action = config.actions.get(rule.action) if rule.action else None
        if action is not None and action.method == "relay":
            out.append(rule)
    return out


def open_relay_rules(config: Config) -> list[int]:
    return [
        rule.line
        for rule in relay_rules(config)
        if not any(c.kind in TRUSTED_SOURCES and not c.negated for c in rule.criteria)
    ]


def test_default_config_delivers_locally_only() -> None:
    config = parse_config_text(DEFAULT_CONFIG, "<default>", check_files=False)
    assert relay_rules(config) == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_relays_only_for_trusted_senders(name: str) -> None:
    config = parse_config_text((CONFS / name).read_text(), name, check_files=False)
    assert open_relay_rules(config) == []


def test_match_without_from_means_from_local() -> None:
    """``match for any action "relay"`` is ``from local``, as in OpenSMTPD: the shortest
    relay rule is not an open relay."""
    text = 'action "relay" relay\nmatch for any action "relay"\n'
    config = parse_config_text(text, "t.conf", check_files=False)
    (rule,) = config.matches
    assert [c.kind for c in rule.criteria if c.kind.startswith("from")] == ["from-local"]
    assert open_relay_rules(config) == []


def test_the_check_flags_an_open_relay() -> None:
    text = 'action "relay" relay\nmatch from any for any action "relay"\n'
    config = parse_config_text(text, "t.conf", check_files=False)
    assert open_relay_rules(config) == [2]


def test_examples_are_there() -> None:
    assert len(EXAMPLES) >= 10
    for name in EXAMPLES:
        try:
            parse_config_text((CONFS / name).read_text(), name, check_files=False)
        except ConfigError as e:  # pragma: no cover - shown when an example stops parsing
            pytest.fail(str(e))
