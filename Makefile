# Entry points. `make test` and `make demo` work from a clean clone: they create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast chaos demo demo-simulate bench-paper test-arm64 dashboard-shot compose-test lint clean

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

## the edge client on arm64 under qemu-user emulation: builds an arm64 Debian root (mmdebstrap), installs
## .[edge-lite] (and .[edge], torch) from aarch64 wheels in it, runs a 2-round FedGen job against a broker and
## server here; writes bench/results/arm64.md. Needs root (or sudo) and network: 14.8 min from nothing on a
## 2-core x86_64 (5.5 of them without torch: ARM64_TORCH=0; torch's aarch64 wheels are 2.8 GB).
## ARM64_WORK (default /var/tmp/fedgen-arm64) keeps the root file system between runs; ARM64_FRESH=1 rebuilds.
test-arm64: $(STAMP)
	PYTHON=$(abspath $(BIN)/python) bench/arm64/test-arm64.sh

## a short fleet and a full-page screenshot of its dashboard (needs chromium and chromium-driver from Debian)
dashboard-shot: $(STAMP)
	$(BIN)/python bench/dashboard_shot.py docs/dashboard.png

## compose.yaml really run with no image registry: local Debian base image (mmdebstrap), images built from host
## wheels, docker-compose up --scale edge=12, the demo job checked through the REST API, then torn down (needs root,
## docker.io, docker-compose, mmdebstrap)
compose-test: $(STAMP)
	$(BIN)/python docker/local/compose_test.py

lint: $(STAMP)
	$(BIN)/ruff check shared server_api edge_client bench tests migrations docker

clean:
	rm -rf $(VENV) runs .pytest_cache
