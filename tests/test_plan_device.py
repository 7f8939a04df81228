"""``plan`` plans what ``train`` trains (the task from the data) and for the hardware ``--device`` names."""

from __future__ import annotations

import json

import pytest
from helpers import base_config, write_yaml

from hf_llama_strategies import cli
from hf_llama_strategies.core.hardware import KNOWN_GPUS, HardwareProbe
from hf_llama_strategies.errors import InvalidArgumentError


def _plan_json(capsys, path, *extra):
    assert cli.main(["plan", path, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("data", ["classification", "causal_lm"])
def test_plan_and_train_report_the_same_model_and_trainable_count(tmp_path, tiny_config_dir, cls_files, lm_file,
                                                                    capsys, data):
    # examples/freeze_head_only.yaml's recipe: the task is read from the data (a label column), not the model config.
    out = tmp_path / "run"
    files = {"train_file": cls_files[0], "validation_file": cls_files[1]} if data == "classification" else {
        "train_file": lm_file, "validation_split": 0.2}
    config = base_config(tiny_config_dir, out, trainable_layers="none", train_norm=False, max_steps=1, **files)
    path = write_yaml(tmp_path / "c.yaml", config)
    planned = _plan_json(capsys, path)["plan"]
    assert cli.main(["train", path]) == 0
    trained = json.loads((out / "strategy_plan.json").read_text())
    expected = "LlamaForSequenceClassification" if data == "classification" else "LlamaForCausalLM"
    assert planned["model_class"] == trained["model_class"] == expected
    assert (planned["num_parameters"], planned["num_trainable"]) == (
        trained["num_parameters"], trained["num_trainable"])
    if data == "classification":
        assert trained["num_trainable"] == 64 * 2  # the score head alone: hidden 64 x the data's two classes


def test_plan_without_data_reads_the_task_from_the_model_config(tmp_path, tiny_config_dir, capsys):
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir, "trainable_layers": "-1:"})
    assert _plan_json(capsys, path)["plan"]["model_class"] == "LlamaForCausalLM"


def test_plan_for_an_h100_plans_bf16_and_its_memory(tmp_path, tiny_config_dir, capsys):
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir, "trainable_layers": "-1:",
                                            "precision": "auto"})
    report = _plan_json(capsys, path, "--device", "h100", "--fit")
    memory = KNOWN_GPUS["h100"][2]
    assert report["hardware"]["device_name"] == "NVIDIA H100 80GB HBM3"
    assert report["hardware"]["memory_bytes"] == memory
    assert report["fit"]["budget_bytes"] == memory  # a bare --fit takes the device's memory
    assert report["plan"]["settings"]["precision"]["mode"] == "bf16"
    assert cli.main(["plan", path, "--device", "h100"]) == 0
    table = capsys.readouterr().out
    assert "planned for: NVIDIA H100 80GB HBM3 (cuda, compute capability 9.0, 79.65 GiB)" in table
    assert "bfloat16 autocast" in table and "fits (per device)" in table
    assert "use_cpu" not in table


@pytest.mark.parametrize("device, mode", [("t4", "fp16"), ("v100", "fp16"), ("a100", "bf16"), ("cpu", "fp32")])
def test_plan_device_decides_precision_for_that_hardware(tmp_path, tiny_config_dir, capsys, device, mode):
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir, "precision": "auto"})
    assert _plan_json(capsys, path, "--device", device)["plan"]["settings"]["precision"]["mode"] == mode


def test_a_config_with_bf16_plans_for_a_gpu_this_machine_lacks(tmp_path, tiny_config_dir, capsys):
    # TrainingArguments(bf16=True) is refused on a machine without a bf16 GPU: the flag is the named GPU's.
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir, "bf16": True, "precision": "auto"})
    assert _plan_json(capsys, path, "--device", "h100")["plan"]["settings"]["precision"]["mode"] == "bf16"
    assert cli.main(["plan", path, "--device", "t4"]) == 2
    assert "no native bf16" in capsys.readouterr().err


def test_device_memory_overrides_a_named_gpus(tmp_path, tiny_config_dir, capsys):
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir})
    report = _plan_json(capsys, path, "--device", "a100", "--device_memory", "40GiB")
    assert report["hardware"]["memory_bytes"] == 40 * 2**30


@pytest.mark.parametrize("args, fragment", [
    (["--device", "cuda"], "--device='cuda' is not valid: expected cuda with --compute_capability"),
    (["--device", "tpu"], "--device='tpu' is not valid: expected cpu, cuda or a GPU name: h200, h100"),
    (["--device", "h100", "--compute_capability", "8.0"], "expected 9.0 for h100"),
    (["--device", "cuda", "--compute_capability", "eight"], "expected MAJOR.MINOR"),
    (["--compute_capability", "8.0"], "--compute_capability needs --device cuda"),
    (["--device"], "--device needs a device"),
])
def test_bad_device_options_exit_2_with_one_line(tmp_path, tiny_config_dir, capsys, args, fragment):
    path = write_yaml(tmp_path / "p.yaml", {"model_config": tiny_config_dir})
    assert cli.main(["plan", path, *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_cuda_with_a_compute_capability():
    ampere = HardwareProbe.for_device("cuda", 24 * 2**30, "8.6")
    assert (ampere.bf16_supported, ampere.tf32_supported, ampere.compute_capability) == (True, True, (8, 6))
    assert ampere.describe() == "cuda (compute capability 8.6, 24.00 GiB)"
    turing = HardwareProbe.for_device("CUDA", None, "7.5")
    assert (turing.bf16_supported, turing.tf32_supported, turing.memory_bytes) == (False, False, None)
    with pytest.raises(InvalidArgumentError, match="compute_capability"):
        HardwareProbe.for_device("cuda")
