# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint typecheck unit bench simulate serve clean chaos image-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m demo

lint: install
	$(BIN)/ruff check router experiments demo tests bench
	$(BIN)/ruff format --check router experiments demo tests bench

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -q

test: lint typecheck unit

# Build ./Dockerfile with podman on a base made from Debian packages and smoke-test the container
# (root and apt needed; see .ci/image.sh). Independent of .venv.
image-test:
	bash .ci/image.sh

# Faults under traffic (log database, registry, challenger) for 60 s; needs PostgreSQL
# (ROUTER_TEST_POSTGRES_URL, see tests/pg.py). `make test` runs the same test for 12 s.
chaos: install
	CHAOS_DURATION_S=$${CHAOS_DURATION_S:-60} $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_chaos.py

simulate: install
	$(BIN)/python -m experiments.simulate
	$(BIN)/python -m experiments.simulate_ramp

bench: install
	$(BIN)/python -m bench.run

serve: install
	$(BIN)/python -m router --config config.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-run test-artifacts
