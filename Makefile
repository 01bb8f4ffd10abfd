# make demo: fresh clone -> a finished local training run (tiny model, CPU).
# make test: fresh clone -> lint and the whole test suite.
PY ?= python3
# CI and this project's build machines install torch 2.13.0, the CPU wheel they hold on
# disk (asking pip for anything else there downloads GBs of CUDA wheels). It is not what a
# laptop gets: `pip install '.[train]'` resolves torch>=2.8 as your platform provides it.
# Elsewhere: make install TORCH=torch (or TORCH='torch --index-url https://download.pytorch.org/whl/cpu').
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TINY := examples/tiny-mixtral/config.json

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, as $(TORCH) says (see the top of this file), so that [train] keeps it.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

$(TINY): $(STAMP) examples/make_tiny_model.py examples/data/medical.jsonl
	$(BIN)/python examples/make_tiny_model.py

demo: $(TINY)
	$(BIN)/sm-qlora launch examples/local-tiny.yaml --local
	$(BIN)/sm-qlora plot $$(ls -t runs | head -1)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(TINY) lint
	$(BIN)/pytest -q

clean:
	rm -rf runs examples/tiny-mixtral .pytest_cache
