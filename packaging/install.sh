#!/bin/sh
# Install Pigeon as a system service: user, spool, sample config (kept if present), unit.
# Run from the repository after `pip install .` (or `pip install pigeon`) as root.
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
PIGEON="$(command -v pigeon || true)"
if [ -z "$PIGEON" ]; then
    echo "install.sh: no pigeon command in PATH: pip install pigeon first" >&2
    exit 1
fi
"$HERE/pigeon-create-user"
if [ ! -e /etc/pigeon/smtpd.conf ]; then
    install -m 0644 "$HERE/smtpd.conf" /etc/pigeon/smtpd.conf
fi
"$PIGEON" check -f /etc/pigeon/smtpd.conf
sed "s#/usr/local/bin/pigeon#$PIGEON#g" "$HERE/pigeon.service" > /etc/systemd/system/pigeon.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "installed: systemctl enable --now pigeon"
fi
