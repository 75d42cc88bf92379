# The commands the README, CI and developers all use. Each does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint typecheck openapi screenshots bench bench-augment bench-train bench-attention bench-generate bench-api bench-method bench-scale bench-viewer clean

# torch first, pinned to the local CPU build, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Two xdist workers (each with its own redis-server) and a random order (pytest-randomly prints its seed);
# each file's tests run on one worker (loadfile), so a module's stack or model fixture is built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

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

bench-viewer: $(STAMP)
	$(PY) bench/viewer.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

# README screenshots of the viewer (docs/screenshots/*.png), from a real stack in headless Chromium; not part
# of `make test`, which leaves the tree as it found it.
screenshots: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/ui/screenshots.py

openapi: $(STAMP)
	$(PY) -m app.openapi openapi.yaml
