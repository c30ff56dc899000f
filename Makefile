# atlasbuilder: `make demo` and `make test` set up everything from scratch (a .venv here).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-atlas

.PHONY: setup demo demo-full test coverage lint typecheck bench clean

# The CPU build of torch is installed first and pinned: an unpinned torch (or one pulled in by a
# dependency range) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# the web viewer's NiiVue bundle comes from npm (never committed); chromium runs its tests
	scripts/fetch_viewer_assets.sh || echo "warning: NiiVue not fetched: 'atlasbuilder view' and its test are unavailable"
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
		|| echo "warning: chromium not installed: the browser tests will be skipped"; }
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/atlasbuilder build data_manifests/demo.yaml -o $(DEMO_OUT) --quick

demo-full: setup
	$(BIN)/atlasbuilder build data_manifests/demo.yaml -o $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check atlasbuilder tests benchmarks

typecheck: setup
	$(BIN)/mypy

# the whole suite: lint, types, tests (slow ones and notebooks included); the 15 slowest listed
test: lint typecheck
	$(BIN)/python -m pytest --durations=15

# the same suite with line coverage of the package (tracing makes it ~10 % slower: not in CI)
coverage: lint typecheck
	$(BIN)/python -m pytest --cov=atlasbuilder --cov-report=term-missing:skip-covered --durations=15

bench: setup
	$(BIN)/python benchmarks/bench_query.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache .coverage
