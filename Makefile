PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench bench-gpu soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -n 2 -q --durations=15 tests

lint: install
	$(BIN)/ruff check jaxckpt tests benchmarks examples
	$(BIN)/ruff format --check jaxckpt tests benchmarks examples
	$(BIN)/mypy

demo: install
	$(BIN)/python examples/seed_guide.py

bench: install
	$(BIN)/python benchmarks/bench.py

bench-gpu: install
	$(BIN)/python benchmarks/bench.py --workloads W3

# 100 kill -9 trials and 1,000 manager saves (about 10 minutes); see docs/manager.md
soak: install
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) tf_ckpts tf_list_example bench_out
