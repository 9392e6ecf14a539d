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
	$(BIN)/pip install -q -e '.[nlp,onnx,dev]'
	@$(MAKE) --no-print-directory data
	@touch $(STAMP)

setup: $(STAMP)

# Offline data from Debian packages: WordNet (MiniLM retrieval) and Fashion-MNIST (QAT workloads).
# Both optional: without WordNet lowbit falls back to pydoc text; without Fashion-MNIST its workloads say how to get it.
DEB_DATA := wordnet-base dataset-fashion-mnist
data:
	@missing=""; for p in $(DEB_DATA); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "data packages: present ($(DEB_DATA))"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    && echo "data packages: installed$$missing" \
	    || echo "data packages:$$missing could not be installed; MiniLM falls back to pydoc text"; \
	else \
	  echo "data packages:$$missing not installed. On Debian/Ubuntu run 'sudo apt-get install$$missing'"; \
	  echo "  (WordNet gives MiniLM retrieval metrics; without it lowbit reports fidelity on pydoc text)."; \
	fi

demo: $(STAMP)
	$(BIN)/lowbit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) lowbit-report .pytest_cache
