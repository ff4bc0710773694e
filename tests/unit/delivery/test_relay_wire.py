"""What the daemon and the relay worker exchange (pigeon.delivery.wire)."""

from __future__ import annotations

import pytest

from pigeon.delivery import wire
from pigeon.delivery.dns import DNSSettings
from pigeon.delivery.relay import DomainLimits, RelaySettings
from pigeon.delivery.routes import RelayRoute
from pigeon.queue.envelope import DSN_FAILURE, Envelope
from pigeon.scheduler.scheduler import Outcome


def test_settings_survive_the_trip_with_per_domain_limits() -> None:
    settings = RelaySettings(helo="mx.test", mx_port=2525, max_conn_per_host=3)
    settings.domain_limits["slow.test"] = DomainLimits(1, 5, 2.0, 4)
    dns = DNSSettings(["127.0.0.1"], port=5353, timeout=1.0)
    line = wire.encode_batch([{"op": "configure", **wire.encode_settings(settings, dns)}])
    (message,) = wire.decode_batch(line)
    assert wire.decode_settings(message) == (settings, dns)


def test_route_tuples_come_back_as_tuples() -> None:
    route = RelayRoute(
        smarthost="smtps://label@relay.test", auth=("u", "p"), client_cert=("c.pem", "k.pem")
    )
    (message,) = wire.decode_batch(wire.encode_batch([wire.encode_route(route)]))
    back = wire.decode_route(message)
    assert back == route
    assert hash(back) == hash(route)  # usable in the agent's pool keys


def test_envelope_keeps_what_the_relay_agent_reads() -> None:
    env = Envelope(
        evpid=0x1234567800000001,
        dispatcher="relay",
        type="mta",
        sender="a@x.test",
        rcpt="b@y.test",
        dest="b@y.test",
        ctime=1_800_000_000,
        dsn_notify=DSN_FAILURE,
        dsn_ret="HDRS",
        dsn_envid="id1",
        dsn_orcpt="rfc822;b@y.test",
        retry=3,
    )
    (values,) = wire.decode_batch(wire.encode_batch([{"e": wire.encode_envelope(env)}]))
    back = wire.decode_envelope(values["e"])
    for name in wire.ENVELOPE_FIELDS:
        assert getattr(back, name) == getattr(env, name)


def test_outcomes_round_trip_and_bad_lines_are_refused() -> None:
    outcomes = {7: Outcome.ok("250 ok"), 8: Outcome.tempfail("421 later")}
    assert wire.decode_outcomes(wire.encode_outcomes(outcomes)) == outcomes
    with pytest.raises(ValueError):
        wire.decode_batch('{"op": "ready"}')
    with pytest.raises(ValueError):
        wire.decode_envelope([1, 2])
