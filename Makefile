# Two commands set everything up on a fresh machine:
#   make run    the pipeline (`vebaq dev`: embedded broker if no Redis is configured)
#   make test   lint + the whole test suite on real parts (Redis, vCenter simulator, fake vROps)
#   make bench  (not part of the tests) the benchmarks: bench/RESULTS.md and bench/results.png
#   make soak   (not part of the tests) the chaos soak: MINUTES=20 of events under kill -9s
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin

.PHONY: install run test lint bench soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,test]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: install
	./scripts/test-deps
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest

run: install
	$(BIN)/vebaq dev

bench: install
	./scripts/test-deps
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench --publish

# The chaos soak (not part of the tests): MINUTES of events with kill -9s of workers and
# producers, a Redis Sentinel failover, a vCenter restart and a vROps outage.
MINUTES ?= 20
soak: install
	./scripts/test-deps
	$(BIN)/python -m bench.soak --minutes $(MINUTES)

clean:
	rm -rf $(VENV) .cache .pytest_cache
