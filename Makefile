# The README's two commands: `make demo` and `make test`. Each sets up what it needs by itself:
# a virtual environment in .venv with choreo installed in editable mode (which compiles the
# Cython core), rebuilt whenever the build inputs change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.choreo-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard cext/*.pyx cext/*.pxd)

.PHONY: demo test bench bench-peers clean tools

$(STAMP): $(BUILD_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

# Graphviz renders the flow graph (svg/png); installed when missing and we may (root + apt).
tools:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing graphviz (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
	      || echo "could not install graphviz: svg/png rendering tests will be skipped"; \
	  else echo "graphviz (dot) not found and cannot be installed here: svg/png tests will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/python -m choreo.demo

test: $(STAMP) tools
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench -p no:cacheprovider --benchmark-disable-gc --benchmark-columns=min,median,mean,ops,rounds
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) build choreo/_core*.so cext/_core.c .pytest_cache .benchmarks
