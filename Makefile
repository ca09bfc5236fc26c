PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint docs demo bench bench-gpu soak dist clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench,docs]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -n 2 -q --durations=15 tests

lint: install
	$(BIN)/ruff check jaxckpt tests benchmarks examples colab
	$(BIN)/ruff format --check jaxckpt tests benchmarks examples
	$(BIN)/mypy

# The site in docs/_build/html: the pages, the API reference, the notebooks executed.
docs: install
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

demo: install
	$(BIN)/python examples/seed_guide.py

dist: install
	$(BIN)/python -m build --outdir dist

bench: install
	$(BIN)/python benchmarks/bench.py --workloads W1,W2,W4,W5,W6,ST

bench-gpu: install
	$(BIN)/python benchmarks/bench.py --workloads W3

# 100 kill -9 trials and 1,000 manager saves (about 10 minutes); see docs/manager.md
soak: install
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) tf_ckpts tf_list_example bench_out dist build docs/_build docs/notebooks
