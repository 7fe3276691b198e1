# Two commands: `make run` (train a demo model if none exists, then serve it) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_PATH ?= models/pet_classifier.pt
DEMO_DATA := data/demo
PORT ?= 5000
# make run serves this machine only (Flask's and gunicorn's own default); the image, compose and Kubernetes listen
# on every interface (BIND empty: 0.0.0.0:PORT). BIND=0.0.0.0:5000 make run opens the demo to your network.
RUN_BIND = $(or $(BIND),127.0.0.1:$(PORT))
export MODEL_PATH PORT

# The project's offline machines get a Docker engine from the shared script; elsewhere Docker is assumed.
OFFLINE_DOCKER ?= $(firstword $(wildcard ../shared/tools/offline-docker.sh ../../shared/tools/offline-docker.sh))

.PHONY: run serve test lint model clean container-test soak audit

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .  # the app and models packages, importable from anywhere
	touch $@

run:  # the address checked first (one line if taken), then the model, then serve (in that order, also under -j)
	@$(PYTHON) scripts/check_port.py $(RUN_BIND)
	$(MAKE) --no-print-directory model
	$(MAKE) --no-print-directory serve

model: $(VENV)/.installed
	PYTHON=$(PY) DEMO_DIR=$(DEMO_DATA) sh scripts/ensure_model.sh

serve: $(VENV)/.installed
	BIND=$(RUN_BIND) $(VENV)/bin/gunicorn -c gunicorn.conf.py 'app:create_app()'

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

container-test:  # the real image and compose file, run for real (minutes, ~6 GB); not part of `make test`
	OFFLINE_DOCKER=$(abspath $(OFFLINE_DOCKER)) bash scripts/container_test.sh

soak: model  # 256 clients for 2 minutes, then the reload scenarios (python -m scripts.soak --help)
	$(PY) -m scripts.soak --model $(MODEL_PATH)

# pip-audit lives in its own venv: its dependencies stay out of the pinned project environment.
AUDIT_VENV := .venv-audit
$(AUDIT_VENV)/.installed:
	test -x $(AUDIT_VENV)/bin/python || $(PYTHON) -m venv $(AUDIT_VENV)
	$(AUDIT_VENV)/bin/pip install --quiet pip-audit==2.10.1
	touch $@

# Vulnerability data: pypi = https://pypi.org/pypi/<name>/<version>/json, osv = https://api.osv.dev
AUDIT_SERVICE ?= pypi
audit: $(AUDIT_VENV)/.installed  # known vulnerabilities of the pinned requirements; fails if any pin cannot be checked
	$(AUDIT_VENV)/bin/pip-audit --requirement requirements.txt --no-deps --disable-pip --strict \
		--vulnerability-service $(AUDIT_SERVICE) --progress-spinner off

clean:
	rm -rf $(VENV) $(AUDIT_VENV) .pytest_cache .ruff_cache
