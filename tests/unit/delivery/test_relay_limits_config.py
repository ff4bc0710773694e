"""``mta limit`` lines become the relay agent's settings, per destination domain too."""

from __future__ import annotations

from pigeon.config.parser import parse_config_text
from pigeon.daemon import relay_settings
from pigeon.delivery.relay import DomainLimits

CONFIG = """mta limit max-conn-per-host 7 session-mail-max 50
mta limit for domain Slow.Test max-conn-per-host 1 session-mail-max 2
mta limit for domain keep.test session-keepalive 30
action "r" relay
match from any for any action "r"
"""


def test_default_limits_apply_to_every_other_domain() -> None:
    settings = relay_settings(parse_config_text(CONFIG), "mx.test", 25)
    assert settings.max_conn_per_host == 7
    assert settings.limits_for("example.org") == DomainLimits(7, 50, 10.0, 25)


def test_a_domain_gets_its_own_values_over_the_defaults() -> None:
    settings = relay_settings(parse_config_text(CONFIG), "mx.test", 25)
    assert settings.limits_for("slow.test") == DomainLimits(1, 2, 10.0, 25)
    assert settings.limits_for("SLOW.test") == settings.limits_for("slow.test")
    # Only what the domain line names changes; the rest are the defaults.
    assert settings.limits_for("keep.test") == DomainLimits(7, 50, 30.0, 25)
