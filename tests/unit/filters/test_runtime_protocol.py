"""Which filter protocol a proc gets when its line does not say."""

from __future__ import annotations

from pigeon.config import parse_config_text
from pigeon.filters.runtime import FilterManager, default_protocol
from pigeon.protocol import filterproto


def test_debians_filters_get_0_6_the_rest_0_7() -> None:
    assert default_protocol("filter-rspamd") == "0.6"  # looked up in /usr/libexec/opensmtpd
    assert default_protocol("/usr/libexec/opensmtpd/filter-dkimsign -d x -s y") == "0.6"
    assert default_protocol("/usr/local/libexec/smtpd/filter-rspamd") == "0.7"
    assert default_protocol("/usr/bin/python3 /opt/my-filter.py") == "0.7"


def test_the_protocol_option_wins() -> None:
    config = parse_config_text(
        'filter a proc-exec "filter-rspamd"\n'
        'filter b proc-exec "filter-rspamd" protocol "0.7"\n'
        'filter c proc-exec "/opt/f" protocol "0.6"\n'
        'filter d proc-exec "/opt/f"\n'
        "listen on lo filter { a, b, c, d }\n"
        'action "l" maildir\nmatch from any for any action "l"\n',
        check_files=False,
    )
    manager = FilterManager(config, lambda _ref: None, admd="x")  # type: ignore[arg-type,return-value]
    versions = {name: proc.version for name, proc in manager.procs.items()}
    assert versions == {
        "a": filterproto.parse_version("0.6"),
        "b": filterproto.parse_version("0.7"),
        "c": filterproto.parse_version("0.6"),
        "d": filterproto.parse_version("0.7"),
    }
