"""kill -9 while clients stream mail: nothing that got a 250 is lost."""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from collections import Counter

from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

KILLS = 3
MESSAGES = 150
CLIENTS = 3


def test_kill9_during_streaming_loses_no_accepted_message(workdir: Workdir) -> None:
    mail = workdir.mailroot()
    uid, gid = mail_uid_gid()
    users = workdir.path / "users"
    users.write_text(f"eve {uid}:{gid}:{mail / 'eve'}\n")
    port = free_port()
    conf = f"""table users file:{users}
listen on 127.0.0.1 port {port}
action "local" maildir userbase <users>
match from any for local action "local"
"""
    daemon = PigeonDaemon(workdir.path, conf, port=port)
    daemon.start()
    accepted: set[int] = set()
    lock = threading.Lock()
    next_id = iter(range(MESSAGES))
    stop = threading.Event()

    def client() -> None:
        for _ in range(MESSAGES * 20):  # bounded: each message retried a few times at most
            if stop.is_set():
                return
            with lock:
                n = next(next_id, None)
            if n is None:
                return
            for _attempt in range(200):
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                        c.sendmail(
                            "stream@example.org",
                            ["eve@localhost"],
                            f"Subject: crash-{n}\r\nMessage-ID: <crash-{n}@test>\r\n\r\n{n}\r\n",
                        )
                    with lock:
                        accepted.add(n)
                    break
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.05)  # daemon down: the client retries, as MTAs do

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    rng = random.Random(1234)
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.0))
            daemon.kill9()
            time.sleep(0.1)
            daemon.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert len(accepted) == MESSAGES
        maildir = mail / "eve" / "Maildir"

        def delivered() -> Counter[int]:
            seen: Counter[int] = Counter()
            for m in maildir_messages(maildir):
                found = re.search(rb"Subject: crash-(\d+)", m)
                if found:
                    seen[int(found.group(1))] += 1
            return seen

        wait_for(lambda: accepted <= set(delivered()), timeout=120, what="every accepted message")
        daemon.wait_queue_empty(60)
        seen = delivered()
        missing = accepted - set(seen)
        assert not missing
        duplicated = [n for n, count in seen.items() if count > 1]
        # A duplicate is only possible for a delivery cut by a kill (at most the in-flight ones).
        assert len(duplicated) <= KILLS * 64
    finally:
        stop.set()
        daemon.stop()
