"""Shared fixtures: tiny datasets, a tiny model config, demo data files, the demo tokenizer.

What tests share that is not a fixture lives in ``helpers.py``.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

from helpers import TokenDataset, lm_run_config, write_yaml  # noqa: E402  (after the offline settings above)
from transformers import AutoTokenizer, LlamaConfig  # noqa: E402

from hf_llama_strategies.cli.demo import DEMO_DIR  # noqa: E402


@pytest.fixture
def lm_dataset() -> TokenDataset:
    return TokenDataset()


@pytest.fixture
def cls_dataset() -> TokenDataset:
    return TokenDataset(num_labels=3)


@pytest.fixture
def tiny_config_dir(tmp_path) -> str:
    """A saved config (no weights) of a 3-layer Llama over the demo tokenizer's vocabulary."""
    path = tmp_path / "tiny-llama"
    LlamaConfig(
        vocab_size=106, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    ).save_pretrained(path)
    return str(path)


@pytest.fixture
def cls_files(tmp_path) -> tuple[str, str]:
    """Train (40 rows) and validation (16 rows) CSV files cut from the demo's classification data."""
    rows = list(csv.reader(open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8")))
    train, valid = tmp_path / "train.csv", tmp_path / "valid.csv"
    for path, part in ((train, rows[1:41]), (valid, rows[41:57])):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([rows[0], *part])
    return str(train), str(valid)


@pytest.fixture
def lm_file(tmp_path) -> str:
    """A JSON-lines corpus (``{"text": ...}``) of 59 demo texts."""
    path = tmp_path / "corpus.jsonl"
    rows = list(csv.reader(open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8")))[1:60]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text, _ in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    """The demo tokenizer (the TRL tests use it; ``test_sft.py`` has its own)."""
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch) -> str:
    """``$HF_HOME`` in ``tmp_path``: GGUF files convert into ``<it>/hf_llama_strategies/gguf``; returns that."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    return str(tmp_path / "hf_home" / "hf_llama_strategies" / "gguf")


@pytest.fixture
def tiny_gguf(tmp_path, gguf_cache) -> str:
    """A tiny Llama written as a GGUF file (see ``helpers.write_tiny_gguf``), with the GGUF cache in tmp_path."""
    pytest.importorskip("gguf")
    from helpers import write_tiny_gguf

    path = tmp_path / "models" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return str(path)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """One uninterrupted CLI run of 6 steps with checkpoints 2, 4, 6: the result every resume must reach."""
    from hf_llama_strategies import cli

    base = tmp_path_factory.mktemp("reference")
    cfg_dir = base / "tiny"
    LlamaConfig(
        vocab_size=106, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
    ).save_pretrained(cfg_dir)
    rows = list(csv.reader(open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8")))[1:60]
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows), encoding="utf-8")
    out = base / "run"
    config = lm_run_config(str(cfg_dir), str(corpus), out)
    assert cli.main(["train", write_yaml(base / "c.yaml", config)]) == 0
    return {"config_dir": str(cfg_dir), "corpus": str(corpus), "out": out, "config": config}
