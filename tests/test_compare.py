"""``hf-llama-strategies compare``: every candidate equals ``train`` of its keys, what is shared, bad input, Ctrl-C.

Tiny models built from configs (the ``tiny_config_dir`` fixture: 3 layers), the demo tokenizer, a few steps
on a CPU.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from helpers import base_config, write_yaml

from hf_llama_strategies.cli import main
from hf_llama_strategies.cli.candidates import default_candidates, without_keys
from hf_llama_strategies.cli.compare import parse_duration
from hf_llama_strategies.cli.train import run_train
from hf_llama_strategies.errors import InvalidArgumentError


def lm_config(tiny_config_dir, lm_file, out, **extra):
    """Causal LM on packed 24-token blocks (every batch the same shape), 4 steps, an eval split."""
    settings = {"task": "causal_lm", "train_file": lm_file, "validation_split": 0.25, "max_steps": 4, **extra}
    return base_config(tiny_config_dir, out, **settings)


def compare(tmp_path, config, *args, name="compare.yaml"):
    code = main(["compare", write_yaml(tmp_path / name, config), *args])
    report_path = os.path.join(config["output_dir"], "compare.json")
    report = json.load(open(report_path, encoding="utf-8")) if os.path.exists(report_path) else None
    return code, report


def train_alone(config, keys, out, eval_steps):
    """``train`` with the candidate's keys, evaluating where compare does (before training, every eval_steps)."""
    alone = dict(config, **keys, output_dir=str(out), report_to="none", eval_strategy="steps",
                 eval_steps=eval_steps, eval_on_start=True)
    alone.pop("candidates", None)
    run_train(alone)
    history = json.load(open(os.path.join(out, "trainer_state.json"), encoding="utf-8"))["log_history"]
    end = next(i for i, h in enumerate(history) if "train_runtime" in h)
    # The evaluations of the training loop (the final one reuses the last step's, or comes after it).
    evals = [h["eval_loss"] for h in history[:end] if "eval_loss" in h]
    return [h["loss"] for h in history if "loss" in h], evals


# -- every candidate equals `train` of its keys ---------------------------------------------------------------


@pytest.mark.slow
def test_candidates_equal_train_alone_bit_for_bit_and_share_one_prefix(tmp_path, tiny_config_dir, lm_file):
    candidates = [{"trainable_layers": "-2:"},
                  {"name": "top", "trainable_layers": "-1:", "learning_rate": [1e-3, 3e-3]},
                  {"trainable_layers": "all"}]
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out", candidates=candidates)
    code, report = compare(tmp_path, config, "--eval_points", "2")
    assert code == 0
    rows = report["candidates"]
    assert [r["name"] for r in rows] == ["trainable_layers=-2:", "top @ lr=0.001", "top @ lr=0.003",
                                         "trainable_layers=all"]
    for row in rows:
        losses, evals = train_alone(config, row["keys"], tmp_path / f"alone{row['index']}", eval_steps=2)
        # Same data order, seed and batch shapes, the prefix computed in the training batch itself: bit for bit.
        assert row["train_losses"] == losses, row["name"]
        assert [p["eval_loss"] for p in row["eval_points"]] == evals, row["name"]
        assert [row[f"eval_loss_step_{s}"] for s in (0, 2, 4)] == evals
    shared = report["shared_prefix"]
    # The lowest boundary of the three runs that can share (layers.1, the last 2 of 3 layers) serves them all.
    assert (shared["frozen_prefix_cache_boundary"], shared["runs"]) == (1, [1, 2, 3])
    first, *later = (rows[i]["cache"] for i in range(3))
    assert first["rows_computed"] == shared["rows_computed"] > 0
    assert all(c["rows_computed"] == 0 and c["loaded"] == shared["rows_computed"] for c in later)
    computed = sum(rows[i]["cache"]["compute_seconds"] for i in range(3))
    assert shared["compute_seconds"] == pytest.approx(computed, abs=1e-4)  # the JSON rounds to 4 decimals
    assert rows[3]["shared_prefix"] is False and rows[3]["cache"] is None
    # Nothing but the results stays in the output folder.
    assert sorted(os.listdir(config["output_dir"])) == ["compare.json"]
    recommendation = report["recommendation"]
    assert recommendation["rule"].startswith("the fastest candidate")
    chosen = rows[recommendation["index"] - 1]
    assert yaml.safe_load(recommendation["yaml"] or "{}") in (None, {k: v for k, v in chosen["keys"].items()
                                                                    if config.get(k) != v})


@pytest.mark.slow
def test_classification_candidates_with_dynamic_padding_equal_train_alone(tmp_path, tiny_config_dir, cls_files):
    from transformers import AutoConfig, AutoModelForCausalLM

    # A pretrained causal LM: the classification head is new, drawn from the seed (as `train` draws it).
    checkpoint = tmp_path / "pretrained"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_config_dir)).save_pretrained(checkpoint)
    train, valid = cls_files
    candidates = [{"trainable_layers": "-1:"}, {"trainable_layers": "none", "train_norm": False}]
    config = base_config(tiny_config_dir, tmp_path / "out", train_file=train, validation_file=valid,
                         candidates=candidates, task="seq_cls")
    del config["model_config"]
    config["model_name_or_path"] = str(checkpoint)
    code, report = compare(tmp_path, config, "--eval_points", "1")
    assert code == 0
    for row in report["candidates"]:
        assert row["shared_prefix"] is True
        assert "eval_accuracy" in row and "eval_accuracy_step_3" in row
        losses, evals = train_alone(config, row["keys"], tmp_path / f"alone{row['index']}", eval_steps=3)
        # Padded batches: the rows are computed in the training batch itself (no pre-pass with other batch
        # shapes), and real tokens never attend to the zeros that stand for padding: still bit for bit.
        assert row["train_losses"] == losses
        assert [p["eval_loss"] for p in row["eval_points"]] == evals


# -- what is reported ----------------------------------------------------------------------------------------


def test_refused_candidates_are_one_line_each_and_the_others_run(tmp_path, tiny_config_dir, lm_file, capsys):
    tied = tmp_path / "tied"
    cfg = json.load(open(os.path.join(tiny_config_dir, "config.json"), encoding="utf-8"))
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)), encoding="utf-8")
    candidates = [{"trainable_layers": "-9:"}, {"name": "head only", "trainable_layers": "none", "train_norm": False},
                  {"trainable_layers": "-1:"}]
    config = lm_config(str(tied), lm_file, tmp_path / "out", max_steps=2, candidates=candidates)
    code, report = compare(tmp_path, config, "--eval_points", "1")
    assert code == 0
    out = capsys.readouterr().out
    refused = [line for line in out.splitlines() if "refused:" in line and line.startswith("hf-llama-strategies")]
    assert len(refused) == 2
    assert "candidate 1 (trainable_layers=-9:) refused: trainable_layers='-9:'" in refused[0]
    assert "candidate 2 (head only) refused: nothing trains" in refused[1] and "tied" in refused[1]
    assert [r["status"] for r in report["candidates"]] == ["refused", "refused", "done"]
    assert report["shared_prefix"] is None  # one run left: nothing to share
    assert report["recommendation"]["index"] == 3


@pytest.mark.slow
def test_json_alone_on_stdout_a_plot_and_kept_run_folders(tmp_path, tiny_config_dir, lm_file, capsys):
    pytest.importorskip("matplotlib")
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out", max_steps=2,
                       candidates=[{"trainable_layers": "-1:"}, {"trainable_layers": "-2:"}])
    code, report = compare(tmp_path, config, "--json", "--plot", "loss.png", "--keep_runs", "--device_memory", "1GiB")
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["candidates"][0]["name"] == report["candidates"][0]["name"] == "trainable_layers=-1:"
    out = config["output_dir"]
    assert printed["plot"] == os.path.join(out, "loss.png")
    assert open(printed["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(os.path.join(out, "runs"))) == ["01-trainable_layers--1", "02-trainable_layers--2"]
    assert os.path.exists(os.path.join(out, "runs", "01-trainable_layers--1", "model.safetensors"))
    assert os.path.isdir(os.path.join(out, "prefix-cache"))
    assert all(row["fits"] is True for row in report["candidates"])  # a 3-layer model fits 1 GiB
    assert "fits 1.00 GiB per device" in report["recommendation"]["rule"]


def test_ctrl_c_prints_the_table_so_far(tmp_path, tiny_config_dir, lm_file, capsys, monkeypatch):
    from hf_llama_strategies.cli import compare as command

    real = command.train_run

    def interrupted_second(result, *args, **kwargs):
        if result.run.index == 2:
            raise KeyboardInterrupt
        real(result, *args, **kwargs)

    monkeypatch.setattr(command, "train_run", interrupted_second)
    candidates = [{"trainable_layers": "-1:"}, {"trainable_layers": "-2:"}, {"trainable_layers": "all"}]
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out", max_steps=2, candidates=candidates)
    code, report = compare(tmp_path, config, "--eval_points", "1")
    assert code == 130
    out = capsys.readouterr().out
    assert "interrupted; the candidates so far" in out and "2 (trainable_layers=-2:) interrupted" in out
    assert "3 (trainable_layers=all) not run" in out
    assert report["partial"] is True
    assert [r["status"] for r in report["candidates"]] == ["done", "interrupted", "not run"]


def test_time_budget_stops_every_candidate_and_evaluates_at_its_end(tmp_path, tiny_config_dir, lm_file):
    # 10000 steps of the cap would take minutes: a half-second budget must be what stops each run.
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out", max_steps=10000,
                       candidates=[{"trainable_layers": "-1:"}])
    code, report = compare(tmp_path, config, "--budget", "0.5s", "--eval_points", "1")
    assert code == 0
    row = report["candidates"][0]
    assert 0 < row["steps"] < 10000
    assert [p["step"] for p in row["eval_points"]] == [0, row["steps"]]
    assert report["budget"] == {"seconds": 0.5}
    assert report["recommendation"]["rule"].startswith("the lowest final eval loss")


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "args", "fragment"),
    [
        ({"candidates": [{"trainable_layer": "-2:"}]}, [], "candidate 1: unknown key 'trainable_layer'; did you mean"),
        ({"candidates": [{"per_device_train_batch_size": 2}]}, [], "per_device_train_batch_size is a key every"),
        ({"candidates": [{"trainable_layers": "2::x"}]}, [], "candidate 1 (trainable_layers=2::x): trainable_layers"),
        ({"candidates": [{"learning_rate": [1e-3, "x"]}]}, [], "'x' is not a learning rate"),
        ({"candidates": []}, [], "a non-empty YAML list of candidates"),
        ({}, ["--budget", "0"], "--budget='0' is not valid: expected a positive duration"),
        ({}, ["--max_steps", "0"], "max_steps=0 is not valid"),
        ({}, ["--eval_points", "0"], "--eval_points='0' is not valid"),
        ({"validation_split": 0.0}, [], "compare needs evaluation data"),
        ({}, ["--candidates", "[{trainable_layers: all}", "--max_steps", "2"], "--candidates: neither a file nor"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_anything_is_written(
    tmp_path, tiny_config_dir, lm_file, capsys, change, args, fragment
):
    config = dict(lm_config(tiny_config_dir, lm_file, tmp_path / "out"), **change)
    code, _ = compare(tmp_path, config, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and fragment in err[0], err
    assert not os.path.exists(config["output_dir"])


def test_plot_without_matplotlib_exits_2_before_training(tmp_path, tiny_config_dir, lm_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out", candidates=[{"trainable_layers": "-1:"}])
    code, _ = compare(tmp_path, config, "--plot", "c.png")
    assert code == 2
    assert "--plot needs matplotlib: pip install 'hf-llama-strategies[plot]'" in capsys.readouterr().err
    assert not os.path.exists(config["output_dir"])


# -- the parts -------------------------------------------------------------------------------------------------


def test_default_candidates_follow_the_model_depth():
    names = [c.name for c in default_candidates(30)]
    assert names == ["head only", "last 2", "last 25% (8 of 30 layers)", "last 50% (15 of 30 layers)", "full",
                     "layer-wise LR decay 0.9", "LISA, 2 layers"]
    # 4 layers: the last 25% is 1 layer, the last 50% the last 2 (left out: the same run twice).
    assert [c.keys.get("trainable_layers") for c in default_candidates(4)] == ["none", "-2:", "-1:", "all", "all",
                                                                               "all"]
    # 2 layers: "last 2" is full fine-tuning, LISA over 2 layers trains them all.
    assert [c.name for c in default_candidates(2)] == ["head only", "last 25% (1 of 2 layers)", "full",
                                                       "layer-wise LR decay 0.9"]
    lisa = default_candidates(30)[-1]
    assert lisa.keys == {"trainable_layers": "all", "lisa_layers": 2}
    # Every default sets what decides which parameters train, whatever the config says of it.
    assert lisa.resets["train_embeddings"] is None and lisa.resets["layer_lr_decay"] is None


def test_durations_and_override_filtering():
    assert [parse_duration(t) for t in ("90s", "10m", "1.5h", "45", "2 min")] == [90, 600, 5400, 45, 120]
    for bad in ("0", "-1m", "10 minutes", "m"):
        with pytest.raises(InvalidArgumentError, match="--budget"):
            parse_duration(bad)
    overrides = ["--trainable_layers", "-2:", "--learning_rate=1e-3", "--bf16", "--max_steps", "5"]
    assert without_keys(overrides, {"trainable_layers": 1, "learning_rate": 1, "bf16": 1}) == ["--max_steps", "5"]


def test_a_multi_process_launch_is_refused(tmp_path, tiny_config_dir, lm_file, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out")
    code, _ = compare(tmp_path, config)
    assert code == 2
    assert "compare trains its candidates one after another in one process" in capsys.readouterr().err
    assert not os.path.exists(config["output_dir"])


def test_an_earlier_compare_is_refused_or_moved_aside_never_overwritten(tmp_path, tiny_config_dir, lm_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compare.json").write_text("{}", encoding="utf-8")
    config = lm_config(tiny_config_dir, lm_file, out, candidates=[{"trainable_layers": "-1:"}])
    code, _ = compare(tmp_path, config)
    assert code == 2
    assert "overwrite_output_dir" in capsys.readouterr().err
    assert os.listdir(out) == ["compare.json"] and (out / "compare.json").read_text() == "{}"
    # The one rule for an occupied output_dir (as for `train`): overwrite_output_dir moves it aside whole.
    code, report = compare(tmp_path, {**config, "overwrite_output_dir": True})
    assert code == 0 and report["partial"] is False
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("out.earlier-")]
    assert os.listdir(aside) == ["compare.json"] and (aside / "compare.json").read_text() == "{}"


def test_compare_is_as_quiet_as_train_about_packages_it_does_not_use(tmp_path, tiny_config_dir, lm_file, monkeypatch,
                                                                      capsys):
    from hf_llama_strategies.cli import compare as compare_module

    seen = []
    monkeypatch.setattr(compare_module, "quiet_run", seen.append)
    config = lm_config(tiny_config_dir, lm_file, tmp_path / "out")
    del config["validation_split"]  # refused after the config is read: nothing trains
    code, _ = compare(tmp_path, config)
    assert code == 2 and "compare needs evaluation data" in capsys.readouterr().err
    [training_args] = seen
    assert training_args.output_dir == str(tmp_path / "out") and not training_args.deepspeed
