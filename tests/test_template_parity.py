"""template: the examples are LLaMA-Factory's: ids and labels checked against its own output, record for record.

``fixtures/llamafactory/expected.json.gz`` was produced once by LLaMA-Factory 0.9.5 itself (see the
README there), for every template written here, three tokenizers (a byte-level BPE, a
SentencePiece one, the demo's word-level one), this project's own alpaca / sharegpt / openai
records (system prompts, history, tools, function calls, observations, thoughts, a reply
starting with a quote, bad records) and five settings (default, train_on_prompt,
mask_history, a short cutoff_len, both). Nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hf_llama_strategies.cli.config import CliDataArguments
from hf_llama_strategies.cli.llamafactory import translate_llamafactory
from hf_llama_strategies.data import tool_formats
from hf_llama_strategies.data.chat_templates import TEMPLATES, build_chat_template
from hf_llama_strategies.data.sft import SFTArguments, _Bad, read_records
from hf_llama_strategies.data.template_data import encode_record, template_spec
from hf_llama_strategies.data.template_tokens import Conversation, EncodeOptions, TemplateEncoder, prepare_tokenizer
from hf_llama_strategies.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llamafactory"
JOBS = json.loads((FIXTURES / "jobs.json").read_text(encoding="utf-8"))
with gzip.open(FIXTURES / "expected.json.gz", "rt", encoding="utf-8") as _fh:
    EXPECTED = json.load(_fh)


@functools.cache
def pristine(name: str):
    return AutoTokenizer.from_pretrained(ROOT / JOBS["tokenizers"][name])


@functools.cache
def specs(dataset: str) -> tuple:
    """The dataset's files with the columns and tags the LLaMA-Factory translation resolves."""
    info = JOBS["datasets"][dataset]
    native = translate_llamafactory({"stage": "sft", "finetuning_type": "full", "dataset": info["name"],
                                     "dataset_dir": str(ROOT / info["dir"]), "template": "empty"}, str(ROOT), [])
    return tuple(native["sft_datasets"])


def our_rows(tokenizer, template: str, dataset: str, setting: dict) -> list:
    """Ours, record by record: ``[input_ids, labels]``, or None for a bad record (one LLaMA-Factory drops, or
    fails on: it stops the whole run there, the translation's ``bad_records: skip`` leaves that record out)."""
    sft_args = SFTArguments(template=template, train_on_prompt=setting.get("train_on_prompt", False))
    encoder = TemplateEncoder(template_spec(sft_args), tokenizer)
    options = EncodeOptions(cutoff_len=setting["cutoff_len"], train_on_prompt=setting.get("train_on_prompt", False),
                            mask_history=setting.get("mask_history", False))
    rows = []
    for spec in specs(dataset):
        for record in read_records(spec["file"], "sft_datasets"):
            try:
                rows.append(list(encode_record(encoder, record, spec["format"], spec.get("columns"), spec.get("tags"),
                                               options)))
            except _Bad:
                rows.append(None)
    return rows


def as_ours(rows: list) -> list:
    """LLaMA-Factory's per-record output as ours would read: a dropped record or one it fails on is None."""
    return [row if isinstance(row, list) else None for row in rows]


@pytest.mark.slow  # 29 templates x 3 datasets x 5 settings: seconds per tokenizer
@pytest.mark.parametrize("tokenizer_name", sorted(JOBS["tokenizers"]))
def test_every_record_is_llamafactorys_own(tokenizer_name, monkeypatch):
    # The llama3 tool prompt holds the day LLaMA-Factory ran.
    monkeypatch.setattr(tool_formats, "today", lambda: EXPECTED["date"])
    compared = 0
    for template in JOBS["templates"]:
        tokenizer = copy.deepcopy(pristine(tokenizer_name))
        prepare_tokenizer(template_spec(SFTArguments(template=template)), tokenizer)
        # The same pieces recur in every setting: encode them once (a pure function of the text once the
        # tokenizer is prepared).
        encode = functools.lru_cache(maxsize=None)(lambda text, add, enc=tokenizer.encode: tuple(
            enc(text, add_special_tokens=add)))
        tokenizer.encode = lambda text, add_special_tokens=True, cached=encode: list(cached(text, add_special_tokens))
        for dataset in JOBS["datasets"]:
            for setting_name, setting in JOBS["settings"].items():
                expected = EXPECTED[tokenizer_name][template][dataset][setting_name]
                where = (template, dataset, setting_name)
                if "error" in expected:  # train_on_prompt with efficient_eos: LLaMA-Factory refuses it too
                    assert "train_on_prompt" in expected["error"], where
                    with pytest.raises(InvalidArgumentError, match="train_on_prompt"):
                        template_spec(SFTArguments(template=template, train_on_prompt=True))
                    continue
                assert {k: expected["tok"][k] for k in ("len", "eos_token", "eos_token_id", "pad_token")} == {
                    "len": len(tokenizer), "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token": tokenizer.pad_token}, where
                assert our_rows(tokenizer, template, dataset, setting) == as_ours(expected["rows"]), where
                compared += sum(isinstance(row, list) for row in expected["rows"])
    assert compared > 2000  # not vacuous: 29 templates x 3 datasets x 5 settings of 3 to 8 records each


def test_the_fixture_covers_what_the_issue_names():
    rows = EXPECTED["bpe"]["qwen3"]
    # The bad records (a missing response, roles out of order, a conversation without a reply) are dropped.
    kept = [[isinstance(r, list) for r in rows[d]["default"]["rows"]] for d in ("alpaca", "sharegpt", "openai")]
    assert kept == [[True] * 8 + [False], [True] * 6 + [False] * 2, [True] * 3]
    # LLaMA-Factory fails on a thought before a Llama2Template's function call, and on glm4's parallel calls.
    assert isinstance(EXPECTED["bpe"]["mistral"]["sharegpt"]["default"]["rows"][4], dict)
    assert isinstance(EXPECTED["bpe"]["glm4"]["sharegpt"]["default"]["rows"][2], dict)
    assert set(JOBS["templates"]) == set(TEMPLATES) - {"qwen2"}  # qwen2 is our alias of qwen, not LF's name
    tokenizer = pristine("bpe")
    glaive_like = tokenizer.decode(rows["sharegpt"]["default"]["rows"][1][0])
    assert "<tool_call>" in glaive_like and "film_rating" in glaive_like and "<tool_response>" in glaive_like


@pytest.mark.slow  # builds TRL's SFTTrainer
def test_through_the_cli_translation_the_trl_dataset_holds_the_same_rows(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from tiny_models import tiny_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from hf_llama_strategies import StrategyArguments
    from hf_llama_strategies.data.template_data import load_template_data
    from hf_llama_strategies.training.trl import build_sft_trainer

    monkeypatch.setattr(tool_formats, "today", lambda: EXPECTED["date"])
    info = JOBS["datasets"]["sharegpt"]
    native = translate_llamafactory({"stage": "sft", "finetuning_type": "full", "dataset": info["name"],
                                     "dataset_dir": str(ROOT / info["dir"]), "template": "llama3", "cutoff_len": 48,
                                     "mask_history": True}, str(ROOT), [])
    fields = set(CliDataArguments.__dataclass_fields__)
    data_args = CliDataArguments(**{k: v for k, v in native.items() if k in fields})
    tokenizer = AutoTokenizer.from_pretrained(ROOT / JOBS["tokenizers"]["sp"])
    data = load_template_data(data_args, data_args, tokenizer)
    assert data.notes == ["EOS is <|eot_id|> (added to the vocabulary)",
                          "stop words <|eom_id|> added to the vocabulary as special tokens"]
    assert data.skipped == {"train": 2}
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    args = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    trainer = build_sft_trainer(model, args, data_args, data_args, data, tokenizer, StrategyArguments())
    expected = [row for row in EXPECTED["sp"]["llama3"]["sharegpt"]["mask_history_cutoff48"]["rows"] if row]
    assert [[r["input_ids"], r["labels"]] for r in trainer.train_dataset] == expected
    # TRL collates them as they are: padded, the labels kept (not rebuilt from the input ids).
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["labels"][0, : len(expected[0][1])].tolist() == expected[0][1]


def test_the_transformers_way_differs_at_the_piece_boundaries():
    # chat_template (TRL renders the whole conversation, then tokenizes) on the SentencePiece tokenizer: each
    # template piece LLaMA-Factory tokenizes alone starts with '▁'; rendered whole, only the first does.
    tokenizer = copy.deepcopy(pristine("sp"))
    spec = template_spec(SFTArguments(template="llama2"))
    prepare_tokenizer(spec, tokenizer)
    turns = [{"role": "user", "content": "Is Heat good?"}, {"role": "assistant", "content": "Very."}]
    pieces = [i for ids in TemplateEncoder(spec, tokenizer).encode_turns(Conversation(turns)) for i in ids]
    whole = tokenizer.apply_chat_template(turns, chat_template=build_chat_template("llama2"), tokenize=True,
                                          return_dict=True)["input_ids"]
    assert tokenizer.decode(pieces).replace(" ", "") == tokenizer.decode(whole).replace(" ", "")  # the same text
    assert pieces != whole
    assert tokenizer.convert_ids_to_tokens(pieces).count("▁") > tokenizer.convert_ids_to_tokens(whole).count("▁")
