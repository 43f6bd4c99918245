# The two commands that matter: `make dev` runs the whole system, `make test` runs the tests.
# Both create the virtual environment and install everything on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: dev test test-slow lint install migrate-up migrate-down migrate-create clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the API, scheduler and workers (and PostgreSQL / NATS unless DATABASE_URL / NATS_URL are set).
dev: $(STAMP)
	$(BIN)/orchestrix dev

## promtool, for the checks of deploy/observability/alerts.yml (from Debian's package).
$(BIN)/promtool: | $(STAMP)
	sh deploy/observability/get-promtool $@

## Run the test suite against real servers (TEST_DATABASE_URL / TEST_NATS_URL, or embedded ones).
test: $(STAMP) $(BIN)/promtool
	$(BIN)/pytest

## Soak and benchmark runs, on demand.
test-slow: $(STAMP)
	$(BIN)/pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

migrate-up: $(STAMP)
	$(BIN)/orchestrix migrate up

migrate-down: $(STAMP)
	$(BIN)/orchestrix migrate down

migrate-create: $(STAMP)
	@test -n "$(name)" || { echo "usage: make migrate-create name=add_priority_column"; exit 2; }
	$(BIN)/orchestrix migrate create $(name)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The chaos suite: SIGKILL and SIGTERM workers, SIGKILL schedulers, restart NATS and
## PostgreSQL, cut and slow PostgreSQL while jobs run, then check that nothing was lost,
## FAILED by a shutdown or run twice at once (the short and the long run); and cron
## exactly once while schedulers are SIGKILLed (tests/e2e/test_cron.py).
.PHONY: chaos
chaos: $(STAMP)
	$(BIN)/pytest tests/chaos tests/e2e/test_cron.py -m chaos -s

## The benchmark (code under bench/): starts its own PostgreSQL and NATS, runs the real
## services, prints a table and writes bench/results/latest.json (see docs/performance.md).
## Pass flags with ARGS, e.g. `make bench ARGS=--quick` or `make bench ARGS="--only drain"`.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)
