# Two commands do all the set-up on a fresh machine with Python 3.10 or newer:
#   make test   install runtime + test dependencies into .venv, build the compiled In-Place
#               ABN package where a C++ compiler exists, and run the whole test suite
#   make demo   the one-command demo on synthetic data (CPU, a few minutes)
# Others: make iabn (the compiled In-Place ABN alone), make bench / bench-quick,
# make test-fast, make clean.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 9.0
# pip's index for torch and torchvision; empty: PyPI (the CUDA build on Linux, 5.6 GB).
# For the CPU-only build: make venv TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=

.PHONY: test test-fast demo iabn iabn-if-possible bench bench-quick clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX_URL),$(PIP) install -q --index-url $(TORCH_INDEX_URL) torch torchvision)
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	touch $@

# make test runs one pytest worker per core (pytest-xdist; at most 4, as every end-to-end
# test trains networks), each test file on one worker; TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; \
                  [ $$n -lt 2 ] && n=0; echo $$n)

test: $(VENV)/.installed iabn-if-possible
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

demo: $(VENV)/.installed
	$(PY) tools/demo.py

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

bench-quick: $(VENV)/.installed
	$(PY) bench/run_all.py --quick

# In-Place ABN is source-only; it compiles the CPU kernels, and the CUDA ones where a
# CUDA toolkit exists at $(CUDA_HOME).
iabn: $(VENV)/.iabn

$(VENV)/.iabn: $(VENV)/.installed
	$(PIP) install -q setuptools_scm wheel
	if [ -d "$(CUDA_HOME)" ]; then export CUDA_HOME="$(CUDA_HOME)"; fi; \
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	$(PIP) install -q --no-cache-dir --no-build-isolation inplace-abn==1.1.0
	$(PY) -c "import inplace_abn"
	rm -f $(VENV)/.iabn-missing
	touch $@

# make test: build the package when a C++ compiler exists; without one (or when the build
# fails) the tests that compare against it are left out, and the summary says why
iabn-if-possible: $(VENV)/.installed
	@if [ -f $(VENV)/.iabn ]; then :; \
	elif command -v c++ >/dev/null 2>&1; then \
	  echo "building the compiled In-Place ABN package (once; a few minutes)"; \
	  $(MAKE) --no-print-directory iabn >$(VENV)/iabn-build.log 2>&1 || { \
	    echo "the inplace-abn build failed (see $(VENV)/iabn-build.log)" > $(VENV)/.iabn-missing; \
	    cat $(VENV)/.iabn-missing; }; \
	else \
	  echo "no C++ compiler (c++) on this machine" > $(VENV)/.iabn-missing; \
	  cat $(VENV)/.iabn-missing; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache

# What the GPU check (bench/device_check.py) needs that the GPU machine lacks, for its Python
# 3.12 manylinux x86_64, in device_bundle/ (ignored, at most 20 MiB): the tensorboardX wheel
# (numpy, packaging and protobuf are there), the inplace-abn source archive and the
# setuptools_scm wheel its build imports. Needs pip access to PyPI; the check installs them
# with pip --no-index. The source download runs the archive's setup.py, which imports torch
# and setuptools_scm: hence this venv, without build isolation.
DEVICE_BUNDLE ?= device_bundle
DEVICE_WHEELS := tensorboardX==2.6.5 setuptools_scm==8.3.1
DEVICE_PLATFORM := --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64

.PHONY: device-bundle
device-bundle: $(VENV)/.installed
	rm -rf $(DEVICE_BUNDLE).tmp && mkdir -p $(DEVICE_BUNDLE).tmp
	$(PIP) download -q --no-deps --only-binary=:all: $(DEVICE_PLATFORM) \
	  -d $(DEVICE_BUNDLE).tmp $(DEVICE_WHEELS)
	$(PIP) install -q setuptools_scm wheel
	$(PIP) download -q --no-deps --no-binary=:all: --no-build-isolation \
	  -d $(DEVICE_BUNDLE).tmp inplace-abn==1.1.0
	$(PY) bench/device_check.py --check-bundle $(DEVICE_BUNDLE).tmp
	rm -rf $(DEVICE_BUNDLE) && mv $(DEVICE_BUNDLE).tmp $(DEVICE_BUNDLE)
