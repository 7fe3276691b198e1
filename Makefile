# Two commands: `make run` (train a demo model if none exists, then serve it) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_PATH ?= models/pet_classifier.pt
DEMO_DATA := data/demo
PORT ?= 5000
export MODEL_PATH PORT

.PHONY: run serve test lint model clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .  # the app and models packages, importable from anywhere
	touch $@

run: model  # then serve, strictly after the model exists (also under make -j)
	$(MAKE) --no-print-directory serve

model: $(VENV)/.installed
	PYTHON=$(PY) DEMO_DIR=$(DEMO_DATA) sh scripts/ensure_model.sh

serve: $(VENV)/.installed
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
