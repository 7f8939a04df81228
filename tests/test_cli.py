"""The hf-llama-strategies command: train, plan, plugins, and its refusals (exit code 2, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import base_config, make_training_args, write_yaml
from transformers import TrainerCallback

from hf_llama_strategies import StrategyArguments, StrategyTrainer, cli
from hf_llama_strategies.cli.config import given
from hf_llama_strategies.errors import InvalidArgumentError
from hf_llama_strategies.memory.static import estimate_memory


def test_train_classification_from_yaml_leaves_model_plan_metrics_and_logs(tmp_path, tiny_config_dir, cls_files):
    out = tmp_path / "run"
    config = base_config(
        tiny_config_dir, out, train_file=cls_files[0], validation_file=cls_files[1], trainable_layers="-1:"
    )
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    for name in ("config.json", "model.safetensors", "strategy_plan.json", "tokenizer.json", "all_results.json",
                 "train_results.json", "eval_results.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    assert saved["id2label"] == {"0": "negative", "1": "positive"}
    plan = json.loads((out / "strategy_plan.json").read_text())
    assert plan["strategy_args"]["trainable_layers"] == "-1:"
    events = [f for _, _, files in os.walk(out / "runs") for f in files if f.startswith("events.out.tfevents")]
    assert events, "TensorBoard event file expected under output_dir/runs"


def test_command_line_keys_override_the_file(tmp_path, tiny_config_dir, lm_file):
    out = tmp_path / "run"
    config = base_config(tiny_config_dir, out, train_file=lm_file, validation_split=0.2, trainable_layers="all")
    path = write_yaml(tmp_path / "c.yaml", config)
    assert cli.main(["train", path, "--trainable_layers=-2:", "--max_steps", "2"]) == 0
    plan = json.loads((out / "strategy_plan.json").read_text())
    assert plan["strategy_args"]["trainable_layers"] == "-2:"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert "perplexity" in json.loads((out / "eval_results.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"trainable_layer": "-2:"}, "unknown key 'trainable_layer'; did you mean 'trainable_layers'"),
        ({"learning_rat": 1e-3}, "did you mean 'learning_rate'"),
        ({"train_file": "does/not/exist.csv"}, "train_file='does/not/exist.csv' is not valid"),
        ({"text_column": "sentence"}, "text_column='sentence' is not valid: expected a column of"),
        ({"trainable_layers": "7:"}, "it has 3 layers"),
        ({"trainable_modules": "attention"}, "Valid module names"),
        ({"task": "translation"}, "task='translation' is not valid"),
        ({"model_config": None}, "exactly one of model_name_or_path"),
        ({"num_train_epochs": "many"}, "num_train_epochs"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    tmp_path, tiny_config_dir, cls_files, capsys, change, fragment
):
    out = tmp_path / "run"
    config = base_config(tiny_config_dir, out, train_file=cls_files[0], validation_file=cls_files[1])
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-llama-strategies: error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_output_dir_is_left_untouched(tmp_path, tiny_config_dir, cls_files, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    config = base_config(tiny_config_dir, out, train_file=cls_files[0], validation_file=cls_files[1])
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"precious"


def test_plan_prints_table_and_memory_with_no_weights(tmp_path, tiny_config_dir, capsys):
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir, "trainable_layers": "-1:"})
    png = tmp_path / "plan.png"
    assert cli.main(["plan", path, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "layers.0-1" in out and "memory estimate" in out and "optimizer state" in out
    assert "(adamw_torch_fused)" in out and "assumed" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "trainer_output").exists()


@pytest.mark.slow
def test_plan_of_shipped_llama3_70b_config_runs_on_meta_device():
    code = (
        "import resource, time; t = time.time();"
        "from hf_llama_strategies import cli;"
        "plan = cli.run_plan(cli.load_config_file(cli.CONFIGS_DIR + '/llama3-70b.yaml'));"
        "print('PARAMS', plan.num_parameters, plan.num_layers)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PARAMS 70553706496 80" in result.stdout
    assert "layers.72-79" in result.stdout


def test_memory_estimate_within_ten_percent_of_a_real_run(tmp_path, lm_dataset):
    from tiny_models import tiny_model

    measured = {}

    class Measure(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            measured["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
            measured["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                    if p.grad is not None)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            from hf_llama_strategies.training.optimizer import optimizer_state_bytes

            measured["state"] = optimizer_state_bytes(optimizer)

    model = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path, max_steps=1), train_dataset=lm_dataset,
        callbacks=[Measure()], strategy_args=StrategyArguments(trainable_layers="-2:", print_plan=False),
    )
    trainer.train()
    estimate = estimate_memory(trainer.strategy_plan, "adamw_torch")
    real = measured["weights"] + measured["grads"] + measured["state"]
    assert abs(estimate.total - real) / real < 0.10, (estimate, measured)
    assert sum(estimate.gradients.values()) == measured["grads"]


def test_plugins_command_lists_builtins(capsys):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "hf_llama_strategies.strategies.freezing" in out and "built-in" in out
    assert "hfls_plan_parameters" in out


@pytest.mark.slow
def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "hf_llama_strategies", "train", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "  trainable_layers  " in result.stdout and "  model_config  " in result.stdout  # one line a key


def test_overrides_without_a_config_run_the_demo_and_come_before_the_config(tmp_path, tiny_config_dir, cls_files):
    # No config: the bundled demo with overrides (the first --key is not taken for a file name).
    parsed = cli.parse_config(dict(cli.DEMO_CONFIG), ["--learning_rate", "0.001", "--max_steps", "-1"])
    assert parsed[2].learning_rate == 0.001 and parsed[2].max_steps == -1
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir, "trainable_layers": "-1:"})
    assert cli.main(["plan", path, "--num_train_epochs", "1"]) == 0
    assert cli.main(["plan", "--num_train_epochs", "1"]) == 2  # plan needs a file


def test_yaml_values_keep_their_types(tiny_config_dir):
    config = {
        "model_config": tiny_config_dir, "trainable_modules": ["mlp", "self_attn"], "report_to": [],
        "frozen_params": ["-?bias$"], "lr_rules": ["mlp=x0.5"], "train_head": False, "learning_rate": "5e-5",
        "strategy_options": {"freeze_bias": False},
    }
    _, _, training, strategy, _ = cli.parse_config(config, ["--report-to", "none"])
    assert strategy.trainable_modules == "mlp,self_attn"
    assert strategy.frozen_params == ["-?bias$"]
    assert strategy.lr_rules == ["mlp=x0.5"]
    assert strategy.train_head is False
    assert strategy.strategy_options == {"freeze_bias": False}
    assert training.learning_rate == 5e-5
    assert given("report_to", {}, ["--report-to", "none"])


def test_resume_true_means_the_last_checkpoint(tmp_path, tiny_config_dir):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}), encoding="utf-8")
        save_file({"w": torch.zeros(2)}, str(ckpt / "model.safetensors"))
        torch.save({}, ckpt / "optimizer.pt")
        torch.save({}, ckpt / "scheduler.pt")
    (out / "checkpoint-6").mkdir()  # an interrupted save: skipped
    base = {"model_config": tiny_config_dir, "output_dir": str(out)}
    training = cli.parse_config(dict(base, resume_from_checkpoint=True))[2]
    assert training.resume_from_checkpoint == str(out / "checkpoint-4")
    assert cli.parse_config(dict(base), ["--resume_from_checkpoint", "false"])[2].resume_from_checkpoint is None
    # A run killed before it wrote anything left no output_dir: resuming it trains from the start.
    _, _, training, _, run = cli.parse_config(
        dict(base, output_dir=str(tmp_path / "empty"), resume_from_checkpoint="true")
    )
    assert training.resume_from_checkpoint is None and run.restart_interrupted
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match="No complete checkpoint-"):
        cli.parse_config(dict(base, output_dir=str(tmp_path / "other"), resume_from_checkpoint="true"))
    with pytest.raises(InvalidArgumentError, match="No such directory"):
        cli.parse_config(dict(base, resume_from_checkpoint=str(tmp_path / "nope")))


def test_unknown_command_and_usage(capsys):
    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and "commands:" in capsys.readouterr().out
