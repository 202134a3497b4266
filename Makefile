# The README's two commands are `make book` and `make test`; the other targets help while writing the book.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# torch on Linux from PyPI is a multi-GB CUDA build: without an NVIDIA GPU take PyTorch's CPU build instead.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
PRESET ?= cpu
RUN_DIR ?= runs/$(PRESET)
export HF_HUB_OFFLINE ?= 1

.PHONY: book test venv lab export readme clean

venv: $(BIN)/.installed

# torch first, alone: a wheel already on this machine (pip's find-links) if there is one, else the CPU index.
# Then the package with the versions that were tested (constraints.txt).
$(BIN)/.installed: settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps --no-index torch==$(TORCH_VERSION) 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet --no-deps torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

book: venv
	$(BIN)/llmbook run --preset $(PRESET) --run-dir $(RUN_DIR)
	$(BIN)/llmbook site --preset $(PRESET) --run-dir $(RUN_DIR)

test: venv
	$(BIN)/python -m pytest -q tests

lab: venv
	$(BIN)/jupyter lab nbs

# after editing notebooks: export the package, strip the notebooks, render the README
export: venv
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(MAKE) readme

readme: venv
	$(BIN)/llmbook readme

clean:
	rm -rf $(VENV) runs *.egg-info
