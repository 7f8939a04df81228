"""Every code block of the documentation runs (or is marked as needing what the tests lack), so none goes stale.

A fenced block's language decides: ``python`` runs in a fresh namespace holding a tiny ``model``,
``tokenizer`` and ``ds``; ``bash`` / ``sh`` / ``shell`` runs each ``hf-llama-strategies`` line through
the CLI from the repository root (a ``train`` line for one step, into a temporary output_dir); ``yaml``
must load. A block without a language is printed output, shown, not run. A block that needs what the
tests lack is marked on the line just above its fence, with its reason, e.g.
``<!-- docs-test: skip (needs a GPU) -->``; the reason must name one of ``REASONS``.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass

import pytest
import yaml

from hf_llama_strategies import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(os.path.join(folder, name), ROOT)
    for folder, _, names in os.walk(os.path.join(ROOT, "docs")) for name in names if name.endswith(".md")
)
MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->")
REASONS = ("a GPU", "the Hub", "the real model", "several processes", "an installed package", "a synopsis",
           "an install or make target")
SHELL = ("bash", "sh", "shell", "console")
TRAIN_QUICK = ["--max_steps", "1", "--eval_strategy", "no", "--max_eval_samples", "8", "--save_strategy", "no",
               "--disable_tqdm", "true", "--report_to", "none"]


@dataclass
class Block:
    page: str
    line: int
    language: str
    code: str
    skip: str | None


def extract(text: str, page: str) -> list[Block]:
    """The fenced blocks of a Markdown page, with the skip marker on the line above each (if any)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        marker = MARKER.search(lines[i - 1]) if i else None
        blocks.append(Block(page, i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]),
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


def _blocks() -> list[Block]:
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
            found += extract(fh.read(), page)
    return [b for b in found if b.language]  # no language: printed output


PRELUDE = '''
import datasets, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tokenizer = AutoTokenizer.from_pretrained({demo!r})
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
ds = datasets.Dataset.from_dict({{"input_ids": [[5, 6, 7, 8]] * 8, "labels": [[5, 6, 7, 8]] * 8}})
# What a page's fragment takes from the script around it: the usual imports and TrainingArguments.
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments
from hf_llama_strategies import *
training_args = TrainingArguments(output_dir="out", max_steps=1, per_device_train_batch_size=4, report_to="none",
                                  save_strategy="no", use_cpu=True)
config, strategy = model.config, StrategyArguments(trainable_layers="-2:", precision="auto")
'''


def run_block(block: Block, tmp_path) -> None:
    """Run one block as the module docstring says; a failure raises."""
    if block.language == "python":
        demo = os.path.join(ROOT, "hf_llama_strategies", "assets", "demo", "sft")
        namespace: dict = {}
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            exec(compile(PRELUDE.format(demo=demo) + block.code, f"{block.page}:{block.line}", "exec"), namespace)
        finally:
            os.chdir(cwd)
    elif block.language in SHELL:
        runs = 0
        for line in block.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            assert words[0] == "hf-llama-strategies", f"{block.page}:{block.line}: mark or run {line!r}"
            # Each train line its own output_dir, but a rerun with --overwrite_output_dir the one before it.
            runs += "--overwrite_output_dir" not in words
            out = ["--output_dir", str(tmp_path / f"run-{runs}")]
            args = words[1:] + (TRAIN_QUICK + out if words[1] == "train" else [])
            cwd = os.getcwd()
            os.chdir(ROOT)
            try:
                assert cli.main(args) == 0, f"{block.page}:{block.line}: {line}"
            finally:
                os.chdir(cwd)
    elif block.language == "yaml":
        yaml.safe_load(block.code)


@pytest.mark.slow
@pytest.mark.parametrize("block", _blocks(), ids=lambda b: f"{b.page}:{b.line}")
def test_every_documented_block_runs(block, tmp_path):
    if block.skip is not None:
        assert any(reason in block.skip for reason in REASONS), f"say why it cannot run here: {REASONS}"
        pytest.skip(f"{block.page}:{block.line}: {block.skip}")
    run_block(block, tmp_path)


def test_the_extractor_runs_blocks_and_honours_markers(tmp_path):
    page = (
        "```python\nassert model.config.num_hidden_layers == 3\nraise ValueError('stale')\n```\n"
        "<!-- docs-test: skip (needs a GPU) -->\n```python\ntorch.cuda.synchronize()\n```\n"
        "```\nprinted output\n```\n```bash\nmake demo\n```\n"
    )
    stale, gpu, output, make = extract(page, "t.md")
    assert (gpu.skip, output.language, make.language) == ("needs a GPU", "", "bash")
    with pytest.raises(ValueError, match="stale"):
        run_block(stale, tmp_path)
    with pytest.raises(AssertionError, match="mark or run"):
        run_block(make, tmp_path)
