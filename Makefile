# The two commands of the README: `make dev` runs the whole system, `make test` runs the tests.
# Both set up a fresh machine first (scripts/setup: system packages, .venv, the project).
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup dev test lint bench clean

$(STAMP): pyproject.toml scripts/setup
	./scripts/setup
	touch $(STAMP)

setup: $(STAMP)

dev: $(STAMP)
	$(BIN)/ioc dev

# Two pytest processes, a test file each at a time: most integration tests wait on real services,
# so two share the 2 cores well (14 min serially, about half that so; docs/performance.md).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy ioc alerts streams simulators reports api entrypoints bench

# The performance harness (docs/performance.md): a table on stdout, the figures in artifacts/bench-*.json.
bench: $(STAMP)
	$(BIN)/ioc bench

clean:
	rm -rf $(VENV) .pytest_cache artifacts
