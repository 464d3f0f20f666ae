# `make test` and `make bench` set up .venv from scratch when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch with a torchvision built for it (open_clip's preprocessing imports torchvision, and transformers' image
# processors break beside a torchvision whose compiled ops do not load): these pairs lie on the build machines'
# disk (x86_64: 2.14.1; aarch64: a 2.9.1 CPU build); anywhere else pip resolves them as usual
TORCH_SPEC ?= $(if $(filter aarch64 arm64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

.PHONY: install test test-fast lint demo grounding baselines compare words bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test,open_clip]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

# the edit loop: the suite without the tests marked slow (browser, subprocess and crash-injection tests, the longer
# end-to-end runs); `make test` (what CI runs) runs every test
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

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

# the same held-out scenes, second-order maps against every first-order baseline: grounding and insertion/deletion,
# with paired differences and intervals; insertion/deletion in both games (the cut layer's, and FIxLIP's input game)
baselines: install
	$(BIN)/xclip synth runs/grounding-scenes --n 500 --seed 20000
	$(BIN)/xclip attribute configs/grounding.yaml --overwrite
	$(BIN)/xclip evaluate runs/grounding --annotations runs/grounding-scenes/annotations.jsonl --baselines all
	$(BIN)/xclip evaluate runs/grounding --baselines all --game input --out runs/grounding/evaluation-input

# the demo model against xclip:demo-no-star (fine-tuned without stars) on the grounding scenes, phrase by phrase:
# per-class paired differences with intervals; stars should fall, the other shapes hardly move
compare: install
	test -f runs/grounding-scenes/annotations.jsonl || $(BIN)/xclip synth runs/grounding-scenes --n 500 --seed 20000
	$(BIN)/xclip attribute configs/grounding.yaml --quiet --overwrite
	$(BIN)/xclip attribute configs/grounding-no-star.yaml --quiet --overwrite
	$(BIN)/xclip compare runs/grounding runs/grounding-no-star --annotations runs/grounding-scenes/annotations.jsonl --out runs/compare

# every word of 200 fresh scenes, without annotations, for both shipped models: the share of the map each word
# carries, how concentrated its maps are and where they sit, the most diffuse and least consistent (docs/words.md)
WORDS_DATA = data.root=../runs/words-scenes data.metadata=../runs/words-scenes/metadata.jsonl
words: install
	$(BIN)/xclip synth runs/words-scenes --n 200 --seed 40000
	$(BIN)/xclip attribute configs/grounding.yaml $(WORDS_DATA) output.directory=../runs/words --quiet --overwrite
	$(BIN)/xclip attribute configs/grounding-no-star.yaml $(WORDS_DATA) output.directory=../runs/words-no-star --quiet --overwrite
	$(BIN)/xclip words runs/words --top 40 --flagged 5
	$(BIN)/xclip words runs/words-no-star --top 40 --flagged 5

bench: install
	$(BIN)/python scripts/bench.py --architecture vit-b-32 --device cpu

clean:
	rm -rf $(VENV) build *.egg-info runs
