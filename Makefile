# cmsrd: one virtual environment at .venv, created or reused by every target that needs it.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
PYTEST_ARGS ?=

.PHONY: install test demo dataset-synthetic dataset-real bench report clean

install: $(STAMP)

# Pinned, resolved once (requirements/lock.txt); --no-deps keeps pyiqa's unneeded extras out
# (see ../shared/reference/environment.md). torch/torchvision 2.14.1/0.29.1 come from local disk.
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps -r requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check || true
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m cmsrd.demo --out $(OUT)/demo

dataset-synthetic: install
	$(BIN)/cmsrd build manifests/presets/cmsrd-synthetic.yaml --out $(OUT)/cmsrd-synthetic

dataset-real: install
	$(BIN)/cmsrd build manifests/presets/cmsrd-real.yaml --out $(OUT)/cmsrd-real

bench: install
	$(BIN)/cmsrd-bench run --data $(OUT)/demo/demo-real --methods all-available --out $(OUT)/bench

report: install
	$(BIN)/cmsrd-bench report $(OUT)/bench --out $(OUT)/report

clean:
	rm -rf $(OUT)
