"""Local datasets for the CLI: causal LM from text/JSON lines, classification from CSV/JSON.

Loaded through ``datasets`` (``text``, ``json`` and ``csv`` builders), checked before any
training: a missing file or column is an :class:`InvalidArgumentError` that names it.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional

from transformers.utils import logging

from ..core.options import INT_MAX, check_positive_int, is_number
from ..errors import DataFileError, InvalidArgumentError

logger = logging.get_logger(__name__)

CAUSAL_LM = "causal_lm"
SEQ_CLS = "seq_cls"
SFT = "sft"  # instruction and chat data: sft.py
TASKS = ("auto", CAUSAL_LM, SEQ_CLS, SFT)
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
#: The longest line a text, JSON-lines or CSV file may hold: one example. Longer is refused by
#: size before it is read whole (a 2 GB one-line file grew the reader's memory until it was killed).
MAX_LINE_BYTES = 32 * 2**20


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


def check_data_arguments(data_args: Any) -> None:
    """Refuse data options that cannot work (the CLI's ``DataArguments``)."""
    check_positive_int("max_seq_length", data_args.max_seq_length, maximum=INT_MAX)
    for option in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, option)
        if value is not None:
            check_positive_int(option, value, maximum=INT_MAX)
    split = data_args.validation_split
    if not is_number(split) or not 0.0 <= split < 1.0:
        raise InvalidArgumentError("validation_split", split, "a fraction in [0, 1)")
    for option in ("text_column", "label_column"):
        value = getattr(data_args, option)
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgumentError(option, value, "a column name")
    for option in ("train_file", "validation_file"):
        value = getattr(data_args, option)
        if value is not None and not isinstance(value, str):
            raise InvalidArgumentError(option, value, "a path to a .txt, .json, .jsonl or .csv file")


@dataclass
class TaskData:
    """Tokenised datasets ready for the Trainer."""

    train: Any
    eval: Optional[Any]
    label_names: list[str] = field(default_factory=list)


def not_a_file(path: str) -> Optional[str]:
    """Why ``path`` is not a regular file this process can read, in words; ``None`` when it is one."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "It is a symbolic link loop."
        if exc.errno == errno.ENOENT:
            return "It is a symbolic link to a missing file." if os.path.islink(path) else "No such file."
        return f"It cannot be opened ({exc.strerror})."
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe): reading it waits for a writer"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    for test, what in kinds:
        if test(info.st_mode):
            return f"It is {what}, not a regular file."
    if not os.access(path, os.R_OK):
        return "It cannot be read (permission denied)."
    return None


def _builder(option: str, path: str) -> str:
    if not isinstance(path, str) or not path:
        raise InvalidArgumentError(option, path, "a path to a .txt, .json, .jsonl or .csv file")
    problem = not_a_file(path)
    if problem:
        raise InvalidArgumentError(option, path, "an existing file" if problem == "No such file." else "a data file",
                                   problem)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise InvalidArgumentError(option, path, f"a file ending in one of {sorted(_BUILDERS)}")
    return _BUILDERS[ext]


def check_data_file(option: str, path: str, builder: str) -> None:
    """Read ``path`` once and refuse what ``datasets`` would fail on with a traceback.

    Empty, binary, not UTF-8, header-only CSV, invalid JSON (with its line), JSON that is
    neither JSON lines nor a list of objects, or no text at all.

    Raises:
        DataFileError: naming the file and the problem.
    """
    import codecs
    import csv
    import json

    if os.path.getsize(path) == 0:
        raise DataFileError(option, path, "The file is empty.")
    check_line_lengths(option, path, builder)
    decoder = codecs.getincrementaldecoder("utf-8")()
    chunks: list[str] = []
    offset = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if b"\x00" in block:
                raise DataFileError(option, path, "It is a binary file, not text.")
            try:
                chunks.append(decoder.decode(block, final=not block))
            except UnicodeDecodeError as exc:
                raise DataFileError(option, path, f"It is not UTF-8 text (byte {offset + exc.start}).") from None
            if not block:
                break
            offset += len(block)
    text = "".join(chunks).lstrip("\ufeff")
    if not text.strip():
        raise DataFileError(option, path, "It holds only whitespace.")
    if builder == "csv":
        rows = csv.reader(text.splitlines())
        # pandas (which datasets reads CSV with) has no field limit: neither may this check.
        limit = csv.field_size_limit(2**31 - 1)
        try:
            header = next(rows, None)
            if not header or not any(c.strip() for c in header):
                raise DataFileError(option, path, "Its first line (the CSV header) is empty.")
            if not any(any(c.strip() for c in row) for row in rows):
                raise DataFileError(option, path, f"It has a header ({', '.join(header)}) but no rows.")
        except csv.Error as exc:  # a row the csv module cannot parse
            raise DataFileError(option, path, f"Line {rows.line_num} is not valid CSV: {exc}.") from exc
        finally:
            csv.field_size_limit(limit)
    elif builder == "json":
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                records = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise DataFileError(option, path, f"It is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
            if not records:
                raise DataFileError(option, path, "It is an empty JSON list.")
            bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataFileError(
                    option, path, f"Item {bad + 1} of its JSON list is a {type(records[bad]).__name__}, not an "
                    'object such as {"text": ...}.'
                )
            return
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(
                    option, path, f"Line {number} is not valid JSON ({exc.msg}); expected JSON lines (one object "
                    "per line) or one JSON list of objects."
                ) from None
            if not isinstance(record, dict):
                raise DataFileError(
                    option, path, f'Line {number} is a {type(record).__name__}, not an object such as {{"text": ...}}.'
                )


def check_line_lengths(option: str, path: str, builder: str) -> None:
    """Refuse a line over :data:`MAX_LINE_BYTES`, reading the file in blocks (never a whole line at once).

    A JSON file that is one list (often written on one line) is read whole as JSON anyway: not checked.
    """
    with open(path, "rb") as fh:
        if builder == "json" and fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return
        fh.seek(0)
        line, current = 1, 0  # the line being read, and its bytes so far
        for block in iter(lambda: fh.read(1 << 20), b""):
            pieces = block.split(b"\n")
            lengths = [current + len(pieces[0]), *map(len, pieces[1:])]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[longest] > MAX_LINE_BYTES:
                raise DataFileError(
                    option, path, f"Line {line + longest} is over {MAX_LINE_BYTES // 2**20} MiB long (a line is one "
                    "example). Split it into lines or records of reasonable length."
                )
            line, current = line + len(pieces) - 1, lengths[-1]


def _load(builder: str, files: dict[str, str]) -> Any:
    """``datasets.load_dataset``, each file on its own; what it still fails on becomes one message naming the file."""
    import datasets

    loaded = {}
    for split, path in files.items():
        try:
            loaded[split] = datasets.load_dataset(builder, data_files={split: path})[split]
        except Exception as exc:  # datasets/pyarrow raise many types for one bad file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataFileError(
                "train_file" if split == "train" else "validation_file", path,
                f"datasets cannot read it as {builder}: {first[:300]}",
            ) from None
    return datasets.DatasetDict(loaded)


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
    for split, path in files.items():
        check_data_file("train_file" if split == "train" else "validation_file", path, builder)
    if "validation" in files and _same_file(files["train"], files["validation"]):
        logger.warning(
            f"validation_file is the same data as train_file ({files['validation']}): evaluation measures fit to the "
            "training data, not generalisation."
        )
    raw = _load(builder, files)
    if "validation" not in raw and data_args.validation_split > 0:
        split = raw["train"].train_test_split(test_size=data_args.validation_split, seed=0)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return raw


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def _file_of(split: str, data_args: DataArguments) -> tuple[str, str]:
    if split == "train" or data_args.validation_file is None:
        return "train_file", str(data_args.train_file)
    return "validation_file", str(data_args.validation_file)


def _check_texts(raw: Any, column: str, data_args: DataArguments, allow_empty: bool) -> None:
    """Every example's text is a string (and, unless ``allow_empty``, not blank); some text exists."""
    for split, dataset in raw.items():
        option, path = _file_of(split, data_args)
        values = dataset[column]
        for i, value in enumerate(values):
            if value is None or not isinstance(value, str) or (not allow_empty and not value.strip()):
                what = "no text" if value is None or (isinstance(value, str) and not value.strip()) else (
                    f"a {type(value).__name__}, not text"
                )
                raise DataFileError(option, path, f"Example {i + 1} has {what} in column {column!r}.")
        if not any(v.strip() for v in values):
            raise DataFileError(option, path, f"Column {column!r} holds no text.")


def _check_labels(raw: Any, data_args: DataArguments) -> None:
    """The classes of the label column, refusing labels a classifier cannot learn from.

    Raises:
        DataFileError: an empty label cell, a fractional (float) label, or a single class.
    """
    column = data_args.label_column
    for split, dataset in raw.items():
        option, path = _file_of(split, data_args)
        for i, value in enumerate(dataset[column]):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataFileError(option, path, f"Example {i + 1} has an empty label in column {column!r}.")
            if isinstance(value, float) and not value.is_integer():
                raise DataFileError(
                    option, path, f"Example {i + 1} has the label {value!r}: sequence classification needs class "
                    "labels (whole numbers or names), and regression targets are not supported.",
                )
            if isinstance(value, (list, dict)):
                raise DataFileError(option, path, f"Example {i + 1} has a {type(value).__name__} as its label.")


def _label_key(value: Any) -> str:
    # A CSV column with an empty cell somewhere reads as floats: 1.0 is the class "1".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def detect_task(raw: Any, data_args: DataArguments) -> str:
    """``seq_cls`` when the data has the label column, else ``causal_lm``."""
    return SEQ_CLS if data_args.label_column in raw["train"].column_names else CAUSAL_LM


def limit_samples(raw: Any, data_args: DataArguments) -> Any:
    """``raw`` cut to ``max_train_samples`` / ``max_eval_samples``."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    return type(raw)({k: v.select(range(min(len(v), limits[k]))) if limits.get(k) else v for k, v in raw.items()})


def label_names_of(raw: Any, data_args: DataArguments) -> list[str]:
    """The classes of the label column, in the order the classifier numbers them (checked: two or more).

    Raises:
        DataFileError: the training data holds one class only.
        InvalidArgumentError: the validation data has a class the training data lacks.
    """
    _check_columns(raw, data_args, [data_args.label_column])
    _check_labels(raw, data_args)
    values = raw["train"].unique(data_args.label_column)
    label_names = list(dict.fromkeys(_label_key(v) for v in sorted(values, key=lambda v: (str(type(v)), v))))
    if len(label_names) < 2:
        option, path = _file_of("train", data_args)
        raise DataFileError(
            option, path, f"Its label column {data_args.label_column!r} holds one class only "
            f"({label_names[0]!r} in {len(raw['train'])} example(s)): a classifier needs at least two. Add "
            "examples of the other classes, or check label_column.",
        )
    unseen = {_label_key(v) for split in raw.values() for v in split.unique(data_args.label_column)} - set(label_names)
    if unseen:
        raise InvalidArgumentError(
            "validation_file", sorted(unseen), f"labels that the training data has: {label_names}"
        )
    return label_names


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
    raw = limit_samples(raw, data_args)

    label_names: list[str] = []
    _check_texts(raw, text, data_args, allow_empty=task != SEQ_CLS)
    if task == SEQ_CLS:
        label_names = label_names_of(raw, data_args)
        index = {name: i for i, name in enumerate(label_names)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer(batch[text], truncation=True, max_length=data_args.max_seq_length)
            out["labels"] = [index[_label_key(v)] for v in batch[data_args.label_column]]
            return out

        # Each file's own columns: a validation file may hold others than the train file.
        tokenised = {k: v.map(encode, batched=True, remove_columns=v.column_names) for k, v in raw.items()}
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
