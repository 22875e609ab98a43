# The two set-up commands: `make demo` runs the demo job, `make test` runs the test suite.
# Both create .venv on first use (torch's CPU wheel goes in first, so nothing pulls CUDA packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
export RAY_AUTH_MODE ?= disabled
export RAY_TMPDIR ?= /tmp/specray-ray
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	rm -rf demo-data
	$(PY) -m pipeline demo-data demo-data --num-samples 64
	$(PY) -m pipeline run configs/demo.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=8 tests
