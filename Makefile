# The commands the README, CI and developers all use. Each does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint typecheck openapi bench bench-augment bench-train bench-attention bench-generate bench-api bench-method bench-scale clean

# torch first, pinned to the local CPU build, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Two xdist workers (each with its own redis-server) and a random order (pytest-randomly prints its seed).
test: $(STAMP)
	$(PY) -m pytest -q -n 2

demo: $(STAMP)
	$(VENV)/bin/miadpo demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy core app

bench: bench-augment bench-train bench-attention bench-generate bench-api bench-scale

bench-augment: $(STAMP)
	$(PY) bench/augment.py

bench-train: $(STAMP)
	$(PY) bench/train.py

bench-attention: $(STAMP)
	$(PY) bench/attention.py

bench-generate: $(STAMP)
	$(PY) bench/generate.py

bench-api: $(STAMP)
	$(PY) bench/api.py

bench-method: $(STAMP)
	$(PY) bench/method.py

bench-scale: $(STAMP)
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

openapi: $(STAMP)
	$(PY) -m app.openapi openapi.yaml
