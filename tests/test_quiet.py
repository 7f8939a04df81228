"""Quiet runs: no word from a package the run does not use, each note once."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from hf_llama_strategies.cli.quiet import quiet_run

_IMPORT_DEEPSPEED = "import deepspeed\nfrom deepspeed.accelerator import get_accelerator\nget_accelerator()\n"


def _output_of(code: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # DeepSpeed warns only when it finds no GPU
    env.pop("DS_ACCELERATOR", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr  # DeepSpeed logs to standard output


@pytest.mark.slow
def test_unused_deepspeed_says_nothing_but_a_run_using_it_keeps_its_words():
    pytest.importorskip("deepspeed")
    warning = "Setting accelerator to CPU"
    assert warning in _output_of(_IMPORT_DEEPSPEED)  # what accelerate's import of DeepSpeed prints without us
    quiet = "from types import SimpleNamespace as N\nfrom hf_llama_strategies.cli.quiet import quiet_run\n"
    assert warning not in _output_of(quiet + "quiet_run(N(deepspeed=None))\n" + _IMPORT_DEEPSPEED)
    assert warning in _output_of(quiet + "quiet_run(N(deepspeed='ds.json'))\n" + _IMPORT_DEEPSPEED)


def test_quiet_run_adds_each_filter_once():
    import logging

    before = len(logging.getLogger("DeepSpeed").filters)
    for _ in range(3):
        quiet_run(types.SimpleNamespace(deepspeed=None))
    assert len(logging.getLogger("DeepSpeed").filters) <= before + 1


@pytest.mark.slow
def test_a_bf16_demo_run_on_the_cpu_says_use_cpu_once(tmp_path):
    # The precision decision's note is in the plan table; it was also logged twice (the plan note, and the
    # in-place change of the CLI's own TrainingArguments).
    code = (
        "import sys\nfrom hf_llama_strategies.cli import main\n"
        f"sys.exit(main(['train', '--max_steps', '1', '--output_dir', {str(tmp_path / 'run')!r}, '--precision', "
        "'bf16', '--disable_tqdm', 'true', '--eval_strategy', 'no', '--max_eval_samples', '8']))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    both = done.stdout + done.stderr
    assert both.count("use_cpu set to true") == 1, both
    assert "changed in place" not in both and "Setting accelerator to CPU" not in both
