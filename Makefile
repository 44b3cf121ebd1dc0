# The README's two commands: `make demo` (the main job) and `make test`. Both install the
# pinned lock (requirements/test.txt) into .venv first, then build the C++ extension.
# `make lock` regenerates the lock on purpose; nothing else changes it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements/test.txt
DATA   := requirements/data.txt
# The lock is compiled for, and installed exactly on, Linux x86_64 with Python 3.11.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
LOCKED := $(VENV)/.locked
STAMP  := $(VENV)/.installed
SOURCES := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp)
# PyTorch, the CUDA build and its libraries: x86_64 only (see $(LOCKED)).
TORCH_STACK := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==

# $(call copy_tracked,DIR[,PATHS]): the tracked files (under PATHS) as they are in the work
# tree, copied into DIR. One tar reads the whole NUL-separated list (xargs could split it).
copy_tracked = git ls-files -z $(2) | tar -c --null -T - | tar -x -C $(1)

.PHONY: install test test-fast demo bench lock test-latest test-oldest wheel test-wheel gpu-wheels clean

install: $(STAMP)

# A new lock gets a new venv, so that nothing outside it stays installed. `--no-deps`:
# the lock already names every package.
$(LOCKED): $(LOCK) $(DATA)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	@if [ "$$(uname -m)" = x86_64 ]; then \
		$(PIP) install --no-deps -r $(LOCK); \
	else \
		echo "make: $$(uname -m) is not x86_64: installing the CPU build of torch instead of the lock's CUDA build;" \
		     "without the lock's torchvision the real-video tests will skip."; \
		grep -vE '$(TORCH_STACK)' $(LOCK) > $(VENV)/lock-no-torch.txt && \
		$(PIP) install --no-deps -r $(VENV)/lock-no-torch.txt && $(PIP) install torch triton; \
	fi
	$(PIP) install --no-deps -r $(DATA)
	touch $@

# The extension, built against the venv's torch; rebuilt when its sources change.
$(STAMP): $(LOCKED) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# make built the extension, so here it must load: a failure to load fails the suite
# instead of skipping the C++ tests.
test: $(STAMP)
	VREASON_REQUIRE_EXTENSION=1 $(PY) -m pytest -q python_tests

# The quick loop while developing: everything but the tests marked slow.
test-fast: $(STAMP)
	VREASON_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -m "not slow" python_tests

demo: $(STAMP)
	$(PY) -m vreason_kernels demo

# The CPU benchmarks at their quick shapes, one JSON record each, and the summary tables.
bench: $(STAMP)
	$(PY) benchmarks/bench_linear_entropy.py --quick
	$(PY) benchmarks/bench_value_delta_attention.py --quick
	$(PY) benchmarks/summarize.py --out benchmarks/results/SUMMARY.md

# Regenerate the lock from requirements/test.in (newest releases that satisfy it).
lock: $(LOCKED)
	$(VENV)/bin/uv pip compile requirements/test.in $(LOCK_TARGET) --no-header \
		--annotation-style line --upgrade -o $(LOCK)

# The suite against the newest and the oldest releases pyproject.toml allows, each in a
# venv of its own, to see the next break on purpose. Not part of `make test`.
# torch and torchvision are held at the newest releases on this machine's disk unless
# TORCH_SPEC is given (a space-separated list of constraints).
TORCH_SPEC ?= torch<=2.14.1 torchvision<=0.29.1
EXTRAS := --extra test --extra hf --extra video --extra eval
test-latest: RESOLUTION := highest
test-oldest: RESOLUTION := lowest-direct
test-latest test-oldest: $(LOCKED)
	rm -rf .venv-$@ && $(PYTHON) -m venv .venv-$@ && mkdir .venv-$@/src
	printf '%s\n' $(foreach c,$(TORCH_SPEC),'$(c)') > .venv-$@/torch.txt
	$(VENV)/bin/uv pip compile pyproject.toml $(EXTRAS) $(LOCK_TARGET) --resolution $(RESOLUTION) \
		-c .venv-$@/torch.txt --no-header -o .venv-$@/lock.txt
	.venv-$@/bin/python -m pip install --no-deps -r .venv-$@/lock.txt -r $(DATA)
	# A copy of the tracked tree, so that its editable build leaves this tree's extension alone.
	$(call copy_tracked,.venv-$@/src)
	cd .venv-$@/src && ../bin/python -m pip install --no-build-isolation --no-deps -e . \
		&& VREASON_REQUIRE_EXTENSION=1 ../bin/python -m pytest -q python_tests

# One abi3 wheel in dist/ for every torch >= 2.10 and CPython >= 3.10 (docs/install.md),
# built against the venv's torch from a copy of the tracked files, so that neither a
# stale build/ output nor an untracked file gets into it.
WHEEL_SRC := build/wheel-src
wheel: $(LOCKED)
	rm -rf $(WHEEL_SRC) dist/vreason_kernels-*.whl && mkdir -p $(WHEEL_SRC)
	$(call copy_tracked,$(WHEEL_SRC))
	$(PIP) wheel --no-build-isolation --no-deps -w dist $(WHEEL_SRC)

# That wheel under another torch: a fresh venv with torch 2.13.0 (the CPU build) and the
# lock's numpy, pytest and triton (a test module imports it), then the C++ op tests
# against the reference. The tests run from a copy, so that they import the installed
# wheel, not this tree; VREASON_REQUIRE_EXTENSION=1 makes a wheel that fails to load fail.
# Not part of `make test`: it adds a wheel build and a torch install (see docs/install.md).
WHEEL_VENV  := .venv-test-wheel
WHEEL_TORCH := torch==2.13.0
WHEEL_TESTS := test_extension_load.py test_linear_entropy.py test_linear_entropy_accuracy.py \
	test_linear_entropy_bad_input.py test_value_delta_attention.py test_value_delta_attention_bad_input.py \
	test_value_delta_attention_cpp.py test_value_delta_attention_grads.py test_linear_logprob_entropy.py
test-wheel: wheel
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	grep -vE '^(torch|torchvision)==' $(LOCK) > $(WHEEL_VENV)/constraints.txt
	$(WHEEL_VENV)/bin/python -m pip install -c $(WHEEL_VENV)/constraints.txt "$(WHEEL_TORCH)" numpy pytest triton
	$(WHEEL_VENV)/bin/python -m pip install --no-deps dist/vreason_kernels-*.whl
	$(call copy_tracked,$(WHEEL_VENV),python_tests pyproject.toml docs/rl-training.md)
	cd $(WHEEL_VENV) && VREASON_REQUIRE_EXTENSION=1 bin/python -m pytest -q --vk-backends cpp \
		$(addprefix python_tests/,$(WHEEL_TESTS))

# The GPU campaign's peer wheels (benchmarks/GPU_CAMPAIGN.md) into the git-ignored .whl/,
# for the device tool's carry: pure-Python, about 0.9 MB together.
GPU_WHEELS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .venv-test-latest .venv-test-oldest $(WHEEL_VENV) build dist *.egg-info vreason_kernels/_C*.so
