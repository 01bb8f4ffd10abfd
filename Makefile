# make demo: fresh clone -> a finished local training run (tiny model, CPU).
# make test: fresh clone -> lint and the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TINY := examples/tiny-mixtral/config.json

.PHONY: install demo test test-without-avx512-bf16 lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 first: the CPU build on this machine's disk (any other request downloads CUDA).
	$(BIN)/pip install -q torch==2.13.0
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

# The in-process tests as on a CPU without AVX512-BF16 (bitsandbytes' other 4-bit path), on any CPU.
test-without-avx512-bf16: $(TINY)
	PYTHONPATH=tests/without_avx512_bf16 $(BIN)/pytest -q tests/entrypoint

clean:
	rm -rf runs examples/tiny-mixtral .pytest_cache
