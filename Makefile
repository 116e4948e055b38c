# Two commands do everything on a fresh machine:
#   make run    set up, then run the main job end to end through the service (tsptq demo)
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench bench-choices bench-search bench-cluster bench-deploy bench-scale lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/tsptq demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.accuracy --json out/accuracy.json

bench-choices: setup
	$(PY) -m bench.choices --json out/choices.json

bench-search: setup
	$(PY) -m bench.search --json out/search_bench.json

bench-cluster: setup
	$(PY) -m bench.search --cluster --json out/cluster.json

bench-deploy: setup
	$(PY) -m bench.deploy --json out/deploy.json

bench-scale: setup
	$(PY) -m bench.scale --json out/scale.json

lint: setup
	$(VENV)/bin/ruff check .
