# `make run` serves the demo; `make test` runs the whole suite. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint fault demo-token clean bench bench-floors

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "KiteMesh needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	@mkdir -p var
	$(PY) manage.py migrate --noinput
	$(PY) manage.py apply_config config/demo.yaml
	@token=$$($(PY) manage.py issue_token --team demo --name "demo-$$(date +%Y%m%d-%H%M%S)" 2>/dev/null | tail -n 1); \
	echo; echo "Demo API token (shown once): $$token"; echo; \
	echo "Try it:"; \
	echo "  curl -s http://$(HOST):$(PORT)/v1/chat/completions \\"; \
	echo "    -H 'Authorization: Bearer '$$token -H 'Content-Type: application/json' \\"; \
	echo "    -d '{\"model\": \"group:00000000-0000-4000-8000-000000000001\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"; \
	echo
	@password=$$($(PY) manage.py add_member --team demo --username demo --approver --new-password | tail -n 1); \
	echo "Chat in the browser: http://$(HOST):$(PORT)/chat/ (user demo, password shown once: $$password)"; echo
	@# The worker (webhook deliveries, crash recovery, approval expiry) runs beside the server and stops with it.
	export KITEMESH_TOOL_HOST_ALLOWLIST=$${KITEMESH_TOOL_HOST_ALLOWLIST:-127.0.0.1}; \
	$(PY) manage.py worker --verbosity 0 & worker=$$!; trap 'kill $$worker 2>/dev/null' EXIT INT TERM; \
	$(PY) -m uvicorn kitemesh_site.asgi:application --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-dev
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# `make fault`: the seeded fault run (tests/fault/run.py) on PostgreSQL, at most 5 minutes; it drops and
# creates the database kitemesh_fault. FAULT_ARGS="--seed N --seconds S" repeats a run or shortens it.
fault: $(VENV)/.installed-dev
	$(PY) -m tests.fault.run $(FAULT_ARGS)

clean:
	rm -rf $(VENV) var *.egg-info

# `make bench`: every scenario of bench/run.py against the direct fake upstream, KiteMesh and LiteLLM proxy;
# writes bench/results.md and bench/results.json (about 7 minutes). BENCH_ARGS=--quick for a smoke run.
LITELLM_VENV := bench/.litellm-venv

bench: $(VENV)/.installed
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk) || \
		echo "wrk could not be installed: bench/load.py drives the non-stream scenarios instead"
	@test -x $(LITELLM_VENV)/bin/litellm || { \
		test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV); \
		$(LITELLM_VENV)/bin/pip install 'litellm[proxy]'; }
	@# uvicorn picks httptools when importable: LiteLLM gets the same HTTP parser as KiteMesh.
	@$(LITELLM_VENV)/bin/python -c 'import httptools' 2>/dev/null || $(LITELLM_VENV)/bin/pip install --quiet httptools
	$(PY) bench/run.py $(BENCH_ARGS)

# `make bench-floors`: a completion's c=1 latency layer by layer (bench/floors.py, about two minutes).
bench-floors: $(VENV)/.installed
	$(PY) bench/floors.py $(BENCH_ARGS)
