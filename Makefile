# crossrec: `make run` runs the main job, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/crossrec simulate $(ARGS)

# two workers: the deployment and simulation tests mostly wait on processes, so the other tests run beside
# them; a module is one unit of work (its shared federation or service starts once), slowest first (conftest);
# one torch thread per process: the two workers and their processes already fill the cores
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

# the edit-test loop: unit tests only (no Flower runs, no real MiniLM, no services, no public data)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not deployment and not serving and not realdata" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
