# sem-cls: `make demo` trains on built-in data; `make test` runs the tests. All set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Rebuilt when requirements change: the stamp is older than them.
STAMP := $(VENV)/.installed-requirements

.DEFAULT_GOAL := help
.PHONY: help venv demo train audit download test test-fast lint format ui server serve-model app bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c requirements.lock
	touch $@

venv: $(STAMP)  ## create or update .venv from requirements.txt

demo: $(STAMP)  ## train and test on the built-in SEM-like data, tracked in MLflow
	$(PY) train.py experiment=demo

train: $(STAMP)  ## train with the default config (InceptionV3 on data/nffa); ARGS="..." for overrides
	$(PY) train.py $(ARGS)

audit: $(STAMP)  ## audit a data folder: likely label errors, conflicts, outliers, scale (ARGS="data.data_dir=...")
	$(PY) -m sem_cls.audit $(ARGS)

VARIANT ?= nffa
download: $(STAMP)  ## fetch the real NFFA-Europe images: VARIANT=nffa (default), nffa_majority, nffa_2017
	$(PY) -m sem_cls.data.download download=$(VARIANT)

# The browser the demo page's test drives (tests/test_app.py): Debian's chromium, installed
# once where it is missing (CI runs as root).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update && apt-get install -y chromium

# Two test processes, a test file each at a time (its fixtures built once): most tests spend much
# of their time waiting on a subprocess, a server or Ray, which the other process fills.
PYTEST := $(PY) -m pytest -n 2 --dist loadfile

test: $(STAMP) $(CHROMIUM)  ## lint, the import layers, then the test suite
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PYTEST)

test-fast: $(STAMP) $(CHROMIUM)  ## lint, the import layers, then the tests not marked slow (no training subprocesses, DDP, sweeps)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PYTEST) -m "not slow"

lint: $(STAMP)  ## ruff lint and format check, the import layers (pyproject.toml)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

format: $(STAMP)  ## ruff format and autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

ui: $(STAMP)  ## the MLflow UI for this project's runs, on http://127.0.0.1:5000; prints each experiment's address
	$(PY) -m sem_cls.tracking.ui sqlite:///$(CURDIR)/mlruns/mlflow.db http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db

HOST ?= 127.0.0.1
PORT ?= 5000
# Beyond 127.0.0.1 with MLflow's login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
server: $(STAMP)  ## MLflow tracking server for runs and artifacts in mlruns/, on http://127.0.0.1:5000 (HOST=, PORT=; login beyond 127.0.0.1)
	$(PY) -m sem_cls.tracking_server --host $(HOST) --port $(PORT) --mlruns $(CURDIR)/mlruns

# serve-model: MODEL=models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model or a
# downloaded model folder; looked up in this project's store unless MLFLOW_TRACKING_URI says else.
MODEL ?=
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
serve-model: $(STAMP)  ## REST API of a trained model (MLflow scoring server): MODEL=models:/sem-cls@champion PORT=5001
	@test -n "$(MODEL)" || { echo "Give the model: make serve-model MODEL=models:/<name>@<alias> (or runs:/<run id>/model, or a folder)"; exit 2; }
	# The server starts uvicorn by name (the venv's bin/), and the model's loader is sem_cls.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
		MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" \
		$(VENV)/bin/mlflow models serve -m "$(MODEL)" --env-manager local -h 127.0.0.1 -p $(PORT)

app: PORT = 7860
app: $(STAMP)  ## demo page of a model on http://127.0.0.1:7860: MODEL=models:/<name>@<alias>, runs:/<id>/model or a .ckpt (PORT=, HOST=; another HOST needs SEM_CLS_APP_USER and SEM_CLS_APP_PASSWORD)
	@test -n "$(MODEL)" || { echo "Give the model: make app MODEL=models:/sem-cls@champion (or runs:/<id>/model, or a .ckpt file)"; exit 2; }
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m sem_cls.app 'ckpt_path=$(MODEL)' host=$(HOST) port=$(PORT)

bench: $(STAMP)  ## the benchmarks of docs/performance.md (about 30 minutes)
	$(PY) bench/throughput.py
	$(PY) bench/cache_sweep.py
	$(PY) bench/memory.py
	$(PY) bench/sweep.py

clean:  ## remove outputs, keep data, mlruns and .venv
	rm -rf logs .pytest_cache
