# Set-up and entry points. `make run` and `make test` create .venv and install first.
# TORCH_SPEC: on this CPU machine pip takes the pinned CPU wheel from the local wheel dir;
# on a GPU host the same pin from PyPI is the CUDA build (see README "Installing torch").
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast test-container lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pipeserve local --http-port 8000

# everything but the container-image test (CI runs that one too: make test-container)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 -q -m "not container" --durations=25

# builds deploy/docker/Dockerfile and runs the cluster in a real engine (needs DOCKER_HOST or
# root with dockerd + mmdebstrap; skips with the reason otherwise); .ci/run starts the engine
test-container: $(STAMP)
	$(PY) -m pytest -q -m container -rs

# the fast tier for working: unit tests only (no test that starts processes or a cluster)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 -q -m "not slow and not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m bench.bench_core
	$(PY) -m bench.bench_balance
	$(PY) -m bench.bench_generate
	$(PY) -m bench.bench_decode
	$(PY) -m bench.bench_alternation
	$(PY) -m bench.bench_grpc
	$(PY) -m bench.bench_gateway
	$(PY) -m bench.bench_reliability
	$(PY) -m bench.bench_scale
	$(PY) -m bench.report

clean:
	rm -rf $(VENV) .pipeserve-cache
