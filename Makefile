PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Pretrain the demo config on the embedded synthetic data, evaluate retrieval, write runs/demo/.
demo: $(STAMP)
	$(VENV)/bin/vlp pretrain configs/pretrain/demo.yaml --output-dir runs/demo --overwrite
	$(VENV)/bin/python -m vlp.explain runs/demo/final > runs/demo/explain.json
	$(VENV)/bin/vlp report runs/demo
	@cat runs/demo/explain.json
	@echo "runs/demo: metrics.jsonl, plots/, eval_retrieval.json, report.html, final/"

test: $(STAMP)
	$(PY) -m pytest -x --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check vlp tests benchmarks examples
	$(VENV)/bin/mypy vlp

# Every benchmark at its quick size (full sizes: --full); JSON goes to benchmarks/results/.
bench: $(STAMP)
	for b in fusion tokenize retrieval data train memory; do $(PY) benchmarks/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV) runs
