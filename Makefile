# AITBC — the user's entry points. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/aitbc/v1/*.proto)
PROTO_STAMP := aitbc/v1/.generated
export PYTHONPATH := $(CURDIR)

.PHONY: install protos run test bench e2e soak lint clean certs gpu-wheels gpu-check

install: $(STAMP)

# Re-installs only when the pins change, so a second `make install` is instant.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) $(STAMP)
	rm -rf aitbc/v1 && mkdir -p aitbc/v1
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--mypy_out=. --mypy_grpc_out=. \
		$(PROTO_SRC)
	touch aitbc/v1/__init__.py $@

run: install protos
	$(PY) -m aitbc.devnet

# Tests side by side: most of a real-process test is waiting (on leases,
# outages, process starts), about a third of a core each on this kind of
# machine, so four share two cores well. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 4
test: install protos
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

# `make bench e2e` runs only the coordinator's end-to-end bench (bench/e2e.py,
# ~20 minutes); QUICK=1 makes it a short run that only prints its table.
bench: install protos
	$(PY) -m bench $(filter e2e,$(MAKECMDGOALS)) $(if $(QUICK),--quick)

# A goal only so that `make bench e2e` parses; the work is bench's.
e2e:
	@:

# Minutes of load with miners killed, against bounds on the coordinator's
# memory, open files and disk (bench/soak.py); never part of `make test`.
soak: install protos
	$(PY) -m bench.soak

lint: install protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint protos

clean:
	rm -rf aitbc/v1 var .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

# A development CA and one node certificate (server and client) in var/certs.
certs: install
	$(PY) -m aitbc.certs var/certs

# For a GPU host without PyPI (an NVIDIA PyTorch image): here, the wheels it
# lacks into .whl/; there, `make gpu-check` installs them with --no-index and
# runs pytest -m gpu and the end-to-end GPU run. See BENCHMARKS.md.
gpu-wheels:
	$(PYTHON) bench/gpu_wheels.py

# No install or protos prerequisite: the GPU host has no venv and no PyPI.
gpu-check:
	bash bench/gpu_check.sh
