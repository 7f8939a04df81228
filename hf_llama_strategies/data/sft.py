"""``task: sft``: instruction and chat data, fine-tuned through TRL's ``SFTTrainer``.

Records in three formats (LLaMA-Factory's names) become TRL's conversational form, a
``messages`` list of ``{"role", "content"}``:

* ``alpaca``: ``instruction``, ``input`` (joined to it by a newline), ``output``, optional
  ``system`` and ``history`` (``[[prompt, reply], ...]``);
* ``sharegpt``: ``conversations`` of ``{"from", "value"}`` with ``human`` / ``gpt`` /
  ``system`` / ``function_call`` / ``observation`` turns;
* ``openai``: ``messages`` of ``{"role", "content"}`` (``system`` / ``user`` / ``assistant`` /
  ``tool``).

Columns and tags can be renamed as in a LLaMA-Factory ``dataset_info.json`` entry. TRL
applies the chat template, masks the prompt (``assistant_only_loss`` over the template's
``{% generation %}`` markers, or its prompt/completion form for a template without them),
truncates to ``max_seq_length`` and packs; this module converts, checks every record before
anything is written, and builds the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers.utils import logging

from ..errors import BadRecordError, InvalidArgumentError, StrategyError
from .chat_templates import MULTIMODAL_TEMPLATE, TEMPLATES, build_chat_template, stop_token
from .local import check_line_lengths, not_a_file

logger = logging.get_logger(__name__)

FORMATS = ("auto", "alpaca", "sharegpt", "openai")
_FORMAT_ALIASES = {"messages": "openai", "chatml": "openai", "conversations": "sharegpt"}
BAD_RECORDS = ("error", "skip")
SFT_LOSSES = ("nll", "dft")
_EXTENSIONS = (".json", ".jsonl")

# Column names per format (LLaMA-Factory's DatasetAttr defaults, except that `system`, `history`
# and `tools` are read here when a record has them; LLaMA-Factory reads them only when named), and tags.
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
OPENAI_COLUMNS = {"messages": "messages", "system": "system", "tools": "tools"}
# What LLaMA-Factory leaves unread unless dataset_info.json names it.
UNREAD_BY_DEFAULT = ("system", "history", "tools")
SHAREGPT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
OPENAI_TAGS = {
    "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
    "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system",
}


@dataclass
class SFTArguments:
    """Keys of ``task: sft`` (in the CLI's flat YAML, beside the data keys)."""

    sft_format: str = field(
        default="auto",
        metadata={"help": "Record format of train_file/validation_file: auto (from the records), alpaca, sharegpt "
                          "or openai (`messages` of role/content)."},
    )
    sft_datasets: Optional[str] = field(
        default=None,
        metadata={"help": "Instead of train_file: a list of {file, format, columns, tags, max_samples} mappings, "
                          "concatenated (what a LLaMA-Factory `dataset` list translates to)."},
    )
    sft_eval_datasets: Optional[str] = field(
        default=None, metadata={"help": "Instead of validation_file: a list like sft_datasets."}
    )
    chat_template: Optional[str] = field(
        default=None,
        metadata={"help": "Chat template that TRL renders (the transformers way): a LLaMA-Factory template name "
                          "(llama3, qwen, mistral, alpaca, default, empty, ...) written as Jinja, a .jinja file, or "
                          "Jinja text. Unset: the tokenizer's own."},
    )
    template: Optional[str] = field(
        default=None,
        metadata={"help": "A LLaMA-Factory template name (llama3, qwen, ...): the examples are tokenized as "
                          "LLaMA-Factory 0.9.5 tokenizes them (each template piece on its own, its stop words added "
                          "as special tokens, cutoff in proportion), then handed to TRL. Excludes chat_template."},
    )
    tool_format: Optional[str] = field(
        default=None,
        metadata={"help": "With template: the tool prompt and function-call format to use instead of the "
                          "template's own (default, llama3, mistral, qwen, qwen3_5, glm4), as LLaMA-Factory's key."},
    )
    default_system: Optional[str] = field(
        default=None, metadata={"help": "System prompt for records without one (replaces the template's default)."}
    )
    enable_thinking: bool = field(
        default=True, metadata={"help": "chat_template qwen3: train an empty thought before replies without one."}
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Compute the loss on prompt tokens too (default: on responses only)."}
    )
    mask_history: bool = field(
        default=False, metadata={"help": "Learn only the last reply of a conversation (earlier ones are context)."}
    )
    sft_loss: str = field(
        default="nll",
        metadata={"help": "nll (cross-entropy) or dft (TRL's Dynamic Fine-Tuning loss, LLaMA-Factory's "
                          "use_dft_loss)."},
    )
    packing: bool = field(
        default=False, metadata={"help": "Pack examples into max_seq_length blocks (TRL's best-fit packing)."}
    )
    bad_records: str = field(
        default="error",
        metadata={"help": "A record that cannot be trained on: error (refuse, naming it) or skip (leave it out, "
                          "counted)."},
    )


@dataclass
class DatasetSpec:
    """One SFT data file and how to read it (a ``dataset_info.json`` entry, resolved)."""

    file: str
    format: str = "auto"
    columns: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    max_samples: Optional[int] = None

    @classmethod
    def from_mapping(cls, value: Any, option: str) -> "DatasetSpec":
        """A spec from a YAML mapping (or a bare file name)."""
        if isinstance(value, str):
            return cls(file=value)
        if not isinstance(value, dict) or "file" not in value:
            raise InvalidArgumentError(option, value, "a list of mappings with a `file` key (and format, columns, "
                                                      "tags, max_samples)")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgumentError(option, value, "keys among file, format, columns, tags, max_samples",
                                       f"Unknown: {sorted(unknown)}.")
        return cls(**value)


class _Bad(Exception):
    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


# -- reading and converting records ---------------------------------------------------------


def normalise_format(value: str, option: str = "sft_format") -> str:
    """``auto``, ``alpaca``, ``sharegpt`` or ``openai`` (``messages`` is an alias of openai)."""
    name = _FORMAT_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in FORMATS:
        raise InvalidArgumentError(option, value, f"one of {list(FORMATS)}")
    return name


def read_records(path: str, option: str) -> list[Any]:
    """The records of a ``.json`` (a list) or ``.jsonl`` (one per line) file."""
    problem = not_a_file(path)
    if problem:
        raise InvalidArgumentError(option, path, "an existing .json or .jsonl file", problem)
    if not path.lower().endswith(_EXTENSIONS):
        raise InvalidArgumentError(option, path, "a .json or .jsonl file of records")
    check_line_lengths(option, path, "json")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.lower().endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(option, path, "valid JSON records", str(exc)) from None
    if isinstance(data, dict):  # {"data": [...]}-style wrappers are not a format we guess
        raise InvalidArgumentError(option, path, "a JSON list of records (or .jsonl, one record per line)")
    return data


def detect_format(record: Any, columns: Optional[dict] = None) -> Optional[str]:
    """The format a record is in, from its keys; None when it is none of them."""
    if not isinstance(record, dict):
        return None
    columns = columns or {}
    if columns.get("messages") in record:
        messages = record[columns["messages"]]
        first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
        return "openai" if "role" in first else "sharegpt"
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        first = record["messages"][0] if isinstance(record["messages"], list) and record["messages"] else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "openai"
    if columns.get("prompt", "instruction") in record and columns.get("response", "output") in record:
        return "alpaca"
    return None


def _text(value: Any, what: str, fix: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is {type(value).__name__ if value is not None else 'missing'}, not text", fix)
    if not allow_empty and not value.strip():
        raise _Bad(f"{what} is empty", fix)
    return value


def _alpaca(record: dict, columns: dict) -> list[dict[str, str]]:
    cols = {**ALPACA_COLUMNS, **columns}
    messages: list[dict[str, str]] = []
    if cols.get("system") and record.get(cols["system"]):
        messages.append({"role": "system", "content": _text(record[cols["system"]], "`system`", "give a string")})
    history = record.get(cols["history"]) if cols.get("history") else None
    if history:
        if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
            raise _Bad(f"`{cols['history']}` is not a list of [prompt, reply] pairs",
                       "write it as [[prompt, reply], ...]")
        for turn, (prompt, reply) in enumerate(history):
            messages.append({"role": "user", "content": _text(prompt, f"history turn {turn} prompt", "fill it in")})
            messages.append({"role": "assistant", "content": _text(reply, f"history turn {turn} reply", "fill it in")})
    if cols["prompt"] not in record:
        raise _Bad(f"the `{cols['prompt']}` field is missing", f"add `{cols['prompt']}` (the instruction)")
    parts = [_text(record[cols["prompt"]], f"`{cols['prompt']}`", "give the instruction as text", allow_empty=True)]
    if cols.get("query") and record.get(cols["query"]):
        parts.append(_text(record[cols["query"]], f"`{cols['query']}`", "give the input as text"))
    prompt = "\n".join(p for p in parts if p)
    if not prompt.strip():
        raise _Bad(f"`{cols['prompt']}` and `{cols['query']}` are both empty", "write the instruction")
    if cols["response"] not in record:
        raise _Bad(f"the `{cols['response']}` field is missing", f"add `{cols['response']}` (the response to learn)")
    reply = _text(record[cols["response"]], f"the response `{cols['response']}`", "write the response to learn")
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def _conversation(record: dict, fmt: str, columns: dict, tags: dict) -> list[dict[str, str]]:
    cols = {**(SHAREGPT_COLUMNS if fmt == "sharegpt" else OPENAI_COLUMNS), **columns}
    tag = {**(SHAREGPT_TAGS if fmt == "sharegpt" else OPENAI_TAGS), **tags}
    key = cols["messages"]
    if key not in record:
        raise _Bad(f"the `{key}` field is missing", f"give the conversation as `{key}`: a list of turns")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise _Bad(f"`{key}` is empty or not a list", f"give `{key}` as a list of turns")
    roles = {
        tag["user_tag"]: "user", tag["assistant_tag"]: "assistant", tag["observation_tag"]: "tool",
        tag["function_tag"]: "assistant", tag["system_tag"]: "system",
    }
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or tag["role_tag"] not in turn or tag["content_tag"] not in turn:
            raise _Bad(f"turn {i} has no `{tag['role_tag']}`/`{tag['content_tag']}`",
                       f"write every turn as {{{tag['role_tag']!r}: ..., {tag['content_tag']!r}: ...}}")
        role = roles.get(turn[tag["role_tag"]])
        if role is None:
            raise _Bad(f"turn {i} has the role {turn[tag['role_tag']]!r}",
                       f"use one of {sorted(k for k in roles if k)} (or map yours with `tags`)")
        content = turn[tag["content_tag"]]
        if fmt == "openai" and role == "assistant" and turn.get("tool_calls"):
            content = json.dumps([c.get("function", c) for c in turn["tool_calls"]], ensure_ascii=False)
        if role == "assistant":
            content = _text(content, f"the reply in turn {i}", "write the reply (an empty one teaches nothing)")
        else:
            content = _text(content, f"turn {i} ({role})", "fill it in", allow_empty=role == "system")
        messages.append({"role": role, "content": content})
    system_column = cols.get("system")
    if system_column and record.get(system_column) and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _text(record[system_column], "`system`", "give a string")})
    _check_order(messages)
    return messages


def _check_order(messages: list[dict[str, str]]) -> None:
    """system first (at most once), then user/tool and assistant turns alternating, ending with a reply."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    order = " -> ".join(m["role"] for m in messages)
    fix = "order the turns system (optional), then user and assistant alternating, ending with an assistant reply"
    for i, message in enumerate(body):
        expected = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise _Bad(f"roles out of order ({order})", fix)
    if not body or body[-1]["role"] != "assistant":
        raise _Bad(f"the conversation does not end with an assistant reply ({order})", fix)


def _tools_text(record: dict, columns: dict) -> Optional[str]:
    column = columns.get("tools", "tools")
    tools = record.get(column) if column else None
    if not tools:
        return None
    return tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)


def to_messages(record: Any, fmt: str, columns: Optional[dict] = None, tags: Optional[dict] = None,
                default_system: Optional[str] = None) -> list[dict[str, str]]:
    """One record as TRL's conversational ``messages``; raises ``_Bad`` with the problem and the fix."""
    columns, tags = columns or {}, tags or {}
    if not isinstance(record, dict):
        raise _Bad(f"the record is a {type(record).__name__}, not a JSON object", "write each record as an object")
    messages = _alpaca(record, columns) if fmt == "alpaca" else _conversation(record, fmt, columns, tags)
    tools = _tools_text(record, columns)
    if default_system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system})
    if tools:
        # LLaMA-Factory writes the tool list into the system prompt; its wording differs per template.
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        system = messages[0]["content"]
        messages[0] = {"role": "system", "content": f"{system}\n\nYou have access to the following tools:\n{tools}"
                       .lstrip("\n")}
    return messages


# -- chat template ---------------------------------------------------------------------------


def resolve_chat_template(tokenizer: Any, sft_args: SFTArguments) -> str:
    """The Jinja template to train with (set on the tokenizer, so it is saved with it)."""
    value = sft_args.chat_template
    names = ", ".join(sorted(TEMPLATES))
    if value is None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise InvalidArgumentError(
                "chat_template", None, f"a template: one of {names}, a .jinja file or Jinja text",
                "The tokenizer has no chat template of its own.",
            )
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()))
        return template
    if value in TEMPLATES:
        template = build_chat_template(value, sft_args.default_system, sft_args.enable_thinking)
        stop = stop_token(value)
        if stop and stop in tokenizer.get_vocab() and tokenizer.eos_token != stop:
            # As LLaMA-Factory (replace_eos): the end of a turn is the end of generation. A
            # tokenizer without the token keeps its EOS (adding one would resize the embeddings).
            tokenizer.eos_token = stop
    elif os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            template = fh.read()
    elif "{%" in value or "{{" in value:
        template = value
    else:
        hint = "Multimodal templates have no text-only meaning. " if MULTIMODAL_TEMPLATE.search(value) else ""
        raise InvalidArgumentError("chat_template", value, f"one of {names}, a .jinja file or Jinja text", hint)
    _check_jinja(value, template)
    tokenizer.chat_template = template
    return template


def _check_jinja(value: str, template: str) -> None:
    """Compile ``template`` as transformers will, so a syntax error is named before training."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateError as exc:
        raise InvalidArgumentError(
            "chat_template", value, "a valid Jinja chat template",
            f"Jinja: {exc.message} (line {getattr(exc, 'lineno', '?')}).",
        ) from exc


def _has_markers(template: str) -> bool:
    from trl.chat_template_utils import has_generation_markers

    return has_generation_markers(template)


# -- loading and checking --------------------------------------------------------------------


def _specs(data_args: Any, sft_args: SFTArguments, split: str) -> tuple[str, list[DatasetSpec]]:
    """The option that names the split's data, and its files."""
    list_option, file_option = (("sft_datasets", "train_file") if split == "train"
                                else ("sft_eval_datasets", "validation_file"))
    listed = getattr(sft_args, list_option)
    single = getattr(data_args, file_option)
    if listed is not None and single is not None:
        raise InvalidArgumentError(list_option, listed, f"unset when {file_option} is given (one or the other)")
    if listed is None:
        if single is None and split == "train":
            raise InvalidArgumentError("train_file", None, "a .json/.jsonl file of records (or sft_datasets)")
        return file_option, [] if single is None else [DatasetSpec(file=single, format=sft_args.sft_format)]
    if isinstance(listed, str):  # from the command line: JSON, or comma-separated files
        try:
            listed = json.loads(listed)
        except json.JSONDecodeError:
            listed = [p.strip() for p in listed.split(",") if p.strip()]
    if isinstance(listed, dict):
        listed = [listed]
    if not isinstance(listed, list) or not listed:
        raise InvalidArgumentError(list_option, listed, "a non-empty list of {file, format, ...} mappings")
    return list_option, [DatasetSpec.from_mapping(v, list_option) for v in listed]


def looks_like_sft(data_args: Any) -> bool:
    """Whether ``train_file`` holds instruction or chat records (for ``task: auto``)."""
    path = getattr(data_args, "train_file", None)
    if not path or not os.path.isfile(path) or not path.lower().endswith(_EXTENSIONS):
        return False
    try:
        if path.lower().endswith(".jsonl"):  # the first record is enough
            with open(path, encoding="utf-8") as fh:
                first = json.loads(next((line for line in fh if line.strip()), "null"))
        else:
            records = read_records(path, "train_file")
            first = records[0] if records else None
    except (StrategyError, json.JSONDecodeError):
        return False
    return detect_format(first) is not None


def dataset_records(spec: DatasetSpec, option: str) -> tuple[list[Any], str]:
    """A dataset entry's records (its first ``max_samples``) and their format; a file without records is refused."""
    records = read_records(spec.file, option)
    if not records:
        raise InvalidArgumentError(option, spec.file, "a file with at least one record")
    if spec.max_samples is not None:
        records = records[: int(spec.max_samples)]
    return records, record_format(records, spec, option)


def _load_messages(spec: DatasetSpec, option: str, sft_args: SFTArguments, bad: list) -> list[dict]:
    """The file's records as messages (with where they came from); bad ones go to ``bad``."""
    records, fmt = dataset_records(spec, option)
    rows = []
    for number, record in enumerate(records, start=1):
        try:
            messages = to_messages(record, fmt, spec.columns, spec.tags, sft_args.default_system)
            rows.append({"messages": messages, "_where": (spec.file, number)})
        except _Bad as exc:
            bad.append((spec.file, number, exc))
    return rows


def _learnable(messages: list[dict], tokenizer: Any, template: str, max_length: int, markers: bool,
               train_on_prompt: bool) -> None:
    """Raise ``_Bad`` when truncation to ``max_length`` leaves no token to learn from."""
    if train_on_prompt:
        return
    if markers:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        mask = out["assistant_masks"]
        if 1 not in mask:
            raise _Bad("the chat template marks no token of the replies", "use a template whose "
                       "{% generation %} markers wrap the assistant turns")
        if 1 not in mask[:max_length]:
            raise _Bad(f"its prompt fills all {max_length} tokens (max_seq_length): no reply token is left to "
                       f"learn from ({mask.index(1)} prompt tokens)", "raise max_seq_length or shorten the prompt")
        return
    prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=template, tokenize=True, return_dict=True,
                                           add_generation_prompt=True)["input_ids"]
    if len(prompt) >= max_length:
        raise _Bad(f"its prompt fills all {max_length} tokens (max_seq_length): no reply token is left to learn "
                   f"from ({len(prompt)} prompt tokens)", "raise max_seq_length or shorten the prompt")


def _refuse_or_count(bad: list, sft_args: SFTArguments, split: str) -> None:
    if not bad:
        return
    if sft_args.bad_records == "skip":
        files = sorted({f for f, _, _ in bad})
        logger.warning(f"bad_records: skip: {len(bad)} {split} record(s) left out of {', '.join(files)}; first: "
                       f"record {bad[0][1]} of {bad[0][0]}: {bad[0][2].problem}.")
        return
    path, number, exc = bad[0]
    more = f" ({len(bad) - 1} more bad record(s) in the {split} data)" if len(bad) > 1 else ""
    raise BadRecordError(
        f"{path}: record {number}: {exc.problem}. Fix: {exc.fix}; or set bad_records: skip to leave such "
        f"records out{more}. Nothing was written."
    )


@dataclass
class SFTData:
    """Converted datasets and how TRL is to mask them."""

    train: Any
    eval: Optional[Any]
    chat_template: str
    assistant_only_loss: bool  # else prompt/completion form (or the whole sequence with train_on_prompt)
    #: Records left out by ``bad_records: skip``, by split (``train``, ``validation``).
    skipped: dict[str, int] = field(default_factory=dict)
    #: The datasets hold ``input_ids`` and ``labels`` already (``template:``); TRL takes them as they are.
    tokenized: bool = False
    #: What preparing the data changed that the user should hear (tokens added to the vocabulary...).
    notes: list[str] = field(default_factory=list)


def _load_split(split: str, data_args: Any, sft_args: SFTArguments, tokenizer: Any, template: str,
                markers: bool, skipped: dict[str, int]) -> Optional[list[dict]]:
    """The split's usable records (None when it has no data), bad ones refused or counted in ``skipped``."""
    option, specs = _specs(data_args, sft_args, split)
    if not specs:
        return None
    bad: list = []
    rows = [row for spec in specs for row in _load_messages(spec, option, sft_args, bad)]
    kept = []
    for row in rows:
        try:
            _learnable(row["messages"], tokenizer, template, data_args.max_seq_length, markers,
                       sft_args.train_on_prompt)
            kept.append(row)
        except _Bad as exc:
            bad.append((*row["_where"], exc))
    bad.sort(key=lambda b: (b[0], b[1]))
    _refuse_or_count(bad, sft_args, split)
    if bad:
        skipped[split] = len(bad)
    if not kept:
        path, number, exc = bad[0]
        raise InvalidArgumentError(option, specs[0].file, "data with at least one usable record",
                                   f"Every record was bad; the first, record {number} of {path}: {exc.problem}. "
                                   f"Fix: {exc.fix}.")
    limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
    return kept[:limit] if limit else kept


def check_sft_arguments(sft_args: SFTArguments) -> None:
    """Refuse ``task: sft`` options no run can use (each named, with what is valid)."""
    if sft_args.bad_records not in BAD_RECORDS:
        raise InvalidArgumentError("bad_records", sft_args.bad_records, f"one of {list(BAD_RECORDS)}")
    if sft_args.sft_loss not in SFT_LOSSES:
        raise InvalidArgumentError("sft_loss", sft_args.sft_loss, f"one of {list(SFT_LOSSES)}")
    normalise_format(sft_args.sft_format)
    if sft_args.default_system is not None and not isinstance(sft_args.default_system, str):
        raise InvalidArgumentError("default_system", sft_args.default_system, "the system prompt as text")


def record_format(records: list[Any], spec: DatasetSpec, option: str) -> str:
    """The format of ``spec``'s records: as given, or (``auto``) from the first record's keys."""
    fmt = normalise_format(spec.format, option)
    if fmt != "auto":
        return fmt
    fmt = detect_format(records[0], spec.columns)
    if fmt is None:
        keys = sorted(records[0]) if isinstance(records[0], dict) else type(records[0]).__name__
        raise InvalidArgumentError(
            "sft_format", "auto", "alpaca, sharegpt or openai",
            f"The first record of {spec.file} has keys {keys}: none of instruction/output, conversations, "
            "messages. Set sft_format (and the columns) for it.",
        )
    return fmt


def load_sft_data(data_args: Any, sft_args: SFTArguments, tokenizer: Any, seed: int = 0) -> SFTData:
    """Read, convert and check every record; the datasets in TRL's conversational form.

    ``data_args`` holds the data keys (``train_file``, ``validation_file``, ``validation_split``,
    ``max_seq_length``, ``max_train_samples``, ``max_eval_samples``), ``sft_args`` those of
    :class:`SFTArguments` (the CLI passes one object holding both).

    Raises:
        BadRecordError: a record that cannot be trained on (file, record number, fix), unless
            ``bad_records: skip``.
        InvalidArgumentError: a missing file, an unknown format, no chat template.
    """
    import datasets

    check_sft_arguments(sft_args)
    if sft_args.template is not None:
        raise InvalidArgumentError("template", sft_args.template, "unset for load_sft_data (template data is read "
                                   "by hf_llama_strategies.data.template_data.load_template_data)")
    template = resolve_chat_template(tokenizer, sft_args)
    # Every reply is learned through the template's generation markers; without them, or with
    # mask_history, TRL's prompt/completion form learns the last one.
    markers = _has_markers(template) and not sft_args.mask_history
    skipped: dict[str, int] = {}
    train = _load_split("train", data_args, sft_args, tokenizer, template, markers, skipped)
    evaluation = _load_split("validation", data_args, sft_args, tokenizer, template, markers, skipped)
    value = data_args.validation_split
    if evaluation is None and value and not (0 < value < 1 or (value == int(value) and value < len(train))):
        raise InvalidArgumentError("validation_split", value,
                                   f"a fraction in (0, 1) or a whole count below {len(train)} records")
    assistant_only_loss = markers and not sft_args.train_on_prompt
    if not markers and not sft_args.mask_history and not sft_args.train_on_prompt and any(
        sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in train
    ):
        logger.warning(
            "the chat template has no {% generation %} markers: only the last reply of each conversation is "
            "trained, earlier replies are context. Set chat_template (a shipped name such as chatml, or a "
            "template with markers) to train every reply."
        )
    form = _trl_form if not markers and not sft_args.train_on_prompt else (lambda m: {"messages": m})
    train_set = datasets.Dataset.from_list([form(r["messages"]) for r in train])
    eval_set = None if evaluation is None else datasets.Dataset.from_list([form(r["messages"]) for r in evaluation])
    if eval_set is None and value:
        parts = train_set.train_test_split(test_size=int(value) if value >= 1 else value, seed=seed)
        train_set, eval_set = parts["train"], parts["test"]
    return SFTData(train=train_set, eval=eval_set, chat_template=template, assistant_only_loss=assistant_only_loss,
                   skipped=skipped)


def _trl_form(messages: list[dict]) -> dict[str, list]:
    """TRL's conversational prompt/completion form: the loss on the last reply only."""
    return {"prompt": messages[:-1], "completion": messages[-1:]}
