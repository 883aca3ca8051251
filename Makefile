# Entry points. `make test` and `make demo` work from a clean clone: they create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast chaos demo demo-simulate bench-paper lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## the whole suite (needs a mosquitto binary and, for the PostgreSQL half of the database tests, a server)
test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## a simulated fleet on this machine: broker, server (SQLite), 10 edge clients, MNIST subset (offline)
demo: $(STAMP)
	rm -rf runs/fleet && mkdir -p runs
	$(BIN)/fedgen fleet --clients 10 --rounds 15 --algorithm fedgen --dataset mnist-subset --alpha 0.1 \
		--seed 0 --workdir runs/fleet --out runs/fleet.json

## the same algorithm in one process (no broker, no server)
demo-simulate: $(STAMP)
	mkdir -p runs
	$(BIN)/fedgen simulate --algorithm fedgen --dataset mnist-subset --samples-per-class 1000 \
		--alpha 0.1 --users 20 --active 10 --rounds 30 --seed 0 --out runs/demo.json --plot runs/demo.png

## only the fault-injection tests (make test runs them too)
chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos

## the paper-table benchmark (MNIST, 39 runs of 200 rounds; needs FEDGEN_DATA_DIR or DATA_DIR)
bench-paper: $(STAMP)
	$(BIN)/python bench/paper_table.py $(if $(DATA_DIR),--data-dir $(DATA_DIR))

lint: $(STAMP)
	$(BIN)/ruff check shared server_api edge_client bench tests migrations

clean:
	rm -rf $(VENV) runs .pytest_cache
