# make demo: fresh clone -> a finished local training run (tiny model, CPU).
# make test: fresh clone -> lint and the whole test suite: the main venv (SageMaker SDK v2,
# transformers 4.56.2), then the launcher again under SDK 3.x (.venv-sdk3) and the
# transformers 5 path (.venv-tf5).
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

# The second stack (HF image 2.9.0-transformers5.3.0): the entrypoint tests of the transformers 5 path.
VENV5 := .venv-tf5
STAMP5 := $(VENV5)/.installed-stamp
# what differs there: the experts' loading, LoRA format, fused pass, merge, the compiled norms, the fused projections and the offloaded checkpoints, the chunked head (the rest of the suite runs on 4.56.2)
TF5_TESTS := tests/entrypoint/test_tf5.py tests/entrypoint/test_head.py tests/entrypoint/test_card.py tests/e2e/test_merge.py tests/entrypoint/test_small_ops.py tests/entrypoint/test_projections.py tests/entrypoint/test_offload.py

.PHONY: install demo test test-main test-sdk3 test-tf5 test-without-avx512-bf16 lint clean

$(STAMP): pyproject.toml .ci/tf4.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, as $(TORCH) says (see the top of this file), so that [train] keeps it.
	$(BIN)/pip install -q $(TORCH)
	# SDK v2 here, its range first (pip would pick 3.x); .venv-sdk3 holds the other major.
	$(BIN)/pip install -q 'sagemaker>=2.257,<3'
	# the 4.56.2 image's stack (.ci/tf4.txt): a fresh resolve of [train] would pick transformers 5
	$(BIN)/pip install -q -e '.[train,dev]' -c .ci/tf4.txt
	touch $(STAMP)

install: $(STAMP)

$(TINY): $(STAMP) examples/make_tiny_model.py examples/data/medical.jsonl
	$(BIN)/python examples/make_tiny_model.py

demo: $(TINY)
	$(BIN)/sm-qlora launch examples/local-tiny.yaml --local
	$(BIN)/sm-qlora plot $$(ls -t runs | head -1)

lint: $(STAMP)
	$(BIN)/ruff check .

# .venv-sdk3 first: the main venv's test_sdk_majors compares its request with that venv's.
test: lint test-main test-without-avx512-bf16 test-tf5 test-sdk3

# test_tf5.py runs in .venv-tf5 (test-tf5); here it would only skip.
test-main: $(TINY) $(SDK3_STAMP)
	$(BIN)/pytest -q --ignore=tests/entrypoint/test_tf5.py

# The in-process entrypoint tests as on a CPU without AVX512-BF16 (bitsandbytes' other 4-bit CPU
# path), whatever this CPU has; the main run covers this CPU's own path (tests/without_avx512_bf16).
test-without-avx512-bf16: $(TINY)
	PYTHONPATH=tests/without_avx512_bf16 $(BIN)/pytest -q tests/entrypoint --ignore=tests/entrypoint/test_tf5.py

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

$(STAMP5): pyproject.toml .ci/tf5.txt
	$(PY) -m venv $(VENV5)
	$(VENV5)/bin/pip install -q --upgrade pip
	$(VENV5)/bin/pip install -q $(TORCH)
	$(VENV5)/bin/pip install -q -e '.[train,dev]' -c .ci/tf5.txt
	touch $(STAMP5)

test-tf5: $(TINY) $(STAMP5)
	$(VENV5)/bin/pytest -q $(TF5_TESTS)

clean:
	rm -rf runs examples/tiny-mixtral .pytest_cache
