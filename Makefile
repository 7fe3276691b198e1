# Two commands: `make run` (train a demo model if none exists, then serve it) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_PATH ?= models/pet_classifier.pt
DEMO_DATA := data/demo
PORT ?= 5000
export MODEL_PATH PORT

.PHONY: run serve test lint demo-data model clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed model serve

demo-data: $(VENV)/.installed
	test -d $(DEMO_DATA)/train || $(PY) scripts/make_demo_data.py --out $(DEMO_DATA)

model: $(VENV)/.installed
	@if [ -f "$(MODEL_PATH)" ]; then echo "using existing bundle $(MODEL_PATH)"; \
	else $(MAKE) --no-print-directory demo-data && $(PY) scripts/train.py --demo --data-dir $(DEMO_DATA) --output $(MODEL_PATH); fi

serve: $(VENV)/.installed
	$(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
