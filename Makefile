# Entry points, each installing what it needs into .venv on first use:
#   make demo   the main job: `hf-llama-strategies train` with no config runs the bundled offline demo
#   make demo-sft  its instruction-tuning variant: `hf-llama-strategies train --task sft`
#   make test   run the whole test suite
#   make lint   ruff check . (CI runs it before the tests)
#   make docs   the documentation site into site/ (mkdocs build --strict; offline)
#   make bench  speed and memory against a plain Trainer (benchmarks/speed_memory.py, ~10 min)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Which torch: pip installs the build the configured package index serves. From the standard
# index on Linux, torch==2.13.0 is the CUDA build (with multi-GB NVIDIA packages); the CPU build
# comes from PyTorch's CPU wheel index (the PyTorch install page lists each build's index):
#   make demo TORCH_INDEX=<that index URL>     or another version: make demo TORCH_SPEC="torch==2.13.*"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo demo-sft test lint docs bench clean

$(STAMP): pyproject.toml examples/hfls-plugin-example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, the build TORCH_SPEC / TORCH_INDEX choose (above): the rest then keeps it.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	# The example third-party plugin: the test suite checks that it is discovered.
	$(BIN)/python -m pip install --quiet -e examples/hfls-plugin-example
	# The optional integrations, so that their tests run here (each skips without its extra).
	$(BIN)/python -m pip install --quiet -e ".[trl,peft]"
	# DeepSpeed ships as sources: built without isolation against the CPU torch above (an
	# isolated build would pull a multi-GB CUDA torch), with no op compiled ahead.
	$(BIN)/python -m pip install --quiet setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[deepspeed]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-llama-strategies train

demo-sft: $(STAMP)
	$(BIN)/hf-llama-strategies train --task sft

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --quiet

bench: $(STAMP)
	$(BIN)/python benchmarks/speed_memory.py

clean:
	rm -rf $(VENV) outputs
