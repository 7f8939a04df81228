"""docs/cli-reference.md is generated from the dataclasses' field docs; ``train --help`` is short and grouped."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from hf_llama_strategies import cli
from hf_llama_strategies.cli.config import ARGUMENT_CLASSES
from hf_llama_strategies.cli.reference import key_groups, markdown_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_committed_reference_is_the_generators_output():
    with open(os.path.join(ROOT, "docs", "cli-reference.md"), encoding="utf-8") as fh:
        assert fh.read() == markdown_reference(), "run: python tools/cli_reference.py"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cli_reference.py"), "--check"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr


def test_every_key_the_parser_accepts_is_in_exactly_one_group():
    listed = [f.name for _, _, fields in key_groups() for f in fields]
    accepted = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
    assert sorted(listed) == sorted(set(listed)) and set(listed) == accepted


def test_train_help_is_short_and_lists_strategy_keys_first(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    own = sum(len(fields) for name, _, fields in key_groups() if name != "TrainingArguments")
    groups = sum(1 for _ in key_groups())
    usage = len(cli.app._USAGE.splitlines()) + 1
    # The usage, one line a key of ours, a title and a blank line a group, the Trainer's key names (3-4 lines).
    assert len(out.splitlines()) <= usage + own + 2 * groups + 8
    keys = out[out.index("keys (in the YAML file"):]  # after the usage, which names a few keys itself
    assert keys.index("trainable_layers") < keys.index("model_name_or_path") < keys.index("learning_rate")
    assert "docs/cli-reference.md" in out
    assert cli.main(["train", "--help-all"]) == 0
    assert len(capsys.readouterr().out.splitlines()) > 300  # every TrainingArguments key with its help
