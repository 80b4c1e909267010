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

# Graphviz renders the flow graph (svg/png); nftables partitions test hosts (network namespaces).
# Both are installed when missing and we may (root + apt); the tests that need them skip otherwise.
tools:
	@missing=""; command -v dot >/dev/null 2>&1 || missing="$$missing graphviz"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1) \
	      || echo "could not install$$missing: the tests that need them will be skipped"; \
	  else echo "not installed:$$missing (needs root and apt): the tests that need them will be skipped"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m choreo.demo

test: $(STAMP) tools
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest bench -p no:cacheprovider --benchmark-disable-gc --benchmark-columns=min,median,mean,ops,rounds
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) build choreo/_core*.so cext/_core.c .pytest_cache .benchmarks
