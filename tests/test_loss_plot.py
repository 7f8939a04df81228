"""``plot_loss: true`` (and LLaMA-Factory's): training_loss.png; the end-of-run summary names what was written."""

from __future__ import annotations

import json
import os
import sys

from helpers import base_config, write_yaml

from hf_llama_strategies import cli
from hf_llama_strategies.cli.llamafactory import translate_llamafactory

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_loss_writes_the_plot_and_the_summary_names_every_file(tmp_path, tiny_config_dir, cls_files, capsys):
    out = tmp_path / "run"
    config = base_config(tiny_config_dir, out, train_file=cls_files[0], validation_file=cls_files[1],
                         trainable_layers="-1:", head_lr=1e-2, plot_loss=True, eval_on_start=True,
                         eval_strategy="steps", eval_steps=3, report_to="tensorboard")
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    assert (out / "training_loss.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    for name in os.listdir(out):
        assert f"  {name}" in printed, name
    assert f"tensorboard --logdir {out / 'runs'}" in printed
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    # The untrained model's evaluation (step 0) and the last step's, which is the final one: not run again.
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 3]
    assert any("learning_rate/head" in e for e in history)  # the per-group rates the plot draws


def test_plot_loss_without_matplotlib_is_refused_before_anything_is_written(tmp_path, tiny_config_dir, cls_files,
                                                                             capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "run"
    config = base_config(tiny_config_dir, out, train_file=cls_files[0], plot_loss=True)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    err = capsys.readouterr().err
    assert "plot_loss=True is not valid" in err and "hf-llama-strategies[plot]" in err, err
    assert not out.exists()


def test_llamafactory_plot_loss_is_translated(tmp_path):
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    lf = {"model_name_or_path": "tiny", "stage": "sft", "do_train": True, "finetuning_type": "full",
          "dataset": "demo_alpaca", "dataset_dir": "llamafactory", "template": "llama3",
          "output_dir": str(tmp_path / "out"), "plot_loss": True}
    notes: list[str] = []
    native = translate_llamafactory(lf, examples, notes)
    assert native["plot_loss"] is True
    assert not any("plot_loss" in note for note in notes)
