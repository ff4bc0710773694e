"""OpenSMTPD's ``mta delivery`` / ``mda delivery`` log line for one envelope's attempt.

Built by the daemon for local deliveries and by the relay worker for the mail it relays
(as smtpd's mta process logs its own), so the daemon spends nothing on relayed lines.
"""

from __future__ import annotations

import logging
import random

from pigeon.control.views import human_duration
from pigeon.delivery.local import DAEMON_ACCOUNT, daemon_account
from pigeon.queue.envelope import Envelope

__all__ = ["RESULT_WORDS", "delivery_line", "format_delay", "log_delivery"]

RESULT_WORDS = {"ok": "Ok", "tempfail": "TempFail", "permfail": "PermFail", "loop": "Loop"}

mda_log = logging.getLogger("pigeon.mda")
mta_log = logging.getLogger("pigeon.mta")


def format_delay(seconds: float) -> str:
    return human_duration(int(max(0, seconds)))


def delivery_line(
    env: Envelope,
    status: str,
    stat: str,
    now: float,
    *,
    session: str | None = None,
    source: str | None = None,
    relay: str | None = None,
) -> str:
    """``session``: the mta session's id (smtpd's own lines share it); ``source`` and
    ``relay``: the local address and the peer ("ADDRESS (NAME)") of a relayed envelope."""
    # A log correlation id, as smtpd's: it needs no cryptographic strength.
    session = session or f"{random.getrandbits(64):016x}"
    result = RESULT_WORDS[status]
    delay = format_delay(now - env.ctime)
    head = f"{session} {env.type} delivery evpid={env.evpid:016x} from=<{env.sender}> "
    if env.type == "mta":
        # smtpd's mta names the original recipient only when expansion changed it; its
        # mda lines always do.
        rcpt = "<->" if env.rcpt == env.dest else f"<{env.rcpt}>"
        where = ""
        if source is not None:
            where += f'source="{source}" '
        if relay is not None:
            where += f'relay="{relay}" '
        return (
            f'{head}to=<{env.dest}> rcpt={rcpt} {where}delay={delay} result="{result}" '
            f'stat="{stat}"'
        )
    user = env.mda_user or env.dest.rpartition("@")[0]
    if user == DAEMON_ACCOUNT:  # an alias's command or file
        user = daemon_account().name
    return (
        f"{head}to=<{env.dest}> rcpt=<{env.rcpt}> user={user} delay={delay} result={result} "
        f"stat={stat}"
    )


def log_delivery(
    env: Envelope,
    status: str,
    stat: str,
    now: float,
    *,
    session: str | None = None,
    source: str | None = None,
    relay: str | None = None,
) -> bool:
    """Logs the line if its logger keeps INFO; True when it was written."""
    logger = mta_log if env.type == "mta" else mda_log
    if not logger.isEnabledFor(logging.INFO):
        return False
    line = delivery_line(env, status, stat, now, session=session, source=source, relay=relay)
    logger.info(line)  # no arguments: never %-formatted
    return True
