"""Nothing lost, no traceback: crash-safe checkpoints, safe output_dir, every bad input refused.

A killed CLI run resumes to the uninterrupted result; every refused or failed run leaves
output_dir and its earlier checkpoints byte-identical; bad input is exit 2 and one line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    TokenDataset,
    assert_same_weights,
    base_config,
    copy_run,
    lm_run_config,
    make_training_args,
    one_line_error,
    snapshot,
    strategy,
    tree,
    weights,
    write_yaml,
)

from hf_llama_strategies import StrategyArguments, StrategyTrainer, cli
from hf_llama_strategies.core.hookspecs import hookimpl
from hf_llama_strategies.core.plugins import get_plugin_manager
from hf_llama_strategies.errors import InvalidArgumentError, PluginError, StrategyError
from hf_llama_strategies.training.checkpoints import checkpoint_problem, latest_complete_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- kills --------------------------------------------------------------------------------------

_KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from transformers import Trainer
    import safetensors.torch

    point, step = os.environ["KILL_POINT"], int(os.environ["KILL_STEP"])
    real_weights, real_optim = safetensors.torch.save_file, Trainer._save_optimizer_and_scheduler

    def half_weights(tensors, filename, metadata=None):
        real_weights(tensors, filename, metadata=metadata)
        if point == "weights" and f"checkpoint-{step}" in filename:
            size = os.path.getsize(filename)
            with open(filename, "r+b") as fh:  # as if killed halfway through the write
                fh.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    def optimizer_then_die(self, output_dir):
        if point == "optimizer" and self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_optim(self, output_dir)

    real_rmtree, real_save_model, real_log_save = shutil.rmtree, Trainer.save_model, Trainer._maybe_log_save_evaluate

    def rmtree_halfway(path, *args, **kwargs):
        if point == "rotation" and os.path.basename(str(path)) == "checkpoint-2":
            for name in ("trainer_state.json", "model.safetensors"):
                os.remove(os.path.join(path, name))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    def save_model_then_die(self, output_dir=None, _internal_call=False):
        real_save_model(self, output_dir, _internal_call)
        if point == "final" and output_dir is None:
            os.kill(os.getpid(), signal.SIGKILL)

    def log_save_or_die(self, *args, **kwargs):
        if point == "step" and self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_log_save(self, *args, **kwargs)

    shutil.rmtree = rmtree_halfway
    Trainer.save_model = save_model_then_die
    Trainer._maybe_log_save_evaluate = log_save_or_die
    safetensors.torch.save_file = half_weights
    import transformers.modeling_utils as mu
    if hasattr(mu, "safe_save_file"):
        mu.safe_save_file = half_weights
    Trainer._save_optimizer_and_scheduler = optimizer_then_die
    from hf_llama_strategies import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _kill_run(tmp_path, config, point, step):
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", config)
    env = dict(os.environ, KILL_POINT=point, KILL_STEP=str(step),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _KILLER, "train", path], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    return out, path


@pytest.mark.slow
@pytest.mark.parametrize("point", ["optimizer"])  # "weights" (a truncated weights file) works alike; kept short
def test_sigkill_while_a_checkpoint_is_written_resumes_to_the_uninterrupted_result(tmp_path, reference, point, capsys):
    config = lm_run_config(reference["config_dir"], reference["corpus"], tmp_path / "run")
    out, path = _kill_run(tmp_path, config, point, step=4)
    # The interrupted save never became a checkpoint-4: only its hidden staging folder is left, and
    # the killed run's lock file (the kernel released the lock itself).
    assert sorted(os.listdir(out)) == [".hf-llama-strategies.lock", ".tmp-checkpoint-4", "checkpoint-2",
                                       "strategy_plan.json"]
    assert checkpoint_problem(str(out / "checkpoint-2")) is None
    before = tree(out / "checkpoint-2")
    assert cli.main(["train", path, "--resume_from_checkpoint", "true"]) == 0
    assert "took over the lock of output_dir" in capsys.readouterr().out
    assert not (out / ".hf-llama-strategies.lock").exists()
    assert_same_weights(out, reference["out"])
    assert_same_weights(out / "checkpoint-6", reference["out"] / "checkpoint-6")
    assert tree(out / "checkpoint-2") == before
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))


@pytest.mark.slow
@pytest.mark.parametrize("point, step, limit", [("step", 1, None), ("rotation", 6, 2), ("final", 6, None)])
def test_sigkill_before_the_first_checkpoint_in_rotation_or_final_save_resumes_to_the_same_result(
    tmp_path, reference, point, step, limit, capsys
):
    extra = {"save_total_limit": limit} if limit else {}
    config = lm_run_config(reference["config_dir"], reference["corpus"], tmp_path / "run", **extra)
    out, path = _kill_run(tmp_path, config, point, step)
    assert cli.main(["train", path, "--resume_from_checkpoint", "true"]) == 0
    assert_same_weights(out, reference["out"])
    if point == "step":
        assert "interrupted before its first complete checkpoint" in capsys.readouterr().out
    if point == "rotation":
        # Killed while rotating checkpoint-2 away: the half-deleted one is set aside, complete ones stay.
        assert sorted(n for n in os.listdir(out) if "checkpoint-" in n) == [
            "checkpoint-4", "checkpoint-6", "incomplete-checkpoint-2"]
    if point in ("rotation", "final"):
        # Killed after the last checkpoint: no extra step (transformers would train a 7th on resume).
        assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_resume_true_skips_a_half_written_checkpoint_and_names_it(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    os.remove(out / "checkpoint-4" / "trainer_state.json")  # killed mid-save by an older version
    found, skipped = latest_complete_checkpoint(str(out))
    assert found == str(out / "checkpoint-2") and skipped[0][0] == str(out / "checkpoint-4")
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, resume_from_checkpoint=True)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    assert "skipped incomplete checkpoint-4 (no trainer_state.json" in capsys.readouterr().out
    assert_same_weights(out, reference["out"])
    # The half-written one is kept aside, not deleted.
    assert (out / "incomplete-checkpoint-4" / "model.safetensors").is_file()


def _break(kind):
    def apply(ckpt):
        if kind == "no_state":
            os.remove(ckpt / "trainer_state.json")
        elif kind == "bad_state":
            (ckpt / "trainer_state.json").write_text('{"global_step": 4,', encoding="utf-8")
        elif kind == "bad_plan":
            (ckpt / "strategy_plan.json").write_text("{not json", encoding="utf-8")
        elif kind == "truncated_weights":
            data = (ckpt / "model.safetensors").read_bytes()
            (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif kind == "no_weights":
            os.remove(ckpt / "model.safetensors")
        elif kind == "no_optimizer":
            os.remove(ckpt / "optimizer.pt")
        elif kind == "no_scheduler":
            os.remove(ckpt / "scheduler.pt")
        elif kind == "truncated_optimizer":
            data = (ckpt / "optimizer.pt").read_bytes()
            (ckpt / "optimizer.pt").write_bytes(data[:100])
        elif kind in ("wrong_step", "negative_step", "bad_log_history"):
            state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            state.update({"wrong_step": {"global_step": 99}, "negative_step": {"global_step": -4},
                          "bad_log_history": {"log_history": "junk"}}[kind])
            (ckpt / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return apply


DAMAGE = ["no_state", "bad_state", "bad_plan", "truncated_weights", "no_weights", "no_optimizer", "no_scheduler",
          "truncated_optimizer", "wrong_step", "negative_step", "bad_log_history"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_explicit_damaged_checkpoint_is_one_line_and_nothing_changes(tmp_path, reference, capsys, kind):
    out = copy_run(reference, tmp_path / "run")
    _break(kind)(out / "checkpoint-4")
    before = tree(out)
    config = lm_run_config(reference["config_dir"], reference["corpus"], out,
                           resume_from_checkpoint=str(out / "checkpoint-4"))
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    assert "checkpoint-4" in line and "cannot be resumed from" in line
    assert tree(out) == before


@pytest.mark.parametrize("change, fragment", [
    ({"learning_rate": 2e-3}, "learning_rate 0.001 -> 0.002"),
    ({"seed": 1}, "seed 0 -> 1"),
    ({"trainable_layers": "-1:"}, "trainable True -> False"),
])
def test_resume_with_a_changed_result_is_refused_before_anything_is_written(tmp_path, reference, capsys, change,
                                                                             fragment):
    out = copy_run(reference, tmp_path / "run")
    before = tree(out)
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, resume_from_checkpoint=True, **change)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    assert fragment in line, line
    assert tree(out) == before


def test_resume_from_an_older_checkpoint_would_overwrite_newer_ones_and_is_refused(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    before = tree(out)
    config = lm_run_config(reference["config_dir"], reference["corpus"], out,
                           resume_from_checkpoint=str(out / "checkpoint-2"))
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    assert "would write over the newer checkpoints checkpoint-4" in one_line_error(capsys)
    assert tree(out) == before


def test_allow_plan_change_with_new_rates_and_trainable_set_takes_effect(tmp_path, reference, capsys):
    # Another head_lr (the optimizer state maps: the new rate must be used) ...
    out = copy_run(reference, tmp_path / "rates")
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, resume_from_checkpoint=True,
                           allow_plan_change_on_resume=True, learning_rate=2e-3)
    assert cli.main(["train", write_yaml(tmp_path / "a.yaml", config)]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h and h["step"] == 5]
    # Linear decay over 6 steps: at step 5 the rate is base * (6 - 4) / 6 (logged after the step's update).
    assert lrs and math.isclose(lrs[0], 2e-3 * 2 / 6, rel_tol=1e-6), lrs
    # ... and another trainable set (state cannot map: reset with a message, no crash mid-load).
    out = copy_run(reference, tmp_path / "layers")
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, resume_from_checkpoint=True,
                           allow_plan_change_on_resume=True, trainable_layers="-1:", head_lr=5e-3)
    assert cli.main(["train", write_yaml(tmp_path / "b.yaml", config)]) == 0
    final, start = weights(out), weights(out / "checkpoint-4")
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(final["model.layers.2.mlp.up_proj.weight"], start["model.layers.2.mlp.up_proj.weight"])


# -- output_dir safety -------------------------------------------------------------------------


def test_overwrite_output_dir_moves_the_earlier_run_aside_whole_and_starts_fresh(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run", keep=("checkpoint-2", "checkpoint-4", "checkpoint-6"))
    (out / "notes.txt").write_text("mine", encoding="utf-8")  # one rule: unrelated files move with the run
    before = tree(out)
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, overwrite_output_dir=True,
                           save_total_limit=1)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    printed = capsys.readouterr().out
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.earlier-")]
    assert f"moved the earlier contents of {out} to {aside}" in printed
    assert tree(aside) == before  # every file of the earlier run, byte for byte
    # A fresh run: its own checkpoints only (rotation never saw the earlier ones), the same result.
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-6"]
    assert_same_weights(out, reference["out"])


def test_occupied_output_dir_is_refused_naming_the_options_that_work(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    before = tree(out)
    config = lm_run_config(reference["config_dir"], reference["corpus"], out)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    for fragment in ("already holds files (checkpoint-2, checkpoint-4)", "--resume_from_checkpoint true (from "
                     "checkpoint-4)", "--overwrite_output_dir true", "run.earlier-", "nothing is deleted",
                     "another --output_dir"):
        assert fragment in line, line
    assert tree(out) == before


def test_a_refused_run_with_overwrite_output_dir_puts_the_earlier_contents_back(tmp_path, reference, capsys):
    out = copy_run(reference, tmp_path / "run")
    before = tree(out)
    # A plan error found once the model is built, after the move: the run keeps nothing.
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, overwrite_output_dir=True,
                           trainable_layers="7:")
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    assert "it has 3 layers" in one_line_error(capsys)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "run"]


def test_overwrite_output_dir_never_moves_a_folder_holding_the_inputs(tmp_path, reference, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = lm_run_config(reference["config_dir"], reference["corpus"], ".", overwrite_output_dir=True)
    path = write_yaml(tmp_path / "c.yaml", config)
    before = tree(tmp_path)
    assert cli.main(["train", path]) == 2
    assert "holds the working directory" in one_line_error(capsys)
    assert tree(tmp_path) == before
    assert not [p for p in tmp_path.parent.iterdir() if ".earlier-" in p.name]


def test_staged_checkpoint_holds_exactly_the_trainers_files(tmp_path, lm_dataset):
    from tiny_models import tiny_model
    from transformers import Trainer

    names, best = {}, {}
    staged = {"strategy_args": strategy(precision="fp32")}  # an option set: StrategyTrainer's own saving
    for label, cls, extra in (("plain", Trainer, {}), ("strategy", StrategyTrainer, staged)):
        torch.manual_seed(0)
        args = make_training_args(tmp_path / label, max_steps=6, save_strategy="steps", save_steps=2,
                                  save_total_limit=1, eval_strategy="steps", eval_steps=2,
                                  load_best_model_at_end=True, metric_for_best_model="loss")
        trainer = cls(model=tiny_model("llama"), args=args, train_dataset=lm_dataset,
                      eval_dataset=TokenDataset(n=4, seed=1), **extra)
        trainer.train()
        names[label] = sorted(os.listdir(tmp_path / label))
        names[label + "/ckpt"] = {c: sorted(os.listdir(tmp_path / label / c)) for c in names[label]
                                  if c.startswith("checkpoint-")}
        best[label] = os.path.relpath(trainer.state.best_model_checkpoint, tmp_path / label)
    # Rotation and best-model tracking as the Trainer's; the same files, plus the plan.
    assert best["strategy"] == best["plain"]
    assert [n for n in names["strategy"] if n != "strategy_plan.json"] == names["plain"]
    for ckpt, files in names["plain/ckpt"].items():
        assert [n for n in names["strategy/ckpt"][ckpt] if n != "strategy_plan.json"] == files


# -- bad input: exit 2, one line, nothing written -----------------------------------------------


def _data_file(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


BAD_TRAINING = [
    ({"learning_rate": float("nan")}, "learning_rate=nan"),
    ({"learning_rate": float("inf")}, "learning_rate=inf"),
    ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
    ({"learning_rate": 0}, "learning_rate=0"),
    ({"learning_rate": [1, 2]}, "learning_rate=[1, 2]"),
    ({"learning_rate": None}, "learning_rate=None"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size=0"),
    ({"per_device_train_batch_size": -1}, "per_device_train_batch_size=-1"),
    ({"per_device_train_batch_size": 1e30}, "per_device_train_batch_size=1e+30"),
    ({"per_device_train_batch_size": True}, "per_device_train_batch_size=True"),
    ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size=0"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
    ({"max_steps": 0}, "max_steps=0"),
    ({"max_steps": -3}, "max_steps=-3"),
    ({"max_steps": -1, "num_train_epochs": -1}, "num_train_epochs=-1"),
    ({"max_steps": -1, "num_train_epochs": 0}, "num_train_epochs=0"),
    ({"weight_decay": float("nan")}, "weight_decay=nan"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"adam_beta1": 1.5}, "adam_beta1=1.5"),
    ({"adam_epsilon": 0}, "adam_epsilon=0"),
    ({"seed": -1}, "seed=-1"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm=nan"),
    ({"save_strategy": "steps", "save_steps": 0}, "save_steps=0"),
    ({"max_seq_length": 0}, "max_seq_length=0"),
    ({"max_seq_length": -5}, "max_seq_length=-5"),
    ({"max_train_samples": 0}, "max_train_samples=0"),
    ({"max_train_samples": -3}, "max_train_samples=-3"),
    ({"max_eval_samples": 0}, "max_eval_samples=0"),
    ({"validation_split": 1.5}, "validation_split=1.5"),
    ({"label_column": ""}, "label_column=''"),
    ({"metric": "/some/dir/x"}, "metric='/some/dir/x'"),
    ({"metric": "../metrics/accuracy"}, "metric='../metrics/accuracy'"),
    ({"metric": "f1"}, "metric='f1'"),
    ({"precision": "fp32", "bf16": True}, "bf16=True is not valid: expected unset (or false) with precision='fp32'"),
    ({"precision": "fp16", "bf16": True}, "bf16=True"),
    ({"resume_from_checkpoint": "/no/such/checkpoint"}, "No such directory"),
    ({"train_file": 5}, "train_file='5' is not valid: expected an existing file"),
    ({"trainable_layers": "7:"}, "it has 3 layers"),
]


@pytest.mark.parametrize("layout", ["unrelated_files", "earlier_run_resumed"])
@pytest.mark.parametrize("change, fragment", BAD_TRAINING, ids=[str(i) for i in range(len(BAD_TRAINING))])
def test_bad_values_exit_2_with_one_line_and_earlier_files_unchanged(tmp_path, reference, cls_files, capsys, change,
                                                                      fragment, layout):
    if layout == "earlier_run_resumed":
        out = copy_run(reference, tmp_path / "run")
        config = lm_run_config(reference["config_dir"], reference["corpus"], out, resume_from_checkpoint=True)
    else:
        out = tmp_path / "run"
        out.mkdir()
        config = base_config(reference["config_dir"], out, train_file=cls_files[0], validation_file=cls_files[1],
                             overwrite_output_dir=True, precision="auto", eval_strategy="no")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = tree(out)
    config.update(change)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    assert fragment in line, line
    assert tree(out) == before


# Found by a probe of a few hundred bad inputs (issue 12 follow-up): each was a traceback, a
# fork bomb, a run that never ends, or a Hub lookup of a YAML boolean.
BAD_PROBED = [
    ({"per_device_train_batch_size": 10**30}, "per_device_train_batch_size=1000000000000000000000000000000"),
    ({"max_steps": 10**30}, "max_steps=1000000000000000000000000000000"),
    ({"save_strategy": "steps", "save_steps": 10**30}, "save_steps=1000000000000000000000000000000"),
    ({"dataloader_num_workers": 10**30}, "dataloader_num_workers=1000000000000000000000000000000"),
    ({"dataloader_num_workers": 100000}, "dataloader_num_workers=100000"),
    ({"tokenizer_name_or_path": ["a", "b"]}, "tokenizer_name_or_path=['a', 'b']"),
    ({"tokenizer_name_or_path": {"a": 1}}, "tokenizer_name_or_path={'a': 1}"),
    ({"tokenizer_name_or_path": True}, "tokenizer_name_or_path=True"),
    ({"model_config": True}, "model_config=True"),
    ({"model_config": ["a"]}, "model_config=['a']"),
    (
        {
            "task": "sft", "train_file": os.path.join(cli.DEMO_SFT_DIR, "validation.jsonl"),
            "chat_template": "{% for x in %}",
        },
        "chat_template='{% for x in %}' is not valid: expected a valid Jinja chat template",
    ),
    ({"trainable_layers": "-1:", "frozen_prefix_cache": "disk", "frozen_prefix_cache_dir": "/proc/no-such-dir"},
     "frozen_prefix_cache_dir='/proc/no-such-dir'"),
    ({"trainable_layers": "none", "train_head": False, "train_embeddings": False, "train_norm": False},
     "Nothing would train"),  # was a warning line, then the same message as the error
]


@pytest.mark.parametrize("change, fragment", BAD_PROBED, ids=[str(i) for i in range(len(BAD_PROBED))])
def test_probed_bad_values_exit_2_with_one_line_and_nothing_written(tmp_path, reference, capfd, change, fragment):
    out = tmp_path / "run"
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, **change)
    capfd.readouterr()
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capfd)  # fd level: logged warnings count as lines too
    assert fragment in line, line
    assert not out.exists()


BAD_DATA = [
    ("train.csv", b"", "The file is empty"),
    ("train.csv", "text,label\n", "has a header (text, label) but no rows"),
    ("train.csv", "   \n\n", "only whitespace"),
    ("train.csv", b"text,label\n\xff\xfe caf\xe9,1\n", "not UTF-8"),
    ("train.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00binary", "binary file"),
    ("train.json", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', "Line 2 is not valid JSON"),
    ("train.json", '["just", "strings"]', "Item 1 of its JSON list is a str"),
    ("train.json", "[]", "empty JSON list"),
    ("train.jsonl", '"a string"\n', "Line 1 is a str"),
    ("train.csv", "text,label\ngood movie,1\n,0\nbad,0\n", "Example 2 has no text"),
    ("train.csv", "text,label\ngood,0.5\nbad,1.5\nok,2.25\n", "has the label 0.5"),
    ("train.csv", "text,label\ngood,1\nbad,\nok,0\n", "Example 2 has an empty label"),
    ("train.csv", "text,label\ngood,pos\nbad,pos\n", "holds one class only ('pos'"),
    ("train.csv", "text,label\ngood,pos\n", "holds one class only"),
    ("train.jsonl", '{"text": null, "label": 1}\n{"text": "b", "label": 0}\n', "Example 1 has no text"),
    ("train.jsonl", '{"text": 5, "label": 1}\n{"text": "b", "label": 0}\n', "Example 1 has a int, not text"),
    ("train.txt", "\n\n  \n", "only whitespace"),
]


@pytest.mark.parametrize("name, content, fragment", BAD_DATA, ids=[str(i) for i in range(len(BAD_DATA))])
def test_bad_data_files_exit_2_with_one_line_naming_the_file(tmp_path, reference, capsys, name, content, fragment):
    out = tmp_path / "run"
    path = _data_file(tmp_path, name, content)
    task = "causal_lm" if name.endswith(".txt") else "seq_cls"
    config = base_config(reference["config_dir"], out, train_file=path, task=task, precision="auto")
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    assert path in line and fragment in line, line
    assert not out.exists()


def test_validation_same_as_train_is_warned(tmp_path, reference, cls_files, caplog):
    from transformers.utils import logging as hf_logging

    from hf_llama_strategies.data import local as data

    hf_logging.enable_propagation()
    try:
        args = data.DataArguments(train_file=cls_files[0], validation_file=cls_files[0])
        data.load_raw(args)
    finally:
        hf_logging.disable_propagation()
    assert "validation_file is the same data as train_file" in caplog.text


BAD_CLI = [
    (["train", "CFG", "--no_such_key", "1"], "unknown key 'no_such_key'"),
    (["train", "CFG", "--learning_rat", "1"], "did you mean 'learning_rate'"),
    (["train", "CFG", "--learning_rate", "abc"], "learning_rate"),
    (["train", "CFG", "--max_steps", "2.5"], "max_steps"),
    (["train", "BINARY"], "is a binary file"),
    (["train", "LATIN1"], "not UTF-8"),
    (["train", "BADYAML"], "is not valid YAML at line"),
    (["train", "LIST"], "must hold a mapping"),
    (["train", "DIR"], "is a directory"),
    (["train", "CFG", "--output_dir", "FILE"], "It is a file"),
    (["train", "CFG", "--output_dir", "FILE/sub"], "is a file"),
    (["plan", "CFG", "--plot"], "--plot needs a file name"),
]


@pytest.mark.parametrize("argv, fragment", BAD_CLI, ids=[str(i) for i in range(len(BAD_CLI))])
def test_bad_command_lines_exit_2_with_one_line(tmp_path, reference, cls_files, capsys, argv, fragment):
    out = tmp_path / "run"
    files = {
        "CFG": write_yaml(tmp_path / "c.yaml", base_config(reference["config_dir"], out, train_file=cls_files[0],
                                                           precision="auto")),
        "BINARY": _data_file(tmp_path, "b.yaml", b"\x00\x01\x02binary\xff"),
        "LATIN1": _data_file(tmp_path, "l.yaml", b"output_dir: caf\xe9\n"),
        "BADYAML": _data_file(tmp_path, "y.yaml", "a: [1, 2\nb: 3\n"),
        "LIST": _data_file(tmp_path, "list.yaml", "- a\n- b\n"),
        "DIR": str(tmp_path),
        "FILE": _data_file(tmp_path, "afile", "x"),
    }
    argv = [a.replace("FILE", files["FILE"]) if "FILE" in a else files.get(a, a) for a in argv]
    assert cli.main(argv) == 2
    assert fragment in one_line_error(capsys)
    assert not out.exists()


def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise KeyError("internal")

    from hf_llama_strategies.cli import app

    monkeypatch.setattr(app, "run_plugins", broken)
    assert cli.main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "this is a bug" in err


# -- Python API -------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("learning_rate", float("nan")), ("learning_rate", -1.0), ("per_device_train_batch_size", 0),
    ("gradient_accumulation_steps", 0), ("seed", -1), ("weight_decay", float("inf")),
])
def test_strategy_trainer_refuses_values_no_run_survives_before_creating_output_dir(tmp_path, lm_dataset, option,
                                                                                     value):
    from tiny_models import tiny_model

    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match=f"^{option}="):
        # An option set: with none, StrategyTrainer is the Trainer itself (issue 11), checks included.
        StrategyTrainer(model=tiny_model("llama"), args=make_training_args(out, **{option: value}),
                        train_dataset=lm_dataset, strategy_args=strategy(trainable_layers="-2:"))
    assert not out.exists()


def test_strategy_trainer_refuses_strategy_args_of_another_type(tmp_path, lm_dataset):
    from tiny_models import tiny_model

    with pytest.raises(InvalidArgumentError, match="strategy_args='dict' is not valid"):
        StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path / "o"), train_dataset=lm_dataset,
                        strategy_args={"trainable_layers": "-1:"})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, kwargs, expected", [
    (True, {}, "a positive integer"),
    (False, {}, "a positive integer"),
    (0, {}, "a positive integer"),
    (-1, {}, "a positive integer"),
    (1.0, {}, "a positive integer"),
    (2.5, {}, "a positive integer"),
    ("3", {}, "a positive integer"),
    (None, {}, "a positive integer"),
    (11, {"maximum": 10}, "a positive integer up to 10"),
    (0, {"what": "layers per stage"}, "a positive integer (layers per stage)"),
    (0, {"expected": "a whole number of at least 1"}, "a whole number of at least 1"),
    ("0", {"from_text": True}, "a positive integer"),
    ("-3", {"from_text": True}, "a positive integer"),
    ("+3", {"from_text": True}, "a positive integer"),
    ("3.0", {"from_text": True}, "a positive integer"),
    ("\u0663", {"from_text": True}, "a positive integer"),  # an Arabic-Indic 3: not what a user types
    ("", {"from_text": True}, "a positive integer"),
])
def test_check_positive_int_refuses_what_is_no_count_naming_the_option_and_value(value, kwargs, expected):
    from hf_llama_strategies.core.options import check_positive_int

    with pytest.raises(InvalidArgumentError) as info:
        check_positive_int("opt", value, **kwargs)
    assert str(info.value) == f"opt={value!r} is not valid: expected {expected}."
    assert (info.value.option, info.value.value) == ("opt", value)


@pytest.mark.parametrize("value, kwargs, number", [
    (1, {}, 1), (7, {"what": "steps"}, 7), (10, {"maximum": 10}, 10), (2**70, {}, 2**70),
    ("8", {"from_text": True}, 8), (" 12 ", {"from_text": True}, 12), (5, {"from_text": True}, 5),
])
def test_check_positive_int_returns_the_number(value, kwargs, number):
    from hf_llama_strategies.core.options import check_positive_int

    result = check_positive_int("opt", value, **kwargs)
    assert result == number and type(result) is int


@pytest.mark.parametrize("where, fragment", [("missing", "no such directory"), ("file", "it is a file")])
def test_strategy_trainer_resume_from_a_path_that_is_no_checkpoint_names_the_option(tmp_path, lm_dataset, where,
                                                                                     fragment):
    from tiny_models import tiny_model

    from hf_llama_strategies.errors import CheckpointError

    path = tmp_path / "ckpt"
    if where == "file":
        path.write_text("x", encoding="utf-8")
    trainer = StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path / "out"),
                              train_dataset=lm_dataset, strategy_args=strategy(trainable_layers="-1:"))
    with pytest.raises(CheckpointError, match=f"resume_from_checkpoint=.*{fragment}"):  # was the Trainer's ValueError
        trainer.train(resume_from_checkpoint=str(path))


def test_strategy_trainer_resume_true_takes_the_newest_complete_checkpoint(tmp_path, lm_dataset):
    from tiny_models import tiny_model

    def run(out, resume=None, **extra):
        torch.manual_seed(0)
        args = make_training_args(out, max_steps=4, save_strategy="steps", save_steps=2, **extra)
        trainer = StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset,
                                  strategy_args=strategy(trainable_layers="-1:"))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    ref = run(tmp_path / "ref")
    import shutil

    out = tmp_path / "killed"
    out.mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(tmp_path / "ref" / "checkpoint-4", out / "checkpoint-4")
    os.remove(out / "checkpoint-4" / "trainer_state.json")
    resumed = run(out, resume=True)
    assert snapshot(resumed.model) == snapshot(ref.model)
    with pytest.raises(StrategyError, match="no trainer_state.json"):
        run(tmp_path / "other", resume=str(out / "incomplete-checkpoint-4"))


# -- plugins -----------------------------------------------------------------------------------


class Exploding:
    @hookimpl
    def hfls_plan_parameters(self, plan, anatomy, strategy_args, training_args):
        raise ZeroDivisionError("oops")


class Typo:
    @hookimpl
    def hfls_plan_parameter(self, plan):
        pass


class LyingAnatomy:
    def __init__(self, **changes):
        self.changes = changes

    @hookimpl(tryfirst=True)
    def hfls_model_anatomy(self, model):
        import dataclasses

        from hf_llama_strategies.core.anatomy import find_anatomy_by_structure

        if "answer" in self.changes:
            return self.changes["answer"]
        return dataclasses.replace(find_anatomy_by_structure(model), **self.changes)


@pytest.mark.parametrize("plugin, fragment", [
    (Exploding(), "plugin 'Exploding' failed in hfls_plan_parameters: ZeroDivisionError: oops"),
    (LyingAnatomy(num_layers=99), "plugin 'LyingAnatomy' (hook hfls_model_anatomy): num_layers=99"),
    (LyingAnatomy(layers_path="model.nope"), "module path 'model.nope' does not exist"),
    (LyingAnatomy(head_paths=("nowhere",)), "module path 'nowhere' does not exist"),
    (LyingAnatomy(answer=42), "returned a int, expected a ModelAnatomy"),
])
def test_plugin_failures_and_impossible_answers_name_the_plugin_and_hook(plugin, fragment):
    from tiny_models import tiny_model

    from hf_llama_strategies import build_plan

    with pytest.raises(PluginError) as info:
        build_plan(tiny_model("llama"), StrategyArguments(), plugins=[plugin])
    assert fragment in str(info.value)


def test_a_hook_name_with_a_typo_is_reported_at_registration():
    with pytest.raises(PluginError, match="'hfls_plan_parameter'.*did you mean 'hfls_plan_parameters'"):
        get_plugin_manager([Typo()])


@pytest.mark.parametrize("answer, fragment", [
    (3, "returned a int, expected parameter names"),
    ("model.embed_tokens.weight", "returned a str"),
    (["no.such.param"], "unknown parameter name 'no.such.param'"),
])
def test_wrong_active_parameters_answers_are_refused_with_the_name(answer, fragment):
    from tiny_models import tiny_model

    from hf_llama_strategies import build_plan

    class Schedule:
        @hookimpl(tryfirst=True)
        def hfls_active_parameters(self, plan, schedule, global_step):
            return answer

    with pytest.raises(PluginError, match=fragment):
        build_plan(tiny_model("llama"), StrategyArguments(lisa_layers=1, lisa_interval_steps=2), plugins=[Schedule()])


def test_plugins_command_lists_what_loaded_when_an_entry_point_is_broken(monkeypatch, capsys, tmp_path):
    import importlib.metadata

    from hf_llama_strategies.core import plugins

    class BrokenEntryPoint:
        name, dist = "broken_plugin", None

        def load(self):
            raise ImportError("No module named 'missing_dependency'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [BrokenEntryPoint()])
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "hf_llama_strategies.strategies.freezing" in out
    assert "broken_plugin" in out and "BROKEN, not loaded" in out and "missing_dependency" in out
    assert cli.main(["plan", write_yaml(tmp_path / "p.yaml", {"model_config": cli.DEMO_DIR})]) == 2
    assert "installed plugin 'broken_plugin' cannot be loaded" in one_line_error(capsys)
    with pytest.raises(PluginError):
        plugins.get_plugin_manager()


def test_allow_plan_change_with_another_head_lr_uses_the_new_rate(tmp_path, cls_dataset):
    from tiny_models import tiny_model

    def run(out, head_lr, resume=None, allow=False):
        torch.manual_seed(0)
        args = make_training_args(out, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = StrategyTrainer(
            model=tiny_model("llama", "seq_cls"), args=args, train_dataset=cls_dataset,
            strategy_args=strategy(head_lr=head_lr, allow_plan_change_on_resume=allow),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    run(tmp_path / "a", head_lr=1e-2)
    with pytest.raises(StrategyError, match="lr 0.01 -> 0.03"):
        run(tmp_path / "b", head_lr=3e-2, resume=str(tmp_path / "a" / "checkpoint-2"))
    resumed = run(tmp_path / "c", head_lr=3e-2, resume=str(tmp_path / "a" / "checkpoint-2"), allow=True)
    logged = [h for h in resumed.state.log_history if h.get("step") == 3 and "loss" in h][0]
    head = [v for k, v in logged.items() if k.startswith("learning_rate/") and "head" in k]
    # Linear decay over 4 steps: the third update runs at half the base rate, the new one.
    assert head and math.isclose(head[0], 3e-2 / 2, rel_tol=1e-6), logged


def test_a_csv_field_over_the_csv_modules_limit_is_read_not_a_traceback(tmp_path):
    import csv

    from hf_llama_strategies.data.local import check_data_file

    path = tmp_path / "train.csv"
    path.write_text('text,label\n"' + "x" * 200_000 + '",1\nshort,0\n', encoding="utf-8")
    limit = csv.field_size_limit()
    check_data_file("train_file", str(path), "csv")  # raised _csv.Error (internal error, exit 1) before
    assert csv.field_size_limit() == limit


def test_resume_true_after_a_kill_before_anything_was_written_trains_from_the_start(tmp_path, reference, capsys):
    # SIGKILL while the model or data loads leaves no output_dir: `resume_from_checkpoint: true` was refused.
    out = tmp_path / "run"
    config = lm_run_config(reference["config_dir"], reference["corpus"], out, resume_from_checkpoint=True)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    assert "holds no earlier run yet; training from the start" in capsys.readouterr().out
    assert_same_weights(out, reference["out"])
