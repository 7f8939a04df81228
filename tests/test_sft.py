"""task: sft: the three record formats, the prompt masking, equality with SFTTrainer run by hand,
exact resume, every bad-record class, the demo."""

from __future__ import annotations

import json
import math
import sys

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'hf-llama-strategies[trl]'")

import torch  # noqa: E402
from helpers import snapshot  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from hf_llama_strategies import StrategyArguments, cli  # noqa: E402
from hf_llama_strategies.cli.config import CliDataArguments  # noqa: E402
from hf_llama_strategies.data.chat_templates import build_chat_template  # noqa: E402
from hf_llama_strategies.data.sft import _Bad, detect_format, load_sft_data, to_messages  # noqa: E402
from hf_llama_strategies.errors import BadRecordError  # noqa: E402

SFT_DIR = cli.DEMO_SFT_DIR
SYSTEM = "you are a film critic assistant ."
ALPACA = [
    {"instruction": "what is the sentiment of this review ?", "input": "the film was brilliant", "output": "positive"},
    {"instruction": "which part of the film does this review talk about ?", "input": "the plot was dull",
     "output": "the plot", "system": SYSTEM},
    {"instruction": "give a word that means the same as dull .", "input": "", "output": "boring",
     "history": [["what is the sentiment of this review ?\nthe cast was weak", "negative"]]},
    {"instruction": "what is the sentiment of this review ?", "input": "the ending was moving", "output": "positive"},
] * 4


def write_json(path, records, lines=False):
    with open(path, "w", encoding="utf-8") as fh:
        if lines:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, fh)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SFT_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-sft"
    tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=128).save_pretrained(path)
    return str(path)


def sft_config(model_dir, out, train_file, **extra):
    config = {
        "model_name_or_path": model_dir, "tokenizer_name_or_path": SFT_DIR, "task": "sft", "train_file": train_file,
        "output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1,
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "max_seq_length": 64, "seed": 0,
        "report_to": "none", "precision": "auto", "learning_rate": 1e-3, "trainable_layers": "-1:",
    }
    config.update(extra)
    return config


def run_cli(tmp_path, config, *overrides):
    import yaml

    path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return cli.main(["train", str(path), *overrides])


# -- formats ----------------------------------------------------------------------------------

EXPECTED = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "what is the sentiment of this review ?\nthe film was brilliant"},
    {"role": "assistant", "content": "positive"},
]


def test_the_three_formats_become_the_same_messages():
    alpaca = {"system": SYSTEM, "history": [["hello", "hi"]], "instruction": "what is the sentiment of this review ?",
              "input": "the film was brilliant", "output": "positive"}
    sharegpt = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "hello"},
                                  {"from": "gpt", "value": "hi"}, {"from": "human", "value": EXPECTED[3]["content"]},
                                  {"from": "gpt", "value": "positive"}]}
    openai = {"messages": EXPECTED}
    for record, fmt in ((alpaca, "alpaca"), (sharegpt, "sharegpt"), (openai, "openai")):
        assert detect_format(record) == fmt
        assert to_messages(record, fmt) == EXPECTED
    # ShareGPT with OpenAI-style tags (LLaMA-Factory's `tags`), and renamed Alpaca columns.
    tagged = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    assert detect_format(tagged) == "openai"
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    assert to_messages(tagged, "sharegpt", {"messages": "messages"}, tags) == EXPECTED[1:3]
    renamed = {"q": "hello", "a": "hi"}
    assert to_messages(renamed, "alpaca", {"prompt": "q", "response": "a", "query": None}) == EXPECTED[1:3]
    # Tool calls (LLaMA-Factory's glaive demo): the call is a reply, the observation a tool turn.
    tools = {"conversations": [{"from": "human", "value": "find a recipe"},
                               {"from": "function_call", "value": '{"name": "search"}'},
                               {"from": "observation", "value": '{"recipes": []}'}, {"from": "gpt", "value": "none"}],
             "tools": '[{"name": "search"}]'}
    messages = to_messages(tools, "sharegpt", {"tools": "tools"})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert '[{"name": "search"}]' in messages[0]["content"]


def test_each_format_trains_from_the_cli_with_its_format_detected(tmp_path, model_dir):
    files = {
        "alpaca": write_json(tmp_path / "a.json", ALPACA),
        "sharegpt": write_json(tmp_path / "s.jsonl", [{"conversations": [
            {"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["output"]}]} for r in ALPACA],
            lines=True),
        "openai": write_json(tmp_path / "o.jsonl", [{"messages": [
            {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in ALPACA], lines=True),
    }
    for fmt, path in files.items():
        out = tmp_path / fmt
        # task: auto recognises instruction/chat records.
        assert run_cli(tmp_path, sft_config(model_dir, out, path, task="auto", max_steps=1)) == 0, fmt
        assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
        assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()


# -- masking ----------------------------------------------------------------------------------


def expected_labels(tokenizer, messages, template):
    """Labels from rendering prefixes: the tokens each reply adds are learned, all others are -100."""
    def length(msgs):
        return len(tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=True, return_dict=True)
                   ["input_ids"]) if msgs else 0

    ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = length(messages[:k]), length(messages[: k + 1])
            assert end > start
            labels[start:end] = ids[start:end]
    return ids, labels


def prepared(tmp_path, model_dir, tokenizer, records, **sft):
    from hf_llama_strategies.training.trl import build_sft_trainer

    data_args = CliDataArguments(train_file=write_json(tmp_path / "m.json", records), max_seq_length=64, **sft)
    data = load_sft_data(data_args, data_args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    training_args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    trainer = build_sft_trainer(model, training_args, data_args, data_args, data, tokenizer, StrategyArguments())
    return data, trainer.train_dataset


def test_prompt_tokens_are_masked_and_every_reply_is_learned(tmp_path, model_dir, tokenizer):
    template = tokenizer.chat_template
    data, dataset = prepared(tmp_path, model_dir, tokenizer, ALPACA[:4])
    assert data.assistant_only_loss
    for row, record in zip(dataset, ALPACA[:4]):
        ids, labels = expected_labels(tokenizer, to_messages(record, "alpaca"), template)
        assert row["input_ids"] == ids
        assert row["labels"] == labels
    # The multi-turn record: both replies (with their end-of-turn token) are learned, nothing else.
    learned = [t for t in dataset[2]["labels"] if t != -100]
    assert tokenizer.decode(learned) == "negative <|im_end|> boring <|im_end|>"


def test_train_on_prompt_learns_every_token(tmp_path, model_dir, tokenizer):
    data, dataset = prepared(tmp_path, model_dir, tokenizer, ALPACA[:4], train_on_prompt=True)
    assert not data.assistant_only_loss
    assert all(row["labels"] == row["input_ids"] for row in dataset)


def test_a_template_without_generation_markers_learns_the_last_reply(tmp_path, model_dir, tokenizer):
    plain = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    template_file = tmp_path / "plain.jinja"
    template_file.write_text(plain, encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(SFT_DIR)
    data, dataset = prepared(tmp_path, model_dir, tok, ALPACA[:4], chat_template=str(template_file))
    assert not data.assistant_only_loss and "prompt" in data.train.column_names
    learned = [t for t in dataset[2]["labels"] if t != -100]
    assert tok.decode(learned) == "assistant boring"  # the history reply is context only


def test_mask_history_learns_only_the_last_reply(tmp_path, model_dir, tokenizer):
    data, dataset = prepared(tmp_path, model_dir, tokenizer, ALPACA[:4], mask_history=True)
    assert not data.assistant_only_loss
    learned = [t for t in dataset[2]["labels"] if t != -100]
    assert tokenizer.decode(learned) == "boring <|im_end|>"


def test_dft_loss_weights_tokens_by_their_probability(tmp_path, model_dir):
    train_file = write_json(tmp_path / "a.json", ALPACA)
    first = {}
    for loss in ("nll", "dft"):
        out = tmp_path / loss
        assert run_cli(tmp_path, sft_config(model_dir, out, train_file, sft_loss=loss, max_steps=1)) == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        first[loss] = history[0]["loss"]
    # DFT scales each token's -log p by p (< 1): the same first batch has a smaller loss.
    assert 0 < first["dft"] < first["nll"] / 10


def test_packing_packs_into_max_seq_length_blocks(tmp_path, model_dir, tokenizer):
    _, dataset = prepared(tmp_path, model_dir, tokenizer, ALPACA, packing=True)
    assert len(dataset) < len(ALPACA)
    assert all(len(row["input_ids"]) <= 64 for row in dataset)
    assert sum(len(r["input_ids"]) for r in dataset) == sum(
        len(tokenizer.apply_chat_template(to_messages(r, "alpaca"), tokenize=True, return_dict=True)["input_ids"])
        for r in ALPACA
    )


# -- equality with SFTTrainer by hand, resume ----------------------------------------------------


def test_cli_equals_sft_trainer_run_by_hand_with_the_same_freezing(tmp_path, model_dir, tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = tmp_path / "cli"
    assert run_cli(tmp_path, sft_config(model_dir, out, write_json(tmp_path / "a.json", ALPACA))) == 0

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    start = snapshot(model)
    for name, param in model.named_parameters():  # trainable_layers "-1:": layer 2, final norm, head
        param.requires_grad_(name.startswith(("model.layers.2.", "model.norm.", "lm_head.")))
    messages = []
    for r in ALPACA:  # converted by hand, not by the library
        turns = [{"role": "system", "content": r["system"]}] if "system" in r else []
        for q, a in r.get("history", []):
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        messages.append({"messages": turns + [{"role": "user", "content": user},
                                              {"role": "assistant", "content": r["output"]}]})
    args = SFTConfig(
        output_dir=str(tmp_path / "hand"), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
        use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=64, seed=0, report_to="none",
        learning_rate=1e-3, bf16=False, gradient_checkpointing=False, assistant_only_loss=True,
        dataloader_pin_memory=False,
    )
    tok = AutoTokenizer.from_pretrained(SFT_DIR)
    hand = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(messages), processing_class=tok)
    hand.train()

    state = json.loads((out / "trainer_state.json").read_text())
    cli_losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    hand_losses = [h["loss"] for h in hand.state.log_history if "loss" in h]
    assert len(cli_losses) == 4 and cli_losses == hand_losses
    saved = load_file(str(out / "model.safetensors"))
    ours = snapshot(model)
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        if name in params and params[name].requires_grad:
            # The CLI's CPU label head (training/label_head.py) sums the head's gradients over the
            # vocabulary in another float32 order than TRL's tiles; Adam turns that into ~3e-6 on a
            # trained weight (tests/test_label_head.py), so 1e-5. Frozen weights stay bit for bit.
            assert torch.allclose(tensor, params[name].detach(), rtol=0, atol=1e-5), name
            continue
        assert tensor.flatten().view(torch.uint8).numpy().tobytes() == ours[name], name
    assert ours["model.layers.0.mlp.up_proj.weight"] == start["model.layers.0.mlp.up_proj.weight"]
    assert ours["model.layers.2.mlp.up_proj.weight"] != start["model.layers.2.mlp.up_proj.weight"]


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, model_dir):
    train_file = write_json(tmp_path / "a.json", ALPACA)
    whole = tmp_path / "whole"
    config = sft_config(model_dir, whole, train_file, save_strategy="steps", save_steps=2, head_lr=5e-3)
    assert run_cli(tmp_path, config) == 0
    resumed = tmp_path / "resumed"
    config.update(output_dir=str(resumed), resume_from_checkpoint=str(whole / "checkpoint-2"))
    assert run_cli(tmp_path, config) == 0
    assert load_file(str(whole / "model.safetensors")).keys() == load_file(str(resumed / "model.safetensors")).keys()
    for name, tensor in load_file(str(whole / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(resumed / "model.safetensors"))[name]), name

    def late_losses(path):
        history = json.loads((path / "trainer_state.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h and h["step"] > 2]

    assert len(late_losses(whole)) == 2 and late_losses(whole) == late_losses(resumed)


# -- bad records ------------------------------------------------------------------------------

GOOD = {"instruction": "what is the sentiment of this review ?", "input": "the film was brilliant",
        "output": "positive"}


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"instruction": "what is it ?"}, "record 3: the `output` field is missing. Fix: add `output`"),
        ({"input": "the film", "output": "positive"}, "record 3: the `instruction` field is missing"),
        ({**GOOD, "output": "  "}, "record 3: the response `output` is empty. Fix: write the response"),
        ({**GOOD, "history": [["only a prompt"]]}, "record 3: `history` is not a list of [prompt, reply] pairs"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                       {"role": "assistant", "content": "c"}]}, "record 3: roles out of order (user -> user"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]}, "does not end with an assistant reply"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
         "turn 1 has the role 'robot'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
         "the reply in turn 1 is empty"),
        ({**GOOD, "input": " ".join(["the film was brilliant"] * 30)},
         "its prompt fills all 64 tokens (max_seq_length): no reply token is left to learn from"),
    ],
)
def test_bad_records_are_refused_with_file_record_and_fix(tmp_path, model_dir, capsys, bad, fragment):
    openai = "messages" in bad
    good = {"messages": to_messages(GOOD, "alpaca")} if openai else GOOD
    path = write_json(tmp_path / "bad.jsonl", [good, good, bad, good], lines=True)
    out = tmp_path / "out"
    assert run_cli(tmp_path, sft_config(model_dir, out, path, sft_format="openai" if openai else "alpaca")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-llama-strategies: error: {path}: ") and fragment in err, err
    assert "bad_records: skip" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_records_skip_leaves_them_out_and_counts_them(tmp_path, model_dir, capsys):
    records = [GOOD, {"instruction": "x"}, {**GOOD, "output": ""}] + [GOOD] * 5
    out = tmp_path / "out"
    config = sft_config(model_dir, out, write_json(tmp_path / "a.json", records), bad_records="skip", max_steps=1)
    assert run_cli(tmp_path, config) == 0
    assert "skipped 2 bad train record(s)" in capsys.readouterr().out


def test_bad_record_error_names_every_part_in_python(tmp_path, tokenizer):
    data_args = CliDataArguments(train_file=write_json(tmp_path / "a.json", [GOOD, {"output": "x"}]))
    with pytest.raises(BadRecordError, match=r"a\.json: record 2: the `instruction` field is missing"):
        load_sft_data(data_args, data_args, tokenizer)
    with pytest.raises(_Bad):
        to_messages([], "alpaca")


# -- templates, TRL, demo -------------------------------------------------------------------------


def test_no_chat_template_is_refused_naming_the_key(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    config = sft_config(model_dir, out, write_json(tmp_path / "a.json", ALPACA), tokenizer_name_or_path=cli.DEMO_DIR)
    assert run_cli(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert "chat_template=None is not valid" in err and "llama3" in err and "no chat template" in err
    assert not out.exists()
    # A shipped LLaMA-Factory template name supplies one.
    assert run_cli(tmp_path, {**config, "chat_template": "llama3", "max_steps": 1}) == 0


def test_shipped_templates_mark_exactly_the_replies():
    from hf_llama_strategies.data.chat_templates import TEMPLATES

    tok = AutoTokenizer.from_pretrained(SFT_DIR)
    messages = to_messages({"instruction": "the film .", "output": "positive", "system": SYSTEM}, "alpaca")
    for name in TEMPLATES:
        template = build_chat_template(name)
        out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        learned = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        text = tok.decode(learned)
        assert text.startswith("positive") or TEMPLATES[name].thinking and "positive" in text, (name, text)
        prompt = tok.apply_chat_template(messages[:-1], chat_template=template, add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        assert out["input_ids"][: len(prompt)] == prompt, name  # the prompt is a prefix: TRL's masking holds


def test_missing_trl_is_a_clear_error(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)
    out = tmp_path / "out"
    assert run_cli(tmp_path, sft_config(model_dir, out, write_json(tmp_path / "a.json", ALPACA))) == 2
    assert 'pip install "hf-llama-strategies[trl]"' in capsys.readouterr().err
    assert not out.exists()


def test_sft_demo_runs_with_one_command(tmp_path, capsys):
    out = tmp_path / "demo"
    quick = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
             "--max_eval_samples", "16", "--report_to", "none", "--disable_tqdm", "true"]
    assert cli.main(["train", "--task", "sft", "--output_dir", str(out), *quick]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] > 0 and results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    plan = json.loads((out / "strategy_plan.json").read_text())
    assert plan["strategy_args"]["trainable_layers"] == "-2:"
