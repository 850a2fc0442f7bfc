# Set-up is part of every target: .venv is (re)built from pyproject.toml when that changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: test demo lint clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# The whole pipeline on a synthetic look-alike set, random-init trunk (nothing is downloaded).
demo: $(VENV)/.installed
	$(PY) -m extract.synth $(DEMO)/data --pairs 400 --queries 40 --seed 0 --overwrite
	$(PY) -m extract --backbone resnet50 --weights none --data $(DEMO)/data \
		--input-size 128 112 --out $(DEMO)/cache/resnet50-layer4-none-128x112-hflip.h5
	$(PY) -m head.train --cache $(DEMO)/cache/resnet50-layer4-none-128x112-hflip.h5 \
		--runs-dir $(DEMO)/runs --name demo --epochs 15 --overwrite
	$(PY) -m head.export --run $(DEMO)/runs/demo
	$(PY) -m infer --onnx $(DEMO)/runs/demo/model.onnx --data $(DEMO)/data --split val \
		--out $(DEMO)/val-report.json
	$(PY) -m infer --onnx $(DEMO)/runs/demo/model.onnx --data $(DEMO)/data --split test \
		--out $(DEMO)/submission.csv
	@echo "demo done: submission $(DEMO)/submission.csv, validation report $(DEMO)/val-report.json" \
		"and page $(DEMO)/val-report.html"

clean-demo:
	rm -rf $(DEMO)
