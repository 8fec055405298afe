# Every target sets up what it needs by itself: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test test-unit test-tools lint bench bench-instructions chart-schema clean

help:
	@echo "make demo   run the bridge against the built-in simulator and an embedded broker"
	@echo "make test   lint, type-check and run every test"
	@echo "make test-unit   the unit tests only (tests/unit: no network, no subprocess), in seconds"
	@echo "make bench  measure throughput, CPU per message and latency"
	@echo "make bench-instructions  count the in-process work in CPU instructions (valgrind), steady on a busy host"
	@echo "make lint   ruff, mypy and the import layers (import-linter)"
	@echo "make chart-schema  regenerate the config part of helm/ime-bridge/values.schema.json from bridge/config.py"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ime-bridge demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check bridge tests bench
	$(BIN)/ruff format --check bridge tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Debian's prometheus package: promtool and the server that tests/component/test_monitoring.py and
# tests/integration/test_monitoring.py run. Installed only where missing and only as root with apt-get;
# elsewhere the tests say what is missing (fail under CI=true).
test-tools:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus package (promtool and the server, for the monitoring tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool or prometheus missing: apt-get install prometheus (the tests fail under CI=true without them)" >&2; \
	  fi; \
	fi

test: lint test-tools
	$(BIN)/pytest -q $(PYTEST_ARGS)

# tests/unit only: no sockets, no subprocesses, no broker (tests/unit/conftest.py fails a test that tries).
test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

# values.schema.json's properties.config from the settings model (tests/unit/test_config_schema.py checks it is current).
chart-schema: $(STAMP)
	$(BIN)/ime-bridge config schema --write helm/ime-bridge/values.schema.json

bench: $(STAMP)
	$(BIN)/python -m bench.pipeline $(BENCH_ARGS)

bench-instructions: $(STAMP)
	$(BIN)/python -m bench.instructions $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .bench *.egg-info
