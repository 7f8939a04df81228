"""Token-for-token parity with LLaMA-Factory: its ids and labels, ours, and the comparison.

Run in two environments (LLaMA-Factory is never a dependency of this project):

    # 1. in a virtualenv with LLaMA-Factory (pip install llamafactory==0.9.5): its ids and labels
    python tools/lf_parity.py lf JOBS.json LF.json
    # 2. with this package: ours, compared record for record (a table; exit 1 on a difference)
    python tools/lf_parity.py ours JOBS.json LF.json REPORT.json

JOBS.json names the tokenizers (folders), the templates, the datasets (a ``dataset_dir`` and
the name of an entry of its ``dataset_info.json``, optionally ``max_samples``) and the settings
(``cutoff_len``, ``train_on_prompt``, ``mask_history``, ...). LLaMA-Factory's side runs its own
pipeline (``datasets.load_dataset("json")``, its dataset converter,
``get_template_and_fix_tokenizer``, ``SupervisedDatasetProcessor``); ours translates the same
LLaMA-Factory YAML and runs ``load_template_data``. ``tests/fixtures/llamafactory/`` holds a
small ``LF.json`` made this way, which ``tests/test_template_parity.py`` checks without
LLaMA-Factory.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys

# Templates whose vision plugin asks for a processor even without media: LLaMA-Factory's text path is
# the base plugin's then (no placeholder to expand), so the base plugin stands in for it here.
_VISION_PLUGIN = ("llama4", "qwen3_5", "qwen3_5_nothink")


def cached_encode(tokenizer):
    """``tokenizer`` with ``encode`` memoised: the same pieces recur across records and settings.

    ``encode`` is a pure function of its text while the vocabulary stays as it is; the tokenizer is
    prepared for its template before anything is encoded, then left alone.
    """
    import functools

    encode = tokenizer.encode

    @functools.lru_cache(maxsize=None)
    def cached(text, add_special_tokens=True):
        return tuple(encode(text, add_special_tokens=add_special_tokens))

    tokenizer.encode = lambda text, add_special_tokens=True, **kw: list(cached(text, add_special_tokens))
    return tokenizer


def _tokenizer_info(tokenizer) -> dict:
    return {"len": len(tokenizer), "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "pad_token": tokenizer.pad_token, "bos_token_id": tokenizer.bos_token_id}


def _dataset_info(dataset: dict) -> dict:
    with open(os.path.join(dataset["dir"], "dataset_info.json"), encoding="utf-8") as fh:
        return json.load(fh)[dataset["name"]]


# -- LLaMA-Factory's side --------------------------------------------------------------------------


def _lf_load(dataset: dict):
    import datasets
    from llamafactory.data.parser import DatasetAttr

    info = _dataset_info(dataset)
    attr = DatasetAttr("file", dataset_name=info["file_name"])
    attr.join(info)
    ds = datasets.load_dataset("json", data_files=[os.path.join(dataset["dir"], info["file_name"])], split="train")
    if dataset.get("max_samples"):
        ds = ds.select(range(min(dataset["max_samples"], len(ds))))
    return attr, ds


def _lf_run(tokenizer, template: str, attr, ds, setting: dict, per_record: bool = False) -> dict:
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    registered = TEMPLATES[template]
    TEMPLATES[template] = copy.deepcopy(registered)  # get_template_and_fix_tokenizer edits it (default_system)
    try:
        data_args = DataArguments(template=template, **setting)
        tpl = get_template_and_fix_tokenizer(tokenizer, data_args)
        if template in _VISION_PLUGIN:
            tpl.mm_plugin = get_mm_plugin(name="base")
        converter = get_dataset_converter(attr.formatting, attr, data_args)
        aligned = [converter(example) for example in ds]
        processor = SupervisedDatasetProcessor(template=tpl, tokenizer=tokenizer, processor=None, data_args=data_args)
        if not per_record:
            out = processor.preprocess_dataset({key: [a[key] for a in aligned] for key in aligned[0]})
            rows = [[i, lab] for i, lab in zip(out["input_ids"], out["labels"])]
        else:  # one record at a time: a record LLaMA-Factory fails on is marked, not the whole dataset
            rows = [_lf_record(processor, example) for example in aligned]
        return {"rows": rows, "tok": _tokenizer_info(tokenizer)}
    finally:
        TEMPLATES[template] = registered


def _lf_record(processor, example: dict):
    """``[input_ids, labels]``, None for a record LLaMA-Factory drops, ``{"error": ...}`` for one it fails on."""
    try:
        out = processor.preprocess_dataset({key: [value] for key, value in example.items()})
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return [out["input_ids"][0], out["labels"][0]] if out["input_ids"] else None


def run_lf(jobs: dict, out_path: str) -> None:
    """LLaMA-Factory's rows for every job (written after each template, so a long run keeps what it has)."""
    import datasets

    datasets.disable_progress_bars()
    result: dict = {"date": datetime.datetime.now().strftime("%d %b %Y")}
    loaded = {name: _lf_load(d) for name, d in jobs["datasets"].items()}
    from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    for tok_name, tok_dir in jobs["tokenizers"].items():
        for template in jobs["templates"]:
            # One tokenizer per template, prepared by LLaMA-Factory before the first encode (a copy of the
            # template, which preparing edits), then shared by every dataset and setting.
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            registered = TEMPLATES[template]
            TEMPLATES[template] = copy.deepcopy(registered)
            get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template))
            TEMPLATES[template] = registered
            cached_encode(tokenizer)
            for ds_name, (attr, ds) in loaded.items():
                for set_name, setting in jobs["settings"].items():
                    try:
                        res = _lf_run(tokenizer, template, attr, ds, setting, jobs.get("per_record", False))
                    except Exception as exc:  # noqa: BLE001 - recorded: a refusal is a result too
                        res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    result.setdefault(tok_name, {}).setdefault(template, {}).setdefault(ds_name, {})[set_name] = res
            print(tok_name, template, "done", file=sys.stderr, flush=True)
            with open(out_path, "w", encoding="utf-8") as fh:
                json.dump(result, fh)


# -- ours ----------------------------------------------------------------------------------------------


def ours(tokenizer, template: str, dataset: dict, setting: dict) -> tuple[dict, object]:
    """Our rows: the LLaMA-Factory YAML translated, then ``load_template_data`` (which prepares the tokenizer
    again: nothing changes the second time)."""
    from hf_llama_strategies.cli.config import CliDataArguments
    from hf_llama_strategies.cli.llamafactory import translate_llamafactory
    from hf_llama_strategies.data.template_data import load_template_data

    config = {"stage": "sft", "finetuning_type": "full", "dataset": dataset["name"], "dataset_dir": dataset["dir"],
              "template": template, "max_samples": dataset.get("max_samples"), "output_dir": "unused", **setting}
    native = translate_llamafactory({k: v for k, v in config.items() if v is not None}, dataset["dir"], [])
    fields = set(CliDataArguments.__dataclass_fields__)
    data_args = CliDataArguments(**{k: v for k, v in native.items() if k in fields})
    data = load_template_data(data_args, data_args, tokenizer)
    return {"rows": [[r["input_ids"], r["labels"]] for r in data.train], "tok": _tokenizer_info(tokenizer)}, tokenizer


def ours_per_record(tokenizer, template: str, dataset: dict, setting: dict) -> tuple[dict, object]:
    """Ours record by record: ``[input_ids, labels]``, or None for a record left out as bad."""
    from hf_llama_strategies.cli.llamafactory import translate_llamafactory
    from hf_llama_strategies.data.sft import SFTArguments, _Bad, read_records
    from hf_llama_strategies.data.template_data import encode_record, template_spec
    from hf_llama_strategies.data.template_tokens import EncodeOptions, TemplateEncoder, prepare_tokenizer

    native = translate_llamafactory({"stage": "sft", "finetuning_type": "full", "dataset": dataset["name"],
                                     "dataset_dir": dataset["dir"], "template": template}, dataset["dir"], [])
    sft_args = SFTArguments(template=template, train_on_prompt=setting.get("train_on_prompt", False))
    spec = template_spec(sft_args)
    prepare_tokenizer(spec, tokenizer)
    encoder = TemplateEncoder(spec, tokenizer)
    options = EncodeOptions(cutoff_len=setting["cutoff_len"], train_on_prompt=setting.get("train_on_prompt", False),
                            mask_history=setting.get("mask_history", False))
    rows: list = []
    for source in native["sft_datasets"]:
        for record in read_records(source["file"], "sft_datasets"):
            try:
                rows.append(list(encode_record(encoder, record, source["format"], source.get("columns"),
                                               source.get("tags"), options)))
            except _Bad:
                rows.append(None)
    return {"rows": rows, "tok": _tokenizer_info(tokenizer)}, tokenizer


def compare(lf: dict, mine: dict, tokenizer) -> dict:
    """``identical``, ``both refuse`` or ``MISMATCH`` (with the first difference, as tokens)."""
    if "error" in lf or "error" in mine:
        status = "both refuse" if "error" in lf and "error" in mine else "MISMATCH"
        return {"status": status, "lf": lf.get("error"), "ours": mine.get("error")}
    if lf["tok"] != mine["tok"]:
        return {"status": "MISMATCH", "why": "tokenizer", "lf": lf["tok"], "ours": mine["tok"]}
    if len(lf["rows"]) != len(mine["rows"]):
        return {"status": "MISMATCH", "why": f"{len(lf['rows'])} records vs {len(mine['rows'])}"}
    for number, (theirs, ours_row) in enumerate(zip(lf["rows"], mine["rows"])):
        if not isinstance(theirs, list) or ours_row is None:  # per record: dropped, or LF fails on it
            if isinstance(theirs, list) or ours_row is not None:
                return {"status": "MISMATCH", "why": f"record {number}: LF {theirs!r:.80}, ours {ours_row!r:.80}"}
            continue
        for column, name in ((0, "input_ids"), (1, "labels")):
            a, b = theirs[column], ours_row[column]
            if a != b:
                at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                ids = theirs[0]
                return {"status": "MISMATCH", "why": f"record {number} {name} at {at} (lengths {len(a)}, {len(b)})",
                        "lf": tokenizer.convert_ids_to_tokens(ids[max(0, at - 4):at + 4])}
    kept = [r for r in lf["rows"] if isinstance(r, list)]
    failed = sum(isinstance(r, dict) for r in lf["rows"])
    return {"status": "identical", "records": len(kept), **({"lf_fails_on": failed} if failed else {})}


def run_ours(jobs: dict, lf_path: str, report_path: str) -> int:
    """Compare with LLaMA-Factory's rows; print one line per (tokenizer, template): the settings' statuses."""
    import datasets
    from transformers.utils import logging

    from hf_llama_strategies.data import tool_formats

    datasets.disable_progress_bars()
    logging.set_verbosity_error()
    with open(lf_path, encoding="utf-8") as fh:
        lf_out = json.load(fh)
    tool_formats.today = lambda: lf_out["date"]  # the llama3 tool prompt holds the day LLaMA-Factory ran
    report: dict = {}
    failures = 0
    from transformers import AutoTokenizer

    from hf_llama_strategies.data.sft import SFTArguments
    from hf_llama_strategies.data.template_data import template_spec
    from hf_llama_strategies.data.template_tokens import prepare_tokenizer

    for tok_name, tok_dir in jobs["tokenizers"].items():
        for template in jobs["templates"]:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            prepare_tokenizer(template_spec(SFTArguments(template=template)), tokenizer)
            cached_encode(tokenizer)
            for ds_name, dataset in jobs["datasets"].items():
                for set_name, setting in jobs["settings"].items():
                    run = ours_per_record if jobs.get("per_record") else ours
                    try:
                        mine, _ = run(tokenizer, template, dataset, setting)
                    except Exception as exc:  # noqa: BLE001
                        mine = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    res = compare(lf_out[tok_name][template][ds_name][set_name], mine, tokenizer)
                    failures += res["status"] == "MISMATCH"
                    report.setdefault(tok_name, {}).setdefault(template, {}).setdefault(ds_name, {})[set_name] = res
            print(tok_name, template, {d: sorted({r["status"] for r in s.values()})
                                       for d, s in report[tok_name][template].items()}, flush=True)
    with open(report_path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, ensure_ascii=False)
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    mode, jobs_path, *paths = argv
    with open(jobs_path, encoding="utf-8") as fh:
        jobs = json.load(fh)
    if mode == "lf":
        run_lf(jobs, paths[0])
        return 0
    return run_ours(jobs, paths[0], paths[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
