# `make test` and `make bench` work on a fresh machine: they make a virtual environment in .venv
# (unless PYTHON names an interpreter that already has torch, as on a GPU machine) and install
# into it what they need. The CPU machines install the pinned CPU torch from local disk; an
# unpinned torch would pull a multi-GB CUDA build.
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: install test bench bench-pytest clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

install: $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	$(PYTHON) -m pip install -q -e ".[test,bench]"

test: install
	$(PYTHON) -m pytest tests -q -rs

bench: install
	$(PYTHON) -m benchmarks.run

bench-pytest: install
	$(PYTHON) -m pytest benchmarks --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
