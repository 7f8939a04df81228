"""Local datasets for the CLI: causal LM from text/JSON lines, classification from CSV/JSON.

Loaded through ``datasets`` (``text``, ``json`` and ``csv`` builders), checked before any
training: a missing file or column is an :class:`InvalidArgumentError` that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional

from .errors import InvalidArgumentError

CAUSAL_LM = "causal_lm"
SEQ_CLS = "seq_cls"
SFT = "sft"  # instruction and chat data: sft.py
TASKS = ("auto", CAUSAL_LM, SEQ_CLS, SFT)
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class DataArguments:
    """Where the data is and how to read it (keys of the CLI's YAML file)."""

    train_file: Optional[str] = field(
        default=None, metadata={"help": "Training data: .txt (one text per line), .json/.jsonl, or .csv."}
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Evaluation data, same formats. Unset: `validation_split` of the train file."}
    )
    validation_split: float = field(
        default=0.0,
        metadata={"help": "Fraction of the training data held out for evaluation when no validation_file is given."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text (JSON/CSV)."})
    label_column: str = field(
        default="label", metadata={"help": "Column holding the label for sequence classification (JSON/CSV)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example (causal LM: block size)."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N evaluation examples (quick runs)."}
    )


@dataclass
class TaskData:
    """Tokenised datasets ready for the Trainer."""

    train: Any
    eval: Optional[Any]
    label_names: list[str] = field(default_factory=list)


def _builder(option: str, path: str) -> str:
    if not os.path.isfile(path):
        raise InvalidArgumentError(option, path, "an existing file", "No such file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise InvalidArgumentError(option, path, f"a file ending in one of {sorted(_BUILDERS)}")
    return _BUILDERS[ext]


def load_raw(data_args: DataArguments) -> Any:
    """The raw ``DatasetDict`` with ``train`` and, where available, ``validation``."""
    import datasets

    if data_args.train_file is None:
        raise InvalidArgumentError("train_file", None, "a path to the training data")
    files = {"train": data_args.train_file}
    builder = _builder("train_file", data_args.train_file)
    if data_args.validation_file is not None:
        if _builder("validation_file", data_args.validation_file) != builder:
            raise InvalidArgumentError(
                "validation_file", data_args.validation_file, f"the same format as train_file ({builder})"
            )
        files["validation"] = data_args.validation_file
    if not 0.0 <= data_args.validation_split < 1.0:
        raise InvalidArgumentError("validation_split", data_args.validation_split, "a fraction in [0, 1)")
    raw = datasets.load_dataset(builder, data_files=files)
    if "validation" not in raw and data_args.validation_split > 0:
        split = raw["train"].train_test_split(test_size=data_args.validation_split, seed=0)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return raw


def detect_task(raw: Any, data_args: DataArguments) -> str:
    """``seq_cls`` when the data has the label column, else ``causal_lm``."""
    return SEQ_CLS if data_args.label_column in raw["train"].column_names else CAUSAL_LM


def _check_columns(raw: Any, data_args: DataArguments, needed: list[str]) -> None:
    for split, dataset in raw.items():
        option = "train_file" if split == "train" else "validation_file"
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            column_option = "text_column" if data_args.text_column in missing else "label_column"
            raise InvalidArgumentError(
                column_option,
                missing[0],
                f"a column of {getattr(data_args, option) or data_args.train_file}: {dataset.column_names}",
            )


def prepare(raw: Any, task: str, tokenizer: Any, data_args: DataArguments) -> TaskData:
    """Tokenise ``raw`` for ``task``; causal LM texts are concatenated into blocks."""
    text = data_args.text_column
    if "text" in raw["train"].column_names and text not in raw["train"].column_names and task == CAUSAL_LM:
        text = "text"
    needed = [text] + ([data_args.label_column] if task == SEQ_CLS else [])
    _check_columns(raw, data_args, needed)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    raw = type(raw)({k: v.select(range(min(len(v), limits[k]))) if limits.get(k) else v for k, v in raw.items()})

    label_names: list[str] = []
    if task == SEQ_CLS:
        values = raw["train"].unique(data_args.label_column)
        label_names = [str(v) for v in sorted(values, key=lambda v: (str(type(v)), v))]
        index = {name: i for i, name in enumerate(label_names)}
        unseen = {str(v) for split in raw.values() for v in split.unique(data_args.label_column)} - set(index)
        if unseen:
            raise InvalidArgumentError(
                "validation_file", sorted(unseen), f"labels that the training data has: {label_names}"
            )

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer(batch[text], truncation=True, max_length=data_args.max_seq_length)
            out["labels"] = [index[str(v)] for v in batch[data_args.label_column]]
            return out

        columns = raw["train"].column_names
        tokenised = {k: v.map(encode, batched=True, remove_columns=columns) for k, v in raw.items()}
    else:
        block = data_args.max_seq_length

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            return tokenizer([t for t in batch[text] if t and t.strip()])

        def group(batch: dict[str, list]) -> dict[str, list]:
            joined = {k: list(chain(*batch[k])) for k in batch}
            total = (len(joined["input_ids"]) // block) * block
            out = {k: [v[i : i + block] for i in range(0, total, block)] for k, v in joined.items()}
            out["labels"] = [ids[:] for ids in out["input_ids"]]
            return out

        tokenised = {}
        for split, dataset in raw.items():
            ids = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
            tokenised[split] = ids.map(group, batched=True)
            if len(tokenised[split]) == 0:
                raise InvalidArgumentError(
                    "max_seq_length", block, f"at most the number of tokens in the {split} data"
                )
    return TaskData(train=tokenised["train"], eval=tokenised.get("validation"), label_names=label_names)
