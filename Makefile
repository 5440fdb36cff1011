# Every target sets up its own virtual environment first, so each works from a clean clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint prometheus nginx chromium bench serve simulate clean

demo: $(STAMP)  ## simulated base + candidate behind the gateway, with traffic from the openai client
	$(BIN)/canarygate demo

test: $(STAMP) lint prometheus nginx chromium  ## lint, type-check and run the whole test suite
	$(BIN)/pytest

prometheus:  ## the tests check dashboards and alert rules against a real Prometheus (Debian's package)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)

nginx:  ## the replica tests put a real nginx in front of the gateways, as a cluster would (Debian's package)
	@command -v nginx >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx)

chromium:  ## the pre-flight report's HTML page is opened in a real headless browser (Debian's package)
	@command -v chromium >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

lint: $(STAMP)
	$(BIN)/ruff check gateway tests bench monitoring
	$(BIN)/ruff format --check gateway tests bench monitoring
	$(BIN)/mypy

bench: $(STAMP)  ## direct vs reference passthrough vs gateway; needs wrk and nginx (installed via apt if missing)
	@command -v wrk >/dev/null && command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk nginx)
	$(BIN)/python bench/run.py

serve: $(STAMP)
	$(BIN)/canarygate serve --policies policies

simulate: $(STAMP)
	$(BIN)/canarygate simulate --port 9001

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
