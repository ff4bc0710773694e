"""The add-on process supervisor shared by filters and proc tables."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shlex

import pytest

from pigeon import privsep
from pigeon.procs import (
    Channel,
    ProcCommand,
    ProcessSpec,
    ProcessSupervisor,
    child_credentials,
    full_command,
    lost_root_note,
)

# Answers "hello" with "ready", says something on stderr, then exits at the next line.
SNIPPET = 'read greeting; echo ready; echo "about to go" >&2; read next; exit 3'
SCRIPT = f"/bin/sh -c {shlex.quote(SNIPPET)}"


def test_filter_commands_run_as_smtpd_runs_them() -> None:
    assert full_command("filter-rspamd -x") == "/usr/libexec/opensmtpd/filter-rspamd -x"
    assert full_command(" /usr/bin/f") == "/usr/bin/f"
    shell = ProcCommand.shell("filter-x")
    assert shell.argv == ("/bin/sh", "-c", "exec /usr/libexec/opensmtpd/filter-x")
    assert ProcessSpec("t", ProcCommand(("t", "c"), "/bin/table")).program.argv == ("t", "c")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches users")
def test_credentials_as_root_without_a_privsep_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(privsep, "_run_as", None)
    nobody = pwd.getpwnam("nobody")
    assert child_credentials(None, None) == (nobody.pw_uid, nobody.pw_gid)  # filters
    assert child_credentials(None, None, fallback=None) is None  # tables stay as they were


@pytest.mark.parametrize("socketpair", [False, True])
def test_exit_restarts_with_backoff_and_stderr_is_logged(
    socketpair: bool, caplog: pytest.LogCaptureFixture
) -> None:
    downs: list[str] = []

    async def handshake(channel: Channel) -> None:
        channel.write_line("hello")
        await channel.writer.drain()
        assert await channel.read_line() == "ready"

    async def scenario() -> None:
        spec = ProcessSpec("demo", SCRIPT, socketpair=socketpair, fallback_user=None)
        sup = ProcessSupervisor(
            spec,
            handshake=handshake,
            on_line=lambda _: None,
            on_down=downs.append,
            backoff_initial=0.05,
            logger=logging.getLogger("pigeon.test"),
        )
        try:
            assert await sup.start()
            assert sup.write_line("bye")
            for _ in range(100):
                if sup.restarts == 1 and sup.ready.is_set():
                    break
                await asyncio.sleep(0.02)
            assert sup.restarts == 1 and sup.generation == 2
        finally:
            await sup.stop()

    with caplog.at_level(logging.INFO, logger="pigeon.test"):
        asyncio.run(scenario())
    assert downs[0] == "exited (status 3)"
    assert "warn: demo: about to go" in caplog.text


def test_a_restart_after_the_drop_says_what_it_cannot_honour() -> None:
    """Started as root, the daemon dropped to its user: an add-on restarted now runs as
    that user, and the log says which of its settings it had to go without."""
    spec = ProcessSpec("dkim", "filter-dkimsign", user="_dkim", chroot="/var/empty")
    privsep.set_run_as(privsep.RunAs("_pigeon", 1001, 1001, "/"))
    try:
        note = lost_root_note(spec, euid=1001)
        assert note is not None
        assert "runs as _pigeon without its user _dkim and chroot /var/empty" in note
        assert lost_root_note(spec, euid=0) is None  # still root: honoured
        assert lost_root_note(ProcessSpec("plain", "x"), euid=1001) is None
        assert lost_root_note(ProcessSpec("same", "x", user="_pigeon"), euid=1001) is None
    finally:
        privsep.set_run_as(None)
    assert lost_root_note(spec, euid=1001) is None  # never root: nothing was promised
