"""LoRA (finetuning_type: lora / use_peft): the translation, PEFT's adapter trained and saved as PEFT saves it,
equal to TRL's SFTTrainer given the same peft_config by hand, composed with the strategies (LoRA on the body,
the last layer in full), adapters resumed or merged, and ``export``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'hf-llama-strategies[trl]'")
pytest.importorskip("peft", reason="PEFT is an optional extra: pip install 'hf-llama-strategies[peft]'")

import torch  # noqa: E402
import yaml  # noqa: E402
from helpers import snapshot  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_llama_strategies import cli  # noqa: E402
from hf_llama_strategies.cli.llamafactory import translate_llamafactory  # noqa: E402

RECORDS = [
    {"instruction": "what is the sentiment of this review ?", "input": "the film was brilliant", "output": "positive"},
    {"instruction": "which part of the film does this review talk about ?", "input": "the plot was dull",
     "output": "the plot"},
    {"instruction": "give a word that means the same as dull .", "input": "", "output": "boring"},
    {"instruction": "what is the sentiment of this review ?", "input": "the cast was weak", "output": "negative"},
] * 4


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """LLaMA-Factory's layout: data/ with dataset_info.json; a tiny Llama over the SFT demo tokenizer; cwd there."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"reviews": {"file_name": "reviews.json"}}), encoding="utf-8")
    (data / "reviews.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(cli.DEMO_SFT_DIR)
    tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=128).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def lf_lora(**extra):
    """Keys as LLaMA-Factory's examples/train_lora/*_lora_sft.yaml writes them."""
    config = {
        "model_name_or_path": "tiny", "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 4,
        "lora_target": "all", "dataset": "reviews", "template": "chatml", "cutoff_len": 64,
        "output_dir": "saves/tiny/lora/sft", "logging_steps": 1, "report_to": "none",
        "per_device_train_batch_size": 4, "learning_rate": 1.0e-2, "max_steps": 3, "save_strategy": "no",
        "use_cpu": True, "seed": 0, "disable_tqdm": True,
    }
    config.update(extra)
    return config


def write(workdir, config, name="lf.yaml"):
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(path)


def losses(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


# -- the translation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lf, native",
    [
        ({}, {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "lora_target_modules": ["all-linear"]}),
        ({"lora_alpha": 32, "lora_dropout": 0.1, "lora_target": "q_proj,v_proj"},
         {"lora_alpha": 32, "lora_dropout": 0.1, "lora_target_modules": ["q_proj", "v_proj"]}),
        ({"additional_target": "embed_tokens,lm_head", "use_rslora": True, "use_dora": True},
         {"lora_modules_to_save": ["embed_tokens", "lm_head"], "use_rslora": True, "use_dora": True}),
        ({"loraplus_lr_ratio": 16}, {"lr_rules": ["lora_B=x16"]}),
        ({"loraplus_lr_ratio": 8.0, "use_dora": True}, {"lr_rules": ["lora_B=x8.0", "lora_magnitude_vector=x8.0"]}),
        ({"loraplus_lr_ratio": 4, "lora_target": "embed_tokens,q_proj", "loraplus_lr_embedding": 1e-5},
         {"lr_rules": ["lora_B=x4", "lora_embedding_B=1e-05"]}),
        ({"create_new_adapter": True}, {"create_new_adapter": True}),
    ],
)
def test_lora_keys_translate(workdir, lf, native):
    out = translate_llamafactory(lf_lora(**lf), str(workdir), [])
    for key, value in native.items():
        assert out[key] == value, key


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"pissa_init": True}, "pissa_init=True has no meaning here: PiSSA"),
        ({"use_llama_pro": True}, "use_llama_pro=True has no meaning here: with finetuning_type: lora"),
        ({"finetuning_type": "full"}, "lora_rank=4 has no meaning here: it is a LoRA key"),
        ({"finetuning_type": "oft"}, "finetuning_type='oft'"),
        ({"lora_rank": 0}, "lora_rank=0 is not valid"),
        ({"lora_dropout": 1.5}, "lora_dropout=1.5 is not valid"),
        ({"loraplus_lr_ratio": -1}, "loraplus_lr_ratio=-1 is not valid"),
        ({"adapter_name_or_path": "no/such/adapter"}, "adapter_name_or_path="),
        ({"lora_bias": "all"}, "lora_bias='all' has no meaning here"),
    ],
)
def test_lora_keys_without_meaning_are_refused_by_name(workdir, capsys, change, fragment):
    assert cli.main(["train", write(workdir, lf_lora(**change))]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "saves").exists()


@pytest.mark.parametrize("key, value", [("lora_r", 8), ("use_dora", True), ("lora_full_layers", "-1:")])
def test_native_lora_keys_need_use_peft(workdir, capsys, key, value):
    config = {"model_name_or_path": "tiny", "task": "sft", "train_file": "data/reviews.json", "template": "chatml",
              "output_dir": "out", key: value}
    assert cli.main(["train", write(workdir, config)]) == 2
    assert f"{key}={value!r} is not valid: expected unset without use_peft: true" in capsys.readouterr().err
    assert not (workdir / "out").exists()


# -- training, saving, equality with TRL by hand -------------------------------------------------------------


@pytest.mark.slow
def test_lora_config_trains_the_adapter_and_saves_it_as_peft_does(workdir, capsys):
    assert cli.main(["train", write(workdir, lf_lora(loraplus_lr_ratio=4))]) == 0
    out = workdir / "saves" / "tiny" / "lora" / "sft"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at zero: it trained
    plan = {p["name"]: p for p in json.loads((out / "strategy_plan.json").read_text())["parameters"]}
    lora_b = [p for n, p in plan.items() if ".lora_B." in n]
    assert lora_b and all(p["lr"] == pytest.approx(4e-2) for p in lora_b)  # LoRA+: 4x learning_rate
    # The base model is loaded from its folder and the adapter applied: PEFT reads what was saved.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), out)
    for name, tensor in adapter.items():
        assert torch.equal(dict(model.named_parameters())[name.replace(".weight", ".default.weight")], tensor), name


@pytest.mark.slow
def test_cli_lora_equals_sft_trainer_given_the_same_peft_config_by_hand(workdir):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hf_llama_strategies.cli.config import CliDataArguments, parse_config
    from hf_llama_strategies.data.template_data import load_template_data
    from hf_llama_strategies.training.label_head import install_label_head

    config = lf_lora()
    assert cli.main(["train", write(workdir, config)]) == 0
    native = translate_llamafactory(config, str(workdir), [])
    data_args = parse_config(native).data
    assert isinstance(data_args, CliDataArguments)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tiny")
    data = load_template_data(data_args, data_args, tokenizer)
    args = SFTConfig(output_dir=str(workdir / "hand"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                     use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=None, seed=0, report_to="none",
                     learning_rate=1e-2, bf16=False, dataloader_pin_memory=False)
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    hand = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(workdir / "tiny"), args=args,
                      train_dataset=data.train, processing_class=tokenizer, peft_config=peft_config)
    # The CLI's SFT trainer scores labels with the CPU label head (its agreement with TRL's own head is
    # tests/test_label_head.py's); given the same head, the hand-built run is the CLI's bit for bit.
    assert install_label_head(hand.model.get_base_model())
    hand.train()
    out = workdir / "saves" / "tiny" / "lora" / "sft"
    assert len(losses(out)) == 3 and losses(out) == [h["loss"] for h in hand.state.log_history if "loss" in h]
    saved = load_file(str(out / "adapter_model.safetensors"))
    ours = {n.replace(".default", ""): p.detach() for n, p in hand.model.named_parameters() if p.requires_grad}
    assert saved.keys() == ours.keys()
    assert all(torch.equal(saved[n], ours[n]) for n in saved)


@pytest.mark.slow
def test_lora_on_the_body_with_the_last_layer_in_full_then_export(workdir, capsys):
    config = {"model_name_or_path": "tiny", "task": "sft", "train_file": "data/reviews.json", "template": "chatml",
              "output_dir": "out", "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "lora_target_modules": ["all-linear"], "lora_full_layers": "-1:", "lr_rules": ["modules_to_save=x0.5"],
              "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "use_cpu": True,
              "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "max_seq_length": 64}
    assert cli.main(["train", write(workdir, config)]) == 0
    out = workdir / "out"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    base = load_file(str(workdir / "tiny" / "model.safetensors"))
    # Layer 2 (the last of 3) trained whole, saved with the adapter; layers 0 and 1 have adapters, layer 2 none.
    full = [k for k in adapter if ".layers.2." in k]
    assert full and not any("lora_" in k for k in full) and any(".layers.1." in k and "lora_A" in k for k in adapter)
    assert not torch.equal(adapter["base_model.model.model.layers.2.mlp.up_proj.weight"],
                           base["model.layers.2.mlp.up_proj.weight"])
    plan = {p["name"]: p for p in json.loads((out / "strategy_plan.json").read_text())["parameters"]}
    assert plan["base_model.model.model.layers.2.modules_to_save.default.mlp.up_proj.weight"]["lr"] == 5e-3

    merge = {"model_name_or_path": "tiny", "adapter_name_or_path": "out", "template": "chatml",
             "export_dir": "merged", "export_size": 5, "export_device": "cpu", "export_legacy_format": False}
    assert cli.main(["export", write(workdir, merge, "merge.yaml")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(workdir / "merged")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "tiny"), out)
    assert torch.equal(merged.state_dict()["model.layers.2.mlp.up_proj.weight"],
                       adapter["base_model.model.model.layers.2.mlp.up_proj.weight"])
    ids = torch.tensor([[4, 10, 20, 30, 5, 7]])
    with torch.no_grad():
        # x(W + s BA) against xW + s (xB)A in float32: the same sums in another order, rounding ~1e-7 relative.
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
    assert (workdir / "merged" / "tokenizer_config.json").is_file()
    assert cli.main(["export", write(workdir, merge, "merge.yaml")]) == 2  # export_dir now holds the model
    assert "export_dir='merged' is not valid: expected a new or empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_an_adapter_trains_further_or_is_merged_before_a_new_one(workdir, capsys):
    assert cli.main(["train", write(workdir, lf_lora(output_dir="first"))]) == 0
    first = load_file(str(workdir / "first" / "adapter_model.safetensors"))
    # Resumed: the run starts from the first adapter's weights and trains them further.
    assert cli.main(["train", write(workdir, lf_lora(output_dir="second", adapter_name_or_path="first"))]) == 0
    assert "trains further" in capsys.readouterr().out
    second = load_file(str(workdir / "second" / "adapter_model.safetensors"))
    assert second.keys() == first.keys() and any(not torch.equal(second[k], first[k]) for k in first)
    # create_new_adapter: the first one merged into the model, a fresh adapter trained on top of it.
    config = lf_lora(output_dir="third", adapter_name_or_path="first", create_new_adapter=True)
    assert cli.main(["train", write(workdir, config)]) == 0
    assert "merged into the model" in capsys.readouterr().out
    # The first loss is the starting model's: base + first adapter, whether merged (a fresh adapter adds zero:
    # B starts at 0) or applied. x(W + sBA) and xW + s(xB)A are the same sums in another order: float32
    # rounding, ~1e-7 relative; training moved the first adapter far more than that from the base.
    first_loss = [losses(workdir / name)[0] for name in ("first", "second", "third")]
    assert first_loss[2] == pytest.approx(first_loss[1], rel=1e-6)
    assert abs(first_loss[1] - first_loss[0]) > 1e-3


@pytest.mark.slow
def test_tokens_a_template_adds_grow_the_embeddings_and_train_with_the_adapter(workdir, capsys):
    # The demo tokenizer has no <|eot_id|>: llama3 adds it (and <|eom_id|>), as LLaMA-Factory does.
    before = snapshot(AutoModelForCausalLM.from_pretrained(workdir / "tiny"))
    assert cli.main(["train", write(workdir, lf_lora(template="llama3"))]) == 0
    printed = capsys.readouterr().out
    assert "embeddings resized from 138 to 192 rows for the 2 token(s) added to the vocabulary" in printed
    out = workdir / "saves" / "tiny" / "lora" / "sft"
    assert set(json.loads((out / "adapter_config.json").read_text())["modules_to_save"]) == {"embed_tokens",
                                                                                               "lm_head"}
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|eot_id|>"
    assert before == snapshot(AutoModelForCausalLM.from_pretrained(workdir / "tiny"))  # the base is untouched


@pytest.mark.slow
def test_use_peft_trains_an_adapter_for_causal_lm_too(workdir):
    (workdir / "corpus.txt").write_text("\n".join(r["instruction"] for r in RECORDS), encoding="utf-8")
    config = {"model_name_or_path": "tiny", "task": "causal_lm", "train_file": "corpus.txt", "output_dir": "lm",
              "use_peft": True, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"], "max_steps": 2,
              "per_device_train_batch_size": 4, "max_seq_length": 16, "use_cpu": True, "save_strategy": "no",
              "report_to": "none", "disable_tqdm": True, "trainable_layers": "-1:"}
    assert cli.main(["train", write(workdir, config)]) == 0
    adapter = load_file(str(workdir / "lm" / "adapter_model.safetensors"))
    assert json.loads((workdir / "lm" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    # trainable_layers on a LoRA model picks whose adapters train: the last layer's moved, the others' B stayed 0.
    assert all(v.any() == (".layers.2." in k) for k, v in adapter.items() if ".lora_B." in k)
