# tether: `make run` serves on http://localhost:4011; `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cksum < pyproject.toml | cut -d' ' -f1)
# One stamp per install, named after pyproject.toml's checksum: `run` installs the
# package alone; `test` adds the dev and bench extras, which satisfies `run` too.
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)
PYTEST_ARGS ?=

.PHONY: run test test-uvloop test-asyncio lint typecheck system-deps bench clean

# bin/pip, not bin/python: a venv that failed half-way (Debian's python3 without
# python3-venv) has a python but no pip, and is removed so the next run retries.
$(BIN)/pip:
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed; on Debian install python3-venv (scripts/system-deps.sh does)" >&2; \
	  exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.installed-run-*
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.installed-*
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/tether serve

system-deps:
	./scripts/system-deps.sh

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench examples

typecheck: $(DEV_STAMP)
	$(BIN)/mypy --strict src

# system-deps first: on a fresh Debian machine it brings python3-venv for the venv.
# The whole suite on each event loop (EVENT_LOOP), both at once: the suite mostly waits
# (a third of one core), so two take about as long as one. Each pass's output is printed
# when it ends; `make test` fails if either fails. Their `slow` tests take turns
# (tests/conftest.py). Coverage is measured on uvloop, the default loop.
test: system-deps lint typecheck
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-uvloop test-asyncio

test-uvloop: $(DEV_STAMP)
	EVENT_LOOP=uvloop $(BIN)/python -m pytest --cov=tether --cov-report=term --cov-report=xml:test-output/coverage.xml $(PYTEST_ARGS)

test-asyncio: $(DEV_STAMP)
	EVENT_LOOP=asyncio $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: system-deps $(DEV_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) test-output .pytest_cache .mypy_cache .ruff_cache
