# The two set-up commands of README.md:
#   make serve   install into .venv, fetch the default model, start `vllm serve` with episodic
#   make test    install into .venv (with test tools) and run the tests
# Benchmarks (stock and episodic in one run; results in benchmarks/results/, see docs/):
#   make bench-quality | bench-throughput | bench-memory | bench-multiturn | bench-kernels
#   with MODEL, EPISODIC and BENCH_ARGS (the script's own options), e.g.
#   make bench-quality BENCH_ARGS="--lengths 8192 --tasks niah_single --samples 20"
VENV          := .venv
PY            := $(VENV)/bin/python
MODEL         ?= smollm2-135m
HOST          ?= 127.0.0.1
PORT          ?= 8000
MAX_MODEL_LEN ?= 32768
# GiB of paged KV cache; episodic keeps only sinks + window per request on it
KV_SPACE      ?= 2
# give the model every core (vLLM's default binding leaves one core to the front end)
THREADS_BIND  ?= 0-$(shell expr $$(nproc) - 1)
EPISODIC      ?= {}
SERVE_ARGS    ?=
BENCH_ARGS    ?=

.PHONY: install install-test serve test bench-quality bench-throughput bench-memory bench-multiturn bench-kernels

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml install/cpu.sh
	bash install/cpu.sh
	touch $@

install-test: $(VENV)/.installed-test
$(VENV)/.installed-test: pyproject.toml install/cpu.sh
	bash install/cpu.sh --test
	touch $(VENV)/.installed $@

serve: install
	@model_dir=$$($(PY) -m vllm_episodic.models fetch $(MODEL)) && \
	echo "serving $$model_dir as '$(MODEL)' on http://$(HOST):$(PORT)" && \
	VLLM_CPU_KVCACHE_SPACE=$(KV_SPACE) VLLM_CPU_OMP_THREADS_BIND=$(THREADS_BIND) \
	exec $(VENV)/bin/vllm serve "$$model_dir" --served-model-name $(MODEL) \
		--host $(HOST) --port $(PORT) --max-model-len $(MAX_MODEL_LEN) \
		--attention-backend episodic --additional-config '{"episodic": $(EPISODIC)}' $(SERVE_ARGS)

test: install-test
	$(PY) -m pytest

bench-quality bench-throughput bench-memory bench-multiturn: bench-%: install
	$(PY) benchmarks/$*.py --model $(MODEL) --episodic '$(EPISODIC)' $(BENCH_ARGS)

bench-kernels: install
	$(PY) benchmarks/kernels.py $(BENCH_ARGS)
