"""Started as root, Pigeon runs as an unprivileged user; deliveries run as the recipient."""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

# An account every Debian system has; packaging creates `_pigeon`, which tests must not need.
RUN_AS = "daemon"
FILTER_USER = "nobody"  # a proc filter's own `user`

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")


def _check_readable() -> None:
    """The dropped daemon and delivery children import Pigeon from this checkout."""
    probe = subprocess.run(
        [sys.executable, "-c", "import pigeon.delivery.helper, pigeon.daemon"],
        user=RUN_AS,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    if probe.returncode != 0:
        pytest.skip(
            f"user {RUN_AS} cannot run {sys.executable} with this checkout (make the checkout "
            f"and the venv's interpreter readable by other users): {probe.stderr.strip()}"
        )


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        self.mail_uid = uid
        users = self.work.path / "users"
        users.write_text(
            f"alice {uid}:{gid}:{self.mail / 'alice'}\n"
            f"mdauser {uid}:{gid}:{self.mail}\n"
            f"toor 0:0:{self.mail / 'toor'}\n"
        )
        self.port = free_port()
        self.filtered_port = free_port()
        self.mda_out = self.mail / "mda.out"
        self.filter_log = self.mail / "filter.log"
        self.filter_log.touch()
        self.filter_log.chmod(0o666)  # the filter writes it as nobody, then as the daemon user
        recorder = Path(__file__).parent / "filterbin" / "recorder.py"
        self.pipe_out = self.mail / "pipe.out"
        self.pipe_out.touch()
        self.pipe_out.chmod(0o666)
        (self.work.path / "aliases").write_text(f'lists: "|id -u >> {self.pipe_out}"\n')
        (self.work.path / "virt").write_text(f'@v.privsep.test "|id -u >> {self.pipe_out}"\n')
        self.as_dir = self.mail / "as"
        self.as_dir.mkdir()
        self.as_dir.chmod(0o777)
        config = f"""
table users file:{users}
table aliases file:{self.work.path / "aliases"}
table virt file:{self.work.path / "virt"}
filter rec proc-exec "/usr/bin/python3 {recorder} {self.filter_log}" user {FILTER_USER}
listen on 127.0.0.1 port {self.port} hostname mx.privsep.test
listen on 127.0.0.1 port {self.filtered_port} hostname mx.privsep.test filter rec
action "local" maildir userbase <users>
action "mda" mda "id -u > {self.mda_out}; cat >> {self.mda_out}" userbase <users>
action "lists" maildir userbase <users> alias <aliases>
action "virt" maildir userbase <users> virtual <virt>
action "as" maildir "{self.as_dir}/%{{user.username}}" userbase <users> user {RUN_AS}
match from any for rcpt-to "mdauser@mx.privsep.test" action "mda"
match from any for rcpt-to "lists@mx.privsep.test" action "lists"
match from any for domain "v.privsep.test" action "virt"
match from any for domain "as.privsep.test" action "as"
match from any for domain "mx.privsep.test" action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port, extra=["--user", RUN_AS])
        self.user = pwd.getpwnam(RUN_AS)

    def send(self, rcpt: str, body: str = "Subject: privsep\r\n\r\nhello\r\n") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.sendmail("sender@example.org", [rcpt], body)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    _check_readable()
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def _status_ids(pid: int, field: str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no {field} for {pid}")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_daemon_runs_as_the_unprivileged_user(site: Site) -> None:
    assert site.daemon.proc is not None
    pid = site.daemon.proc.pid
    assert _status_ids(pid, "Uid") == [site.user.pw_uid] * 4
    assert _status_ids(pid, "Gid") == [site.user.pw_gid] * 4
    assert _status_ids(pid, "Groups") in ([site.user.pw_gid], [])
    assert f"running as {RUN_AS}" in site.daemon.log()


def test_only_the_helper_keeps_root(site: Site) -> None:
    assert site.daemon.proc is not None
    children = _children(site.daemon.proc.pid)
    root_children = [c for c in children if _status_ids(c, "Uid")[0] == 0]
    assert len(root_children) == 1, children


def test_queue_files_belong_to_the_daemon_user(site: Site) -> None:
    site.send("alice@mx.privsep.test")
    wait_for(lambda: maildir_messages(site.mail / "alice" / "Maildir"), what="delivery")
    owners = {}
    for root, dirs, files in os.walk(site.daemon.spool):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            owners[path] = os.lstat(path).st_uid
    owners[str(site.daemon.spool)] = os.lstat(site.daemon.spool).st_uid
    assert any(p.endswith(".log") or "/queue/" in p for p in owners), owners
    assert set(owners.values()) == {site.user.pw_uid}, owners


def test_mailbox_files_belong_to_the_recipient(site: Site) -> None:
    site.send("alice@mx.privsep.test", "Subject: owner\r\n\r\nmine\r\n")
    maildir = site.mail / "alice" / "Maildir"
    wait_for(lambda: len(maildir_messages(maildir)) >= 2, what="second delivery")
    for path in (maildir, *(maildir / "new").iterdir()):
        assert path.stat().st_uid == site.mail_uid, path


def test_mda_runs_as_the_recipient(site: Site) -> None:
    site.send("mdauser@mx.privsep.test", "Subject: mda\r\n\r\npiped\r\n")
    wait_for(lambda: site.mda_out.exists() and b"piped" in site.mda_out.read_bytes(), what="mda")
    assert site.mda_out.read_text().splitlines()[0] == str(site.mail_uid)
    assert site.mda_out.stat().st_uid == site.mail_uid


def test_no_delivery_as_root(site: Site) -> None:
    site.send("toor@mx.privsep.test")
    wait_for(lambda: "not allowed to deliver to: toor" in site.daemon.log(), what="refusal")
    assert not (site.mail / "toor").exists()


def test_an_alias_command_runs_as_the_daemon_account_not_as_the_alias_or_recipient(
    site: Site,
) -> None:
    """smtpd runs an alias's |command as its own user: Pigeon as the account it dropped to.
    Before, `lists: |cmd` looked for a `lists` account (mailing lists bounced), and a
    catch-all `@domain |cmd` ran as whichever user the sender named."""
    site.send("lists@mx.privsep.test")
    site.send("alice@v.privsep.test")
    wait_for(lambda: len(site.pipe_out.read_text().split()) >= 2, timeout=20, what="two pipe runs")
    assert site.pipe_out.read_text().split() == [str(site.user.pw_uid)] * 2
    assert site.user.pw_uid != site.mail_uid  # alice's uid would have been the mail uid


def test_user_option_gives_the_uid_and_the_recipient_keeps_its_mailbox(site: Site) -> None:
    """`maildir ".../%{user.username}" user daemon`: each recipient its own maildir, the
    files written as `daemon` (before, every user's mail went to .../daemon)."""
    site.send("alice@as.privsep.test")
    site.send("mdauser@as.privsep.test")
    for name in ("alice", "mdauser"):
        wait_for(lambda n=name: maildir_messages(site.as_dir / n), what=f"{name}'s maildir")
        [path] = list((site.as_dir / name / "new").iterdir())
        assert path.stat().st_uid == site.user.pw_uid
    assert not (site.as_dir / RUN_AS).exists()
    with pytest.raises(smtplib.SMTPRecipientsRefused):  # not a user: 550, as in smtpd
        site.send("nosuchuser@as.privsep.test")


def _filters(site: Site) -> list[int]:
    """The recorder filter's processes: the daemon's children, or the helper's (restarts)."""
    assert site.daemon.proc is not None
    found = []
    for child in _children(site.daemon.proc.pid):
        for pid in (child, *_children(child)):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
            except OSError:
                continue
            if "recorder.py" in cmdline and _state(pid) != "Z":
                found.append(pid)
    return found


def _delivered_through_the_filter(site: Site) -> bool:
    # until its handshake is done, the listener answers 421 (the filter is restarting)
    try:
        with smtplib.SMTP("127.0.0.1", site.filtered_port, timeout=10) as client:
            client.sendmail(
                "sender@example.org", ["alice@mx.privsep.test"], "Subject: f\r\n\r\nx\r\n"
            )
    except smtplib.SMTPConnectError as exc:
        assert exc.smtp_code == 421, exc
        return False
    return True


def test_a_filter_restarted_after_the_drop_runs_as_its_user(site: Site) -> None:
    """Started as root, the filter runs as its `user`; killed after the daemon dropped to
    its own user, it comes back as its `user` still, started by the root helper (the
    configuration named it at start), and the filtered listener keeps taking mail."""
    nobody = pwd.getpwnam(FILTER_USER).pw_uid
    wait_for(lambda: len(_filters(site)) == 1, what="the filter process (one)")
    [first] = _filters(site)
    assert _status_ids(first, "Uid")[0] == nobody
    os.kill(first, signal.SIGKILL)
    wait_for(
        lambda: len(_filters(site)) == 1 and _filters(site) != [first],
        timeout=30,
        what="the restarted filter",
    )
    [second] = _filters(site)
    assert _status_ids(second, "Uid")[0] == nobody
    log = site.daemon.log()
    assert f"as {FILTER_USER} by the privileged helper" in log
    assert "without its user" not in log
    wait_for(lambda: _delivered_through_the_filter(site), what="the filtered listener")
    lines = site.filter_log.read_text().splitlines()
    assert any("alice@mx.privsep.test" in line for line in lines), lines[-5:]


def test_a_killed_helper_started_filter_is_replaced_and_reaped(site: Site) -> None:
    """The daemon cannot signal a process of another user: it asks the helper, which also
    reaps it (no zombie is left behind)."""
    wait_for(lambda: len(_filters(site)) == 1, what="the filter process (one)")
    [current] = _filters(site)
    os.kill(current, signal.SIGKILL)
    wait_for(
        lambda: len(_filters(site)) == 1 and _filters(site) != [current],
        timeout=30,
        what="another restart",
    )
    wait_for(lambda: _state(current) == "gone", timeout=10, what="the old filter reaped")
    wait_for(lambda: _delivered_through_the_filter(site), what="the filtered listener")


def test_reload_runs_as_the_daemon_user_and_the_filter_as_its_own(site: Site) -> None:
    before = _filters(site)
    result = site.daemon.ctl("reload")
    assert "reloaded" in result.stdout
    assert site.daemon.proc is not None
    assert _status_ids(site.daemon.proc.pid, "Uid")[0] == site.user.pw_uid
    wait_for(
        lambda: [p for p in _filters(site) if p not in before],
        timeout=30,
        what="the reload's filter",
    )
    new = [p for p in _filters(site) if p not in before]
    assert [_status_ids(p, "Uid")[0] for p in new] == [pwd.getpwnam(FILTER_USER).pw_uid]
    wait_for(lambda: _delivered_through_the_filter(site), what="the filtered listener")


def test_a_filter_a_reload_adds_runs_as_its_user(site: Site) -> None:
    """The helper reads the configuration file again at a reload: a filter added then is
    started as its `user` too (the daemon alone could not)."""
    recorder = Path(__file__).parent / "filterbin" / "recorder.py"
    second_log = site.mail / "filter2.log"
    second_log.touch()
    second_log.chmod(0o666)
    original = site.daemon.conf.read_text()
    added = (
        f'filter rec2 proc-exec "/usr/bin/python3 {recorder} {second_log}" user {FILTER_USER}\n'
        f"listen on 127.0.0.1 port {free_port()} hostname mx2.privsep.test filter rec2\n"
    )
    site.daemon.conf.write_text(added + original)
    try:
        assert "reloaded" in site.daemon.ctl("reload").stdout
        wait_for(lambda: "config|ready" in second_log.read_text(), what="the new filter")
        assert site.daemon.proc is not None
        pids = [
            pid
            for child in _children(site.daemon.proc.pid)
            for pid in (child, *_children(child))
            if str(second_log) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
            and _state(pid) != "Z"
        ]
        assert [_status_ids(pid, "Uid")[0] for pid in pids] == [pwd.getpwnam(FILTER_USER).pw_uid]
        assert "runs as daemon without its user" not in site.daemon.log()
    finally:
        site.daemon.conf.write_text(original)
        assert "reloaded" in site.daemon.ctl("reload").stdout


def test_helper_exits_when_the_daemon_dies(site: Site) -> None:
    assert site.daemon.proc is not None
    pid = site.daemon.proc.pid
    helpers = _children(pid)
    assert helpers
    os.kill(pid, signal.SIGKILL)
    site.daemon.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_state(h) not in ("gone", "Z") for h in helpers):
        time.sleep(0.05)
    alive = [h for h in helpers if _state(h) not in ("gone", "Z")]
    assert not alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
