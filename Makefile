# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run    installs into .venv (torch first) and runs the main job (optprof compare) on the demo model
#   make test   installs into .venv, then ruff, mypy and every test tier (what CI runs)
# For the edit loop: make test-fast (ruff and the unit tier only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0  # a CPU build on local disk; installed first so no dependency pulls another torch
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast check lint typecheck bench sweep families clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bnb,apollo,lomo]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/optprof compare --plot compare.png
	@echo "the figures: compare.png (optprof compare -f html --output compare.html: a page with tables and figures)"

JOBS ?= 2  # pytest workers (pytest-xdist): the machine's two cores
DIST ?= worksteal  # an idle worker takes tests from the other: no file left running alone at the end

test: install lint typecheck
	$(BIN)/python -m pytest -q -n $(JOBS) --dist $(DIST)

test-fast: install lint
	$(BIN)/python -m pytest -q -n $(JOBS) --dist $(DIST) tests/unit

sweep: install  # every causal LM type transformers ships, through state-size, predict and compare (12-18 min on 2 cores)
	$(BIN)/python tests/benchmarks/sweep_causal_lms.py --jobs $(JOBS) --out sweep.json

families: install  # every family through every command and its layer-periodic trace, and the slower variants
	OPTPROF_ALL_FAMILIES=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist $(DIST) \
		tests/integration/test_architectures.py tests/integration/test_periodic_trace.py \
		tests/integration/test_layer_copies.py tests/integration/test_periodic_predict.py \
		tests/integration/test_shared_setups.py tests/integration/test_interrupts.py \
		tests/integration/test_shared_step.py::test_every_registered_optimizer_shares_one_forward_and_backward_to_the_byte \
		tests/integration/test_predict_against_measured.py::test_parameters_without_a_gradient_get_no_state_in_any_command

check: install
	$(BIN)/optprof check profiles/ --junit check-results.xml

lint: install
	$(BIN)/ruff check optprof tests

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python tests/benchmarks/bench_state_size.py
	$(BIN)/python tests/benchmarks/bench_compare.py
	$(BIN)/python tests/benchmarks/bench_predict.py
	$(BIN)/python tests/benchmarks/bench_time_model.py
	$(BIN)/python tests/benchmarks/bench_time_h200.py
	$(BIN)/python tests/benchmarks/bench_memory_h200.py
	$(BIN)/python tests/benchmarks/bench_plan.py
	$(BIN)/python tests/benchmarks/bench_tune.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
