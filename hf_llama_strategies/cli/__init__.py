"""The ``hf-llama-strategies`` command line: config parsing, output-folder safety, the commands, LLaMA-Factory YAMLs.

``config`` parses and checks a flat YAML (and ``--key value`` overrides); ``llamafactory``
translates a LLaMA-Factory YAML into one; ``output_dir`` keeps an earlier run's files safe;
``models`` loads the model and tokenizer, ``gguf`` converts a GGUF file into a model folder (once,
cached); ``train``, ``plan``, ``compare`` (with ``candidates``, ``compare_runs`` and
``compare_report``), ``chat`` and ``app`` are the commands.
"""

from .app import main, run_plugins
from .compare import run_compare
from .config import load_config_file, parse_config
from .demo import CONFIGS_DIR, DEMO_CONFIG, DEMO_DIR, DEMO_SFT_CONFIG, DEMO_SFT_DIR
from .plan import run_plan
from .train import run_train

__all__ = [
    "CONFIGS_DIR",
    "DEMO_CONFIG",
    "DEMO_DIR",
    "DEMO_SFT_CONFIG",
    "DEMO_SFT_DIR",
    "load_config_file",
    "main",
    "parse_config",
    "run_compare",
    "run_plan",
    "run_plugins",
    "run_train",
]
