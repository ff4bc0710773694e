"""Memory of the daemon while it receives big messages.

Usage: python bench/bigmessage.py [--size-mb 30] [--clients 4]

Pigeon (delivery paused, so only receiving is measured) takes ``--clients`` messages of
``--size-mb`` at once, over smtplib. Prints the daemon's peak RSS (VmHWM, from /proc) above
its idle RSS, per message and as a multiple of the message size: what each big message in
flight costs a small host. A message held once in memory is 1.0x.
"""

from __future__ import annotations

import argparse
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accept import free_port, wait_port  # noqa: E402 - the accept benchmark's helpers


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    lines = int(args.size_mb * 1024 * 1024 / 78)
    message = ("Subject: big\r\n\r\n" + ("x" * 76 + "\r\n") * lines).encode()
    with tempfile.TemporaryDirectory(prefix="pigeon-bigmsg-") as tmp:
        port = free_port()
        conf = Path(tmp) / "smtpd.conf"
        conf.write_text(
            f"smtp max-message-size {int(args.size_mb) + 10}M\n"
            f"listen on 127.0.0.1 port {port}\n"
            'action "local" mbox\n'
            'match from local for local action "local"\n'
        )
        argv = [sys.executable, "-m", "pigeon", "run", "-d", "-P", "mda", "-f", str(conf)]
        argv += ["--spool", str(Path(tmp) / "spool"), "--relay", "in-process"]
        daemon = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            time.sleep(0.5)
            idle = status_kib(daemon.pid, "VmRSS")

            def send() -> None:
                with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
                    client.sendmail("a@example.org", ["root@localhost"], message)

            started = time.monotonic()
            clients = [threading.Thread(target=send) for _ in range(args.clients)]
            for client in clients:
                client.start()
            for client in clients:
                client.join()
            elapsed = time.monotonic() - started
            peak = status_kib(daemon.pid, "VmHWM")
        finally:
            daemon.terminate()
            daemon.wait(30)
    size_kib = len(message) / 1024
    per_message = (peak - idle) / args.clients
    print(
        f"{args.clients} messages of {len(message) / 1e6:.1f} MB at once, received in "
        f"{elapsed:.2f}s: daemon RSS {idle / 1024:.0f} MiB idle, {peak / 1024:.0f} MiB peak "
        f"= {per_message / 1024:.1f} MiB per message in flight "
        f"= {per_message / size_kib:.2f}x the message size"
    )


if __name__ == "__main__":
    main()
