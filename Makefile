# `make test` and `make bench` set up .venv from scratch when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take this local build; anywhere else pip resolves it as usual
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint demo grounding bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check xclip tests scripts

demo: install
	$(BIN)/xclip attribute configs/demo.yaml
	$(BIN)/xclip render runs/demo

# held-out grounding figures of the demo model: pointing game and mass ratio, per shape, with intervals
grounding: install
	$(BIN)/xclip synth runs/grounding-scenes --n 500 --seed 20000
	$(BIN)/xclip attribute configs/grounding.yaml --quiet --overwrite
	$(BIN)/xclip evaluate runs/grounding --annotations runs/grounding-scenes/annotations.jsonl

bench: install
	$(BIN)/python scripts/bench.py --architecture vit-b-32 --device cpu

clean:
	rm -rf $(VENV) build *.egg-info runs
