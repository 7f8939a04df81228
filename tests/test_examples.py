"""Every example runs: each YAML through the CLI on a few steps, the example script, the plugin package."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from hf_llama_strategies import StrategyArguments, build_plan, cli
from hf_llama_strategies.core.plugins import describe_plugins, get_plugin_manager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_YAMLS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))


def test_there_are_examples():
    assert len(EXAMPLE_YAMLS) >= 3


@pytest.mark.parametrize("path", EXAMPLE_YAMLS, ids=os.path.basename)
def test_example_yaml_trains_a_few_steps(tmp_path, path):
    out = tmp_path / "out"
    overrides = [f"--output_dir={out}", "--max_steps=2", "--use_cpu=true", "--disable_tqdm=true",
                 "--max_train_samples=32", "--max_eval_samples=16", "--report_to=none"]
    assert cli.main(["train", path, *overrides]) == 0
    plan = json.loads((out / "strategy_plan.json").read_text())
    assert plan["num_trainable"] > 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_transformers_style_script(tmp_path):
    demo = cli.DEMO_DIR
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "run_classification.py"),
         "--model_config", demo, "--tokenizer_name", demo,
         "--train_file", os.path.join(demo, "train.csv"), "--validation_file", os.path.join(demo, "validation.csv"),
         "--output_dir", str(tmp_path), "--max_steps", "2", "--use_cpu", "--report_to", "none",
         "--trainable_layers=-1:", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "strategy_plan.json").read_text())
    assert plan["strategy_args"]["trainable_layers"] == "-1:"
    assert "eval_accuracy" in json.loads((tmp_path / "eval_results.json").read_text())


def test_example_plugin_package_is_installed_and_discovered():
    rows = {r["name"]: r for r in describe_plugins(get_plugin_manager())}
    assert "freeze_bias" in rows, "examples/hfls-plugin-example is not installed: `make test` installs it"
    assert rows["freeze_bias"]["source"] == "hfls-plugin-example 0.1.0"
    assert rows["freeze_bias"]["hooks"] == ["hfls_plan_parameters", "hfls_validate_arguments"]


def test_example_plugin_strategy_works_through_options():
    from tiny_models import tiny_model

    model = tiny_model("gpt2")
    plain = build_plan(model)
    no_bias = build_plan(model, StrategyArguments(strategy_options={"freeze_bias": True}))
    biases = [n for n in plain.decisions if n.endswith(".bias")]
    assert biases and all(
        not no_bias[n].trainable and no_bias[n].reason.startswith("freeze_bias plugin") for n in biases
    )
    assert [n for n in plain.trainable_names() if not n.endswith(".bias")] == no_bias.trainable_names()
    # The installed plugin checks its option when a run starts (StrategyArguments loads no plugin).
    with pytest.raises(ValueError, match=r"strategy_options.freeze_bias='yes'"):
        build_plan(model, StrategyArguments(strategy_options={"freeze_bias": "yes"}))


@pytest.mark.slow
def test_python_api_example(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "python_api.py"), "--output_dir", str(tmp_path),
         "--max_steps", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval loss" in result.stdout
    assert (tmp_path / "strategy_plan.json").is_file() and (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_identity_demo_trains_and_chats_on_a_tiny_gguf_model(tmp_path, gguf_cache, capsys):
    """`make demo`'s two commands, with a tiny 8-layer GGUF Llama standing in for SmolLM2 (2 steps)."""
    pytest.importorskip("gguf")
    from helpers import write_tiny_gguf

    model, out = str(tmp_path / "tiny.gguf"), tmp_path / "identity"
    write_tiny_gguf(model, layers=8)
    demo = os.path.join(ROOT, "examples", "identity")
    assert cli.main(["train", os.path.join(demo, "identity.yaml"), "--model_name_or_path", model,
                     "--output_dir", str(out), "--max_steps=2", "--disable_tqdm=true", "--use_cpu=true"]) == 0
    plan = json.loads((out / "strategy_plan.json").read_text())
    assert plan["strategy_args"]["trainable_layers"] == "-6:" and plan["settings"]["frozen_prefix_cache"]
    capsys.readouterr()
    questions = os.path.join(demo, "questions.txt")
    assert cli.main(["chat", str(out), "--compare", model, "--prompts", questions, "--max_new_tokens", "3"]) == 0
    printed = capsys.readouterr().out
    prompts = [line for line in open(questions, encoding="utf-8").read().splitlines() if line and line[0] != "#"]
    assert printed.count("\n> ") + printed.startswith("> ") == len(prompts) == printed.count("  base : ")
