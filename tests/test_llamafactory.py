"""LLaMA-Factory training YAMLs: the translation key by key, the refusals, and freeze / full configs
trained end to end from the CLI with a dataset_info.json written here."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'hf-llama-strategies[trl]'")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from hf_llama_strategies import cli  # noqa: E402
from hf_llama_strategies.cli.llamafactory import is_llamafactory_config, translate_llamafactory  # noqa: E402
from hf_llama_strategies.errors import UnsupportedKeyError  # noqa: E402

ALPACA = [
    {"instruction": "what is the sentiment of this review ?", "input": "the film was brilliant", "output": "positive"},
    {"instruction": "which part of the film does this review talk about ?", "input": "the plot was dull",
     "output": "the plot"},
    {"instruction": "give a word that means the same as dull .", "input": "", "output": "boring"},
] * 4
# ShareGPT in OpenAI-style tags, with its own column names (as LLaMA-Factory's mllm/openai entries).
CHATS = [
    {"dialog": [{"role": "user", "content": "the cast was weak ?"}, {"role": "assistant", "content": "negative"},
                {"role": "user", "content": "and the ending ?"}, {"role": "assistant", "content": "moving"}],
     "sys": "you are a film critic assistant ."},
] * 6
DATASET_INFO = {
    "reviews": {"file_name": "reviews.json"},
    "renamed": {"file_name": "renamed.jsonl", "columns": {"prompt": "q", "query": "ctx", "response": "a"}},
    "chats": {"file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "system": "sys"},
              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "pairs": {"file_name": "reviews.json", "ranking": True},
    "hub": {"hf_hub_url": "llamafactory/alpaca_en"},
    # As LLaMA-Factory's c4_demo / wiki_demo: one text column, pre-training data.
    "text": {"file_name": "reviews.json", "columns": {"prompt": "instruction"}},
    "broken": {"file_name": "broken.json"},
    "flat_columns": {"file_name": "reviews.json", "columns": "instruction"},
    "listed_tags": {"file_name": "chats.json", "formatting": "sharegpt", "tags": ["role"]},
    "many": {"file_name": "reviews.json", "num_samples": "many"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory laid out like LLaMA-Factory's: data/ with dataset_info.json, a tiny model; cwd there."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO), encoding="utf-8")
    # One malformed record (an empty reply): LLaMA-Factory skips such records, and so does the translation.
    (data / "reviews.json").write_text(json.dumps(ALPACA[:1] + [{"instruction": "x", "output": ""}] + ALPACA[1:]),
                                       encoding="utf-8")
    (data / "renamed.jsonl").write_text("".join(
        json.dumps({"q": r["instruction"], "ctx": r["input"], "a": r["output"]}) + "\n" for r in ALPACA),
        encoding="utf-8")
    (data / "chats.json").write_text(json.dumps(CHATS), encoding="utf-8")
    (data / "broken.json").write_text(json.dumps([{"instruction": "x"}] * 3), encoding="utf-8")
    (tmp_path / "examples" / "deepspeed").mkdir(parents=True)
    (tmp_path / "examples" / "deepspeed" / "ds_z3_config.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}), encoding="utf-8")
    # The classification demo's tokenizer: it has no chat template, so `template` must supply one.
    tokenizer = AutoTokenizer.from_pretrained(cli.DEMO_DIR)
    assert not tokenizer.chat_template
    model = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256).save_pretrained(model)
    tokenizer.save_pretrained(model)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def lf_config(**extra):
    """Keys as LLaMA-Factory's examples/train_full and llama_pro freeze examples write them."""
    config = {
        "model_name_or_path": "tiny", "trust_remote_code": True, "stage": "sft", "do_train": True,
        "finetuning_type": "freeze", "freeze_trainable_layers": 1, "freeze_trainable_modules": "all",
        "deepspeed": "examples/deepspeed/ds_z3_config.json",
        "dataset": "reviews,chats", "template": "llama3", "cutoff_len": 96, "max_samples": 10,
        "overwrite_cache": True, "preprocessing_num_workers": 16, "dataloader_num_workers": 0,
        "output_dir": "saves/tiny/freeze/sft", "logging_steps": 1, "save_steps": 500, "plot_loss": True,
        "overwrite_output_dir": True, "save_only_model": False, "report_to": "none",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1.0e-3,
        "max_steps": 3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
        "ddp_timeout": 180000000, "resume_from_checkpoint": None,
        "val_size": 0.2, "per_device_eval_batch_size": 2, "eval_strategy": "steps", "eval_steps": 3,
    }
    config.update(extra)
    return config


def write(workdir, config, name="lf.yaml"):
    path = workdir / "examples" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(path)


# -- the translation -----------------------------------------------------------------------


def translate(workdir, **extra):
    return translate_llamafactory(cli.load_config_file(write(workdir, lf_config(**extra))), str(workdir / "examples"))


@pytest.mark.parametrize(
    "lf, native",
    [
        ({"freeze_trainable_layers": 2}, {"trainable_layers": "-2:"}),
        ({"freeze_trainable_layers": -2}, {"trainable_layers": ":2"}),
        ({"freeze_trainable_layers": 8}, {"trainable_layers": "-3:"}),  # more than the model has: all of them
        ({"freeze_trainable_layers": 1, "use_llama_pro": True}, {"trainable_layers": "2::3"}),
        ({"freeze_trainable_modules": "mlp,self_attn"}, {"trainable_modules": "mlp,self_attn"}),
        ({"freeze_extra_modules": "embed_tokens,lm_head"}, {"train_embeddings": True, "train_head": True}),
        ({"freeze_extra_modules": "norm"}, {"trainable_params": ["norm"], "train_norm": False}),
        ({}, {"train_embeddings": False, "train_norm": False, "train_head": False, "trainable_layers": "-1:"}),
        ({"cutoff_len": 1024, "template": "qwen"}, {"max_seq_length": 1024, "template": "qwen"}),
        ({"template": "qwen3_5_nothink", "tool_format": "qwen"}, {"template": "qwen3_5_nothink",
                                                                  "tool_format": "qwen"}),
        ({"warmup_ratio": 0.25, "evaluation_strategy": "epoch"}, {"warmup_steps": 0.25, "eval_strategy": "epoch"}),
        ({"val_size": 0.1, "train_on_prompt": True}, {"validation_split": 0.1, "train_on_prompt": True}),
        ({"pure_bf16": True, "bf16": False}, {"pure_bf16": True, "model_dtype": "bfloat16", "precision": "auto"}),
        ({"neat_packing": True}, {"packing": True}),
        ({"use_dft_loss": True, "mask_history": True}, {"sft_loss": "dft", "mask_history": True}),
        # LLaMA-Factory checkpoints activations unless told not to (reentrant unless use_reentrant_gc: false).
        ({}, {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}),
        ({"use_reentrant_gc": False}, {"activation_checkpointing_kwargs": {"use_reentrant": False}}),
        ({"gradient_checkpointing": False}, {"activation_checkpointing": True, "gradient_checkpointing": False}),
    ],
)
def test_keys_translate(workdir, lf, native):
    out = translate(workdir, **lf)
    for key, value in native.items():
        assert out[key] == value, key
    assert out["task"] == "sft"


def test_disable_gradient_checkpointing_leaves_activations_unchecked(workdir):
    out = translate(workdir, disable_gradient_checkpointing=True, use_reentrant_gc=False)
    assert not {"activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing"} & set(out)
    from hf_llama_strategies.cli.config import parse_config

    assert parse_config(translate(workdir)).training.activation_checkpointing is True
    assert parse_config(out).training.activation_checkpointing is False


def test_datasets_translate_with_their_columns_tags_and_limits(workdir):
    out = translate(workdir, dataset=["reviews", "renamed", "chats"], eval_dataset="chats", max_samples=5)
    files = [spec["file"] for spec in out["sft_datasets"]]
    assert files == [str(workdir / "data" / n) for n in ("reviews.json", "renamed.jsonl", "chats.json")]
    assert [spec["format"] for spec in out["sft_datasets"]] == ["alpaca", "alpaca", "sharegpt"]
    assert out["sft_datasets"][1]["columns"]["prompt"] == "q"
    assert out["sft_datasets"][2]["tags"]["role_tag"] == "role"
    assert all(spec["max_samples"] == 5 for spec in out["sft_datasets"])
    assert out["sft_eval_datasets"][0]["file"].endswith("chats.json")
    assert out["deepspeed"] == str(workdir / "examples" / "deepspeed" / "ds_z3_config.json")


@pytest.mark.parametrize("gpu, world_size", [(False, "1"), (True, "1"), (False, "4"), (True, "8")])
def test_the_translation_is_the_same_on_every_machine(workdir, monkeypatch, gpu, world_size):
    # Issue 20: it asked for a GPU and WORLD_SIZE while translating. The hardware decides when the run starts.
    reference = translate(workdir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert translate(workdir) == reference
    assert reference["precision"] == "bf16" and "bf16" not in reference and "use_cpu" not in reference


def test_deepspeed_for_one_process_without_a_gpu_is_left_out_when_the_run_starts(workdir, monkeypatch):
    from hf_llama_strategies.cli.llamafactory import leave_idle_deepspeed_out

    translated = translate(workdir)
    notes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "deepspeed" not in leave_idle_deepspeed_out(translated, notes)
    assert notes == [f"deepspeed {workdir / 'examples' / 'deepspeed' / 'ds_z3_config.json'}: not used "
                     "(one process, no GPU: ZeRO has nothing to partition across)"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched on two processes: kept
    assert leave_idle_deepspeed_out(translated, []) == translated


def test_dataset_dir_is_found_above_the_config_from_another_directory(workdir, monkeypatch):
    path = workdir / "examples" / "train_freeze" / "lf.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(lf_config(model_name_or_path=str(workdir / "tiny"))), encoding="utf-8")
    monkeypatch.chdir(workdir / "examples")  # neither the config's directory nor LF's root
    out = translate_llamafactory(cli.load_config_file(str(path)), str(path.parent))
    assert out["sft_datasets"][0]["file"] == str(workdir / "data" / "reviews.json")


def test_cutoff_len_beyond_learned_positions_is_cut(workdir):
    tiny_model("gpt2").save_pretrained(workdir / "gpt2")  # 64 learned positions
    out = translate(workdir, model_name_or_path=str(workdir / "gpt2"), cutoff_len=2048, finetuning_type="full")
    assert out["max_seq_length"] == 64
    assert translate(workdir, cutoff_len=2048)["max_seq_length"] == 2048  # RoPE: as written


def test_full_ignores_freeze_keys(workdir):
    out = translate(workdir, finetuning_type="full")
    assert not {"trainable_layers", "train_head", "train_norm", "train_embeddings"} & set(out)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"stage": "dpo"}, "stage='dpo' has no meaning here"),
        ({"stage": "rm"}, "stage='rm'"),
        ({"stage": "pt"}, "task: causal_lm"),
        ({"finetuning_type": "oft"}, "finetuning_type='oft' has no meaning here: only lora, freeze and full"),
        ({"lora_rank": 8}, "lora_rank=8 has no meaning here: it is a LoRA key, and finetuning_type is freeze"),
        ({"pref_beta": 0.1}, "preference training"),
        ({"reward_model": "rm"}, "reward models are for PPO"),
        ({"use_galore": True, "galore_rank": 16}, "use_galore=True"),
        ({"use_asft_loss": True}, "use_asft_loss=True"),
        ({"pipeline_model_parallel_size": 4}, "pipeline_model_parallel_size=4 has no meaning here: a Megatron-Core"),
        ({"quantization_bit": 4}, "quantization_bit=4"),
        ({"template": "qwen2_vl"}, "multimodal template"),
        ({"template": "no_such_template"}, "it is not one of the templates written here"),
        ({"dataset": "pairs"}, "pairwise (DPO/RM) data"),
        ({"dataset": "hub"}, "it is on a hub"),
        ({"dataset": "nope"}, "dataset='nope' is not valid"),
        ({"learning_rat": 1e-4}, "did you mean 'learning_rate'"),
        ({"dataset": "text"}, "pre-training (stage: pt) data"),
        ({"dataset": "broken"}, "broken.json: the response `output` is missing"),
        ({"dataset": "flat_columns"}, "dataset 'flat_columns' columns='instruction' is not valid: expected a mapping"),
        ({"dataset": "listed_tags"}, "dataset 'listed_tags' tags=['role'] is not valid"),
        ({"dataset": "many"}, "dataset 'many' num_samples='many' is not valid: expected a whole number"),
        ({"cutoff_len": "long"}, "cutoff_len='long' is not valid: expected a whole number of at least 1"),
        ({"cutoff_len": -5}, "cutoff_len=-5 is not valid"),
        ({"max_samples": 0}, "max_samples=0 is not valid"),
        ({"freeze_trainable_layers": "two"}, "freeze_trainable_layers='two' is not valid"),
        ({"warmup_ratio": 5}, "warmup_ratio=5 is not valid: expected a fraction"),
        ({"use_dft_loss": "x"}, "use_dft_loss='x' is not valid: expected true or false"),
        ({"neat_packing": "yes"}, "neat_packing='yes' is not valid"),
        ({"use_llama_pro": 1}, "use_llama_pro=1 is not valid"),
    ],
)
def test_keys_without_meaning_here_are_refused_by_name(workdir, capsys, change, fragment):
    path = write(workdir, lf_config(**change))
    assert cli.main(["train", path]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "saves").exists()


def test_a_malformed_dataset_info_is_refused_naming_it(workdir, capsys):
    (workdir / "data" / "dataset_info.json").write_text('{"reviews": ', encoding="utf-8")
    assert cli.main(["train", write(workdir, lf_config())]) == 2
    err = capsys.readouterr().err
    assert "dataset_dir=" in err and "a valid JSON" in err and len(err.strip().splitlines()) == 1, err
    assert not (workdir / "saves").exists()


def test_galore_keys_with_galore_off_are_dropped_with_a_note(workdir):
    notes = []
    from hf_llama_strategies.cli.llamafactory import _check_key

    assert _check_key("galore_rank", 16, {"use_galore": False}, set(), notes) == "drop"
    assert "galore_rank" in notes[0]
    with pytest.raises(UnsupportedKeyError, match="use_galore"):
        _check_key("galore_rank", 16, {"use_galore": True}, set(), [])


def test_native_configs_are_not_taken_for_llamafactory_ones():
    assert not is_llamafactory_config(dict(cli.DEMO_CONFIG)) and not is_llamafactory_config(dict(cli.DEMO_SFT_CONFIG))
    assert is_llamafactory_config(lf_config())
    assert is_llamafactory_config({"dataset": "a", "template": "qwen"}) and not is_llamafactory_config({"dataset": "a"})


# -- end to end ----------------------------------------------------------------------------


def test_freeze_config_trains_end_to_end_and_prints_the_native_yaml(workdir, capsys):
    initial = {k: v.clone() for k, v in load_file(str(workdir / "tiny" / "model.safetensors")).items()}
    path = write(workdir, lf_config(freeze_extra_modules="lm_head"))
    assert cli.main(["train", path]) == 0
    printed = capsys.readouterr().out
    header = "# LLaMA-Factory config translated; the equivalent native hf-llama-strategies YAML:"
    assert header in printed
    native = yaml.safe_load(printed[printed.index(header):printed.index("\nhf-llama-strategies")])
    assert native["trainable_layers"] == "-1:" and native["template"] == "llama3"
    # LLaMA-Factory keeps a record with an empty reply (it learns the end of turn alone): so does the template.
    assert "skipped" not in printed
    # The demo tokenizer has no <|eot_id|>: added as EOS, <|eom_id|> as a stop word, the embeddings grown to 128 rows.
    assert "template llama3: EOS is <|eot_id|> (added to the vocabulary)" in printed
    assert "embeddings resized from 106 to 128 rows for the 2 token(s) added" in printed

    out = workdir / "saves" / "tiny" / "freeze" / "sft"
    saved = load_file(str(out / "model.safetensors"))
    plan = {p["name"]: p for p in json.loads((out / "strategy_plan.json").read_text())["parameters"]}
    for name, before in initial.items():
        trains = name.startswith(("model.layers.2.", "lm_head."))
        assert plan[name]["trainable"] == trains, name
        # LLaMA-Factory's bf16: weights loaded in bf16, the trainable ones trained in fp32; the
        # final model is saved in the dtype it was loaded in.
        assert plan[name]["dtype"] == ("torch.float32" if trains else "torch.bfloat16"), name
        assert saved[name].dtype == torch.bfloat16, name
        same = torch.equal(saved[name][: before.shape[0]], before.to(torch.bfloat16))
        if not trains:
            assert same, name
        elif "norm" not in name:  # a norm's steps of ~1e-3 round away in bf16 (spacing 2^-7 near 1)
            assert not same, name
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] > 0 and "perplexity" in results
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and any("eval_loss" in h for h in state["log_history"])

    # The printed YAML is a native config that trains the same way.
    native["output_dir"] = str(workdir / "native")
    assert cli.main(["train", write(workdir, native, "native.yaml")]) == 0
    again = load_file(str(workdir / "native" / "model.safetensors"))
    assert all(torch.equal(again[n], saved[n]) for n in saved)


def test_full_config_trains_end_to_end(workdir):
    initial = load_file(str(workdir / "tiny" / "model.safetensors"))
    config = lf_config(finetuning_type="full", dataset="chats,renamed", template="qwen", bf16=False,
                       output_dir="saves/tiny/full/sft")
    for key in ("freeze_trainable_layers", "freeze_trainable_modules"):
        config.pop(key)
    assert cli.main(["train", write(workdir, config)]) == 0
    saved = load_file(str(workdir / "saves" / "tiny" / "full" / "sft" / "model.safetensors"))
    assert all(saved[n].dtype == torch.float32 and not torch.equal(saved[n], initial[n]) for n in initial)
    tokenizer_config = (workdir / "saves" / "tiny" / "full" / "sft" / "chat_template.jinja")
    assert tokenizer_config.is_file() and "<|im_start|>" in tokenizer_config.read_text()
