# cmsrd: one virtual environment at .venv, created or reused by every target that needs it.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
PYTEST_ARGS ?=

.PHONY: install test lint demo dataset-synthetic dataset-real bench report reliability nfe-demo clean

install: $(STAMP)

# Pinned, resolved once (requirements/lock.txt); --no-deps keeps pyiqa's unneeded extras out
# (pyiqa imports only what the metrics use). torch/torchvision 2.14.1/0.29.1 come from local disk.
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps -r requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@echo "pip check (pyiqa's metadata lists packages its DISTS/CLIP-IQA code never imports, e.g. bitsandbytes,"
	@echo "tensorboard, pre-commit: installed --no-deps on purpose, so pip reports them; anything else is a real gap):"
	$(BIN)/python -m pip check || true
	touch $(STAMP)

test: install lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Lint and format check (ruff, line length 120; config in pyproject.toml). `ruff format .` fixes the format.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The offline demo, end to end on CPU: build demo-real from the generated world (served on loopback), train a
# small ESRGAN for a few hundred steps, benchmark it against bicubic, render the report. (demo-synthetic, the x32
# bicubic variant, is not built here since nothing in the demo uses it: `cmsrd build
# manifests/presets/demo-synthetic.yaml --out out/demo/demo-synthetic` builds it.)
DEMO := $(OUT)/demo
DEMO_STEPS ?= 300
# minutes of training for the map segmenter behind the demo's map-agreement columns (map_miou, map_pixel_acc)
DEMO_MAPSEG_MINUTES ?= 2
demo: install
	$(BIN)/cmsrd build manifests/presets/demo-real.yaml --out $(DEMO)/demo-real
	$(BIN)/cmsrd validate $(DEMO)/demo-real
	$(BIN)/cmsrd-bench train --method esrgan --config baselines/configs/esrgan-demo.yaml \
		--data $(DEMO)/demo-real --max-steps $(DEMO_STEPS) --out $(DEMO)/train/esrgan-x16 --resume
	test -f $(DEMO)/train/mapseg/mapseg.safetensors || $(BIN)/cmsrd-bench train-downstream \
		--data $(DEMO)/demo-real --out $(DEMO)/train/mapseg --max-minutes $(DEMO_MAPSEG_MINUTES)
	rm -rf $(OUT)/bench/sr/esrgan  # the demo model may have been retrained; the other methods resume
	$(MAKE) --no-print-directory bench report BENCH_DATA=$(DEMO)/demo-real \
		BENCH_WEIGHTS="--weights esrgan=$(DEMO)/train/esrgan-x16/model.safetensors" \
		BENCH_ARGS="--metrics default,map_miou,map_pixel_acc --map-segmenter $(DEMO)/train/mapseg/mapseg.safetensors"
	@echo; echo "leaderboard: $(OUT)/bench/leaderboard.csv   report: $(OUT)/report/index.html"

# Quality vs NFE on the demo (seeds/000): train tiny csdiff for a few CPU minutes, sweep its NFE from pure noise
# and from the LR, with bicubic as the reference; CSV and figure in $(OUT)/report-nfe/figures/quality_vs_nfe.*
NFE_SWEEP ?= nfe=2,5,10,20
NFE_LIMIT ?= 4
CSDIFF_MINUTES ?= 4
nfe-demo: install
	$(BIN)/cmsrd build manifests/presets/demo-real.yaml --out $(DEMO)/demo-real
	$(BIN)/cmsrd-bench train --method csdiff --config baselines/configs/csdiff-tiny.yaml \
		--data $(DEMO)/demo-real --max-minutes $(CSDIFF_MINUTES) --out $(DEMO)/train/csdiff-tiny --resume
	$(BIN)/cmsrd-bench run --data $(DEMO)/demo-real --methods csdiff,bicubic --overwrite \
		--weights csdiff=$(DEMO)/train/csdiff-tiny --config csdiff=baselines/configs/csdiff-tiny.yaml \
		--sweep "$(NFE_SWEEP)" --limit $(NFE_LIMIT) --skip-missing --out $(OUT)/bench-nfe
	$(BIN)/cmsrd-bench report $(OUT)/bench-nfe --out $(OUT)/report-nfe
	@echo; echo "points: $(OUT)/report-nfe/figures/quality_vs_nfe.csv   report: $(OUT)/report-nfe/index.html"
	@cat $(OUT)/report-nfe/figures/quality_vs_nfe.csv

dataset-synthetic: install
	$(BIN)/cmsrd build manifests/presets/cmsrd-synthetic.yaml --out $(OUT)/cmsrd-synthetic

dataset-real: install
	$(BIN)/cmsrd build manifests/presets/cmsrd-real.yaml --out $(OUT)/cmsrd-real

# Benchmark a built dataset (the demo's by default) with every method whose weights are at hand.
BENCH_DATA ?= $(DEMO)/demo-real
BENCH_METHODS ?= all-available
BENCH_ARGS ?=
bench: install
	$(BIN)/cmsrd-bench run --data $(BENCH_DATA) --methods $(BENCH_METHODS) $(BENCH_WEIGHTS) \
		--skip-missing $(BENCH_ARGS) --out $(OUT)/bench

report: install
	$(BIN)/cmsrd-bench report $(OUT)/bench --out $(OUT)/report --print

# Reliability figures of the build under injected faults, kill -9 + resume and a lost Dask worker (~20 min on
# 2 cores): perf/reliability.py prints ok/failed counts with reasons and the differences to a clean build.
RELIABILITY_ARGS ?=
reliability: install
	$(BIN)/python perf/reliability.py --out $(OUT)/reliability $(RELIABILITY_ARGS)

clean:
	rm -rf $(OUT)
