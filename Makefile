# lowbit — two commands do all the set-up: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch must come first: anything looser pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[nlp,dev]'
	@$(MAKE) --no-print-directory data
	@touch $(STAMP)

setup: $(STAMP)

# Offline evaluation data from Debian packages (WordNet for MiniLM retrieval). Optional: lowbit falls back.
data:
	@if [ -f /usr/share/wordnet/data.noun ] || dpkg -s wordnet-base >/dev/null 2>&1; then \
	  echo "wordnet-base: present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null) \
	    && echo "wordnet-base: installed" \
	    || echo "wordnet-base: could not be installed; MiniLM falls back to fidelity on pydoc text"; \
	else \
	  echo "wordnet-base: not installed. On Debian/Ubuntu run 'sudo apt-get install wordnet-base' for MiniLM"; \
	  echo "  retrieval metrics; without it lowbit reports fidelity on Python's pydoc text only."; \
	fi

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) lowbit-report .pytest_cache
