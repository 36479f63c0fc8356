# medmtl: `make demo` and `make test` each work on a fresh machine by themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CUDA 13 build of torch: pip takes it from this machine's local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: all venv build test test-python test-cpp bench demo gpu-check clean

all: build

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel ninja
	$(PIP) install -q $(TORCH_SPEC)
	# medmtl's own dependencies (pyproject.toml; the editable install below takes --no-deps).
	$(PIP) install -q "monai>=1.3" scipy "torchmetrics>=1.0" "faster-coco-eval>=1.6" tqdm "matplotlib>=3.7" \
		pyyaml pillow "pydicom>=2.4" "nibabel>=5"
	# triton is pinned (pyproject test extras): the Triton tests must run, not skip, in CI.
	$(PIP) install -q "pytest>=8" "hypothesis>=6" expecttest "triton==3.8.0"
	# Test-only oracles: the layers are checked against MONAI's and timm's Swin attention.
	# (einops: MONAI's SwinUNETR needs it; medmtl.accelerate is tested against it.)
	$(PIP) install -q "timm>=1.0" einops
	touch $@

venv: $(VENV)/.deps

# Builds medmtl._C in place (CUDA kernels too when torch is a CUDA build and
# nvcc is found; MEDMTL_BUILD_CUDA=0 skips them for quick local iterations).
$(VENV)/.built: $(VENV)/.deps $(CSRC) setup.py
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: test-python test-cpp

test-python: build
	$(PY) -m pytest -q tests

# The torch-free cores with AddressSanitizer and UndefinedBehaviorSanitizer.
test-cpp:
	cmake -S . -B build-cmake -DMEDMTL_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build build-cmake -j $(MAX_JOBS)
	ctest --test-dir build-cmake --output-on-failure

bench: build
	$(PY) benchmarks/run.py --out bench-results
	$(PY) benchmarks/profile_accelerate.py --out bench-results

# On a machine with a CUDA GPU (no network; torch, triton and nvcc preinstalled):
# builds with the CUDA kernels, runs every GPU test and a short cuda / triton /
# reference / torch.compile benchmark within 8 minutes, one report in
# gpu-check-results/report.md, and prints which step failed. Uses .venv when
# there is one, else the machine's python3. Without a GPU it says so and skips.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) .ci/gpu_check.py --out gpu-check-results

# `make demo`: trains a small ResFormerMTL on the built-in synthetic lesions
# through the command (about 3 minutes on 2 CPU cores), evaluates it on a
# held-out split and prints the metrics; the run folder has the curves,
# overlays and checkpoints. `make demo MODEL=ums_rep` / `MODEL=ft_mtl_net`:
# the papers' comparisons (each at most 10 minutes on 2 cores).
MODEL ?= resformer_mtl
DEMO_OUT ?= demo-results
demo: build
	$(PY) -m medmtl info
ifeq ($(MODEL),resformer_mtl)
	$(PY) -m medmtl train --config configs/resformer_mtl.yaml output_dir=$(DEMO_OUT)/resformer_mtl
	$(PY) -m medmtl evaluate --checkpoint $(DEMO_OUT)/resformer_mtl/checkpoint_last.pth --data synthetic --split test
else
	$(PY) -m medmtl study $(MODEL) --out $(DEMO_OUT)/$(MODEL)
endif

clean:
	rm -rf build build-cmake *.egg-info medmtl/_C*.so bench-results demo-results gpu-check-results $(VENV)/.built
