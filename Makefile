# make demo: fresh clone -> a finished local training run (tiny model, CPU).
# make test: fresh clone -> lint and the whole test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TINY := examples/tiny-mixtral/config.json

.PHONY: install demo test test-tf5 lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 first: the CPU build on this machine's disk (any other request downloads CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]' -c .ci/tf4.txt
	touch $(STAMP)

# The second stack (HF image 2.9.0-transformers5.3.0): the entrypoint tests of the transformers 5 path.
VENV5 := .venv-tf5
STAMP5 := $(VENV5)/.installed-stamp
# what differs there: the experts' loading, LoRA format, fused pass and merge (the rest of the suite runs on 4.56.2)
TF5_TESTS := tests/entrypoint/test_tf5.py tests/e2e/test_merge.py

$(STAMP5): pyproject.toml .ci/tf5.txt
	$(PY) -m venv $(VENV5)
	$(VENV5)/bin/pip install -q --upgrade pip
	$(VENV5)/bin/pip install -q torch==2.13.0
	$(VENV5)/bin/pip install -q -e '.[train,dev]' -c .ci/tf5.txt
	touch $(STAMP5)

test-tf5: $(TINY) $(STAMP5)
	$(VENV5)/bin/pytest -q $(TF5_TESTS)

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
	$(MAKE) test-tf5

clean:
	rm -rf runs examples/tiny-mixtral .pytest_cache
