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

SDK3 := .venv-sdk3
SDK3_STAMP := $(SDK3)/.installed-stamp
# The launcher's tests once more under SageMaker SDK 3.x (the main venv keeps v2): the same
# request field for field, every verb against moto. The toolkit and entrypoint tests need
# only one SDK, so this venv has no torch (and no [train], no [dev] with its triton).
SDK3_TESTS := tests/launcher tests/e2e/test_submit_moto.py tests/e2e/test_sdk_majors.py tests/e2e/test_budget.py \
	tests/e2e/test_follow.py tests/e2e/test_job_hardening.py \
	--deselect tests/launcher/test_plan.py::test_tokens_are_counted_with_a_local_tokenizer_and_estimated_otherwise
# (deselected: it counts with the tiny model's tokenizer, which needs transformers from [train])

.PHONY: install demo test test-sdk3 lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, as $(TORCH) says (see the top of this file), so that [train] keeps it.
	$(BIN)/pip install -q $(TORCH)
	# SDK v2 here, its range first (pip would pick 3.x); .venv-sdk3 holds the other major.
	$(BIN)/pip install -q 'sagemaker>=2.257,<3'
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

# 3.27.0 first, then us: pip must keep it (no downgrade) and `pip check` must stay clean.
$(SDK3_STAMP): pyproject.toml
	$(PY) -m venv $(SDK3)
	$(SDK3)/bin/pip install -q --upgrade pip
	$(SDK3)/bin/pip install -q sagemaker==3.27.0
	$(SDK3)/bin/pip install -q -e . pytest 'moto[server]>=5.1,<5.3' hypothesis 'setuptools>=68'
	$(SDK3)/bin/pip check
	$(SDK3)/bin/python -c "from importlib.metadata import version as v; assert v('sagemaker') == '3.27.0', v('sagemaker')"
	touch $(SDK3_STAMP)

test-sdk3: $(SDK3_STAMP) $(TINY)
	$(SDK3)/bin/python -m pytest -q $(SDK3_TESTS)

clean:
	rm -rf runs examples/tiny-mixtral .pytest_cache
