# The two commands of the README do all the set-up on a fresh machine.
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model demo test test-unit test-integration lint clean

setup:
	@VENV=$(VENV) bash scripts/setup.sh

model: setup
	@$(BIN)/rlaif models build-tiny

demo: model
	$(BIN)/rlaif demo

test: model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests/unit tests/integration -q

test-unit: setup
	$(BIN)/python -m pytest tests/unit -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf rlaif-data .pytest_cache
