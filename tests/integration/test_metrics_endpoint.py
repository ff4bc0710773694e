"""`metrics listen on ...`: a real daemon, a few sessions, then a Prometheus scrape."""

from __future__ import annotations

import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from prometheus_client.parser import text_string_to_metric_families

DOMAIN = "mx.metrics.test"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(
            f"alice {uid}:{gid}:{self.mail / 'alice'}\nsoft {uid}:{gid}:{self.mail / 'soft'}\n"
        )
        self.port = free_port()
        self.metrics_port = free_port()
        config = f"""
table users file:{users}
listen on 127.0.0.1 port {self.port} hostname {DOMAIN}
metrics listen on 127.0.0.1 port {self.metrics_port}
action "local" maildir userbase <users>
action "soft" mda "exit 75" userbase <users>
match from any for rcpt-to "soft@{DOMAIN}" action "soft"
match from any for rcpt-to "alice@{DOMAIN}" action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    def samples(self) -> Samples:
        status, text = self.scrape()
        assert status == 200
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def test_counters_after_sessions(site: Site) -> None:
    # The harness probed the port while waiting for the daemon: those sessions count too.
    before = site.samples()[("pigeon_smtp_sessions_total", ())]
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("a@example.org", [f"alice@{DOMAIN}"], "Subject: 1\r\n\r\none\r\n")
        client.sendmail("a@example.org", [f"alice@{DOMAIN}"], "Subject: 2\r\n\r\ntwo\r\n")
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        refused = client.sendmail(
            "b@example.org", [f"alice@{DOMAIN}", f"nobody@{DOMAIN}"], "Subject: 3\r\n\r\n3\r\n"
        )
        assert f"nobody@{DOMAIN}" in refused
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("c@example.org", [f"soft@{DOMAIN}"], "Subject: 4\r\n\r\nfour\r\n")
    wait_for(lambda: len(maildir_messages(site.mail / "alice" / "Maildir")) == 3, what="mail")
    wait_for(
        lambda: (
            site.samples().get(
                (
                    "pigeon_deliveries_total",
                    (("agent", "mda"), ("destination", DOMAIN), ("result", "tempfail")),
                )
            )
            == 1
        ),
        what="tempfail counted",
    )
    ok = ("agent", "maildir"), ("destination", DOMAIN), ("result", "ok")
    # A message is in the maildir a moment before its delivery is counted.
    wait_for(
        lambda: site.samples().get(("pigeon_deliveries_total", ok)) == 3,
        what="deliveries counted",
    )
    got = site.samples()
    assert got[("pigeon_smtp_sessions_total", ())] - before == 3
    assert got[("pigeon_smtp_transactions_total", ())] == 4
    assert got[("pigeon_messages_accepted_total", ())] == 4
    assert got[("pigeon_smtp_rejected_total", (("command", "RCPT"), ("reason", "550")))] == 1
    assert got[("pigeon_deliveries_total", ok)] == 3
    assert got[("pigeon_delivery_seconds_count", (("agent", "maildir"),))] == 3
    # The soft-failing envelope waits in the queue: the gauges see it at scrape time.
    assert got[("pigeon_queue_envelopes", ())] == 1
    assert got[("pigeon_queue_messages", ())] == 1
    assert got[("pigeon_queue_oldest_age_seconds", ())] >= 0
    assert got[("pigeon_uptime_seconds", ())] > 0


def test_only_metrics_path_is_served(site: Site) -> None:
    assert site.scrape("/")[0] == 404
    assert site.scrape("/metrics?x=1")[0] == 200
