# Pigeon: `make run` runs the daemon on its default config, `make test` runs the tests.
# Both create the virtualenv from Debian's /usr/bin/python3 (readable by every user, so a
# root-started daemon can run delivery helpers as other users).

PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
SPOOL  ?= $(CURDIR)/pigeon-spool

# Debian packages the tests use (real clients and servers).
TEST_DEBS := swaks python3-venv rspamd opensmtpd opensmtpd-filter-rspamd opensmtpd-filter-senderscore opensmtpd-filter-dkimsign redis-server postgresql dovecot-core dovecot-lmtpd opensmtpd-extras

.PHONY: run test venv test-deps lint bench clean install-service

$(BIN)/pigeon: pyproject.toml
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/pigeon

run: venv
	$(BIN)/pigeon run -d --spool $(SPOOL)

test-deps:
	@if [ "$$(id -u)" = "0" ]; then \
		missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else echo "not root: skipping apt-get (need: $(TEST_DEBS))"; fi

test: test-deps venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# As root, after `pip install .`: the _pigeon user, spool, /etc/pigeon/smtpd.conf, systemd unit.
install-service:
	packaging/install.sh

bench: venv
	$(BIN)/python bench/accept.py
	$(BIN)/python bench/relay.py

clean:
	rm -rf $(VENV) pigeon-spool .pytest_cache .mypy_cache .ruff_cache
