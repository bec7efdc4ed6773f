# caduceus: two commands.
#   make run    install and start everything (embedded NATS, SQLite, all seven services, web UI)
#   make test   install the test tools (DCMTK, Orthanc, Chromium, Postgres), then ruff, mypy, pytest
# Variables: PYTHON (interpreter), UP_ARGS (extra `caduceus up` arguments, e.g.
# UP_ARGS="--config deploy/example-config.yaml"), PYTEST_ARGS (e.g. PYTEST_ARGS="-x -k launcher").

# Everything installs into a virtual environment: Debian's own python3 refuses system-wide pip
# installs (PEP 668), and a venv keeps the test run honest about what it installed itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
UP_ARGS ?=
PYTEST_ARGS ?=
# sudo only when not root (CI containers usually are root and have no sudo).
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
APT_PACKAGES := dcmtk orthanc chromium postgresql python3-venv

.PHONY: run test install install-test-deps system-deps lint typecheck pytest

run: install
	$(VENV)/bin/caduceus up $(UP_ARGS)

$(PY):
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -e .

test: install-test-deps lint typecheck pytest

install-test-deps: system-deps $(PY)
	$(PY) -m pip install -e '.[test]'

# apt-get only when a tool is missing, so repeated runs are quick and work offline.
system-deps:
	@if [ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ] && [ -x /usr/bin/echoscu ] \
	    && [ -x /usr/sbin/Orthanc ] && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } \
	    && command -v pg_ctlcluster >/dev/null; then \
	  echo "system test dependencies present"; \
	else \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $(APT_PACKAGES); \
	fi
	@# The tests need a Postgres on 127.0.0.1:5432 (CADUCEUS_TEST_POSTGRES); start the local cluster if it is down.
	@if command -v pg_lsclusters >/dev/null && pg_lsclusters -h | grep -q down; then \
	  pg_lsclusters -h | awk '$$4 == "down" {print $$1, $$2}' | while read -r version name; do \
	    $(SUDO) pg_ctlcluster "$$version" "$$name" start; done; \
	fi

lint:
	$(PY) -m ruff check .

typecheck:
	$(PY) -m mypy

# pytest exits 5 when it collected no tests; make treats every non-zero exit as failure, so an
# empty run fails too. The explicit check makes that intent visible.
pytest:
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	exit $$status
