"""``template:`` SFT data: records read and tokenized as LLaMA-Factory 0.9.5 reads and tokenizes them.

Records (alpaca, sharegpt or openai, with the columns and tags of a ``dataset_info.json``
entry) are aligned as LLaMA-Factory's dataset converters align them (:func:`to_conversation`):
alpaca's instruction and input joined by a newline after its history; sharegpt's turns
checked to alternate (user or observation, then assistant or function call) with a leading
system turn taken as the system prompt; openai's tool calls turned into function-call turns
and consecutive tool results into one observation. A record LLaMA-Factory drops (roles out of
order, a reply missing) is a bad record here (``bad_records: skip`` leaves it out, as the
translation of a LLaMA-Factory YAML does). Each kept record is tokenized by
:mod:`.template_tokens`; the datasets hold ``input_ids`` and ``labels``, which TRL's
``SFTTrainer`` takes as they are (it still packs and collates them).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from transformers.utils import logging

from ..errors import InvalidArgumentError
from .chat_templates import MULTIMODAL_TEMPLATE, TEMPLATES, TemplateSpec, build_chat_template
from .sft import (
    ALPACA_COLUMNS,
    OPENAI_COLUMNS,
    OPENAI_TAGS,
    SHAREGPT_COLUMNS,
    SHAREGPT_TAGS,
    SFTArguments,
    SFTData,
    _Bad,
    _refuse_or_count,
    _specs,
    check_sft_arguments,
    dataset_records,
)
from .template_tokens import (
    ASSISTANT,
    FUNCTION,
    OBSERVATION,
    USER,
    Conversation,
    EncodeOptions,
    TemplateEncoder,
    encode_example,
    prepare_tokenizer,
    with_tool_format,
)
from .tool_formats import TOOL_FORMATS

logger = logging.get_logger(__name__)

_PROMPT_SIDE, _REPLY_SIDE = (USER, OBSERVATION), (ASSISTANT, FUNCTION)
_ORDER_FIX = "alternate user (or observation) and assistant (or function_call) turns, ending with a reply"


# -- records into LLaMA-Factory's aligned form ----------------------------------------------------


def _tools(value: Any) -> str:
    """The tools column as JSON text (a list or mapping written in the record is dumped)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value or ""


def _alpaca(record: dict, cols: dict) -> Conversation:
    turns: list[dict[str, str]] = []
    history = record.get(cols["history"]) if cols.get("history") else None
    if isinstance(history, list):
        for turn, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _Bad(f"history turn {turn} is not a [prompt, reply] pair", "write it as [[prompt, reply], ...]")
            turns += [{"role": USER, "content": pair[0]}, {"role": ASSISTANT, "content": pair[1]}]
    query = [record[c] for c in (cols.get("prompt"), cols.get("query")) if c and record.get(c)]
    if not all(isinstance(q, str) for q in query):
        raise _Bad(f"`{cols['prompt']}` or `{cols['query']}` is not text", "give the instruction as text")
    reply = record.get(cols["response"]) if cols.get("response") else None
    if not isinstance(reply, str):
        raise _Bad(f"the response `{cols.get('response')}` is {'missing' if reply is None else 'not text'}",
                   f"add `{cols.get('response')}` (the response to learn)")
    turns += [{"role": USER, "content": "\n".join(query)}, {"role": ASSISTANT, "content": reply}]
    system = record.get(cols["system"]) if cols.get("system") else ""
    return Conversation(turns, system or "", _tools(record.get(cols["tools"]) if cols.get("tools") else ""))


def _checked(turns: list[dict[str, str]], order: str) -> list[dict[str, str]]:
    for i, turn in enumerate(turns):
        if turn["role"] not in (_PROMPT_SIDE, _REPLY_SIDE)[i % 2]:
            raise _Bad(f"turn {i} is a {turn['role']} turn where a {'prompt' if i % 2 == 0 else 'reply'} belongs "
                       f"({order})", _ORDER_FIX)
    if not turns or len(turns) % 2:
        raise _Bad(f"the conversation does not end with a reply ({order or 'no turn'})", _ORDER_FIX)
    return turns


def _sharegpt(record: dict, cols: dict, tag: dict) -> Conversation:
    messages = record.get(cols["messages"]) if cols.get("messages") else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Bad(f"`{cols.get('messages')}` is not a list of turns", "give the conversation as a list of turns")
    role, content = tag["role_tag"], tag["content_tag"]
    system = record.get(cols["system"]) if cols.get("system") else ""
    if tag.get("system_tag") and messages and messages[0].get(role) == tag["system_tag"]:
        system, messages = messages[0].get(content), messages[1:]
    roles = {tag.get("user_tag"): USER, tag.get("assistant_tag"): ASSISTANT, tag.get("observation_tag"): OBSERVATION,
             tag.get("function_tag"): FUNCTION}
    roles.pop(None, None)
    turns = [{"role": roles.get(m.get(role), str(m.get(role))), "content": m.get(content)} for m in messages]
    order = " -> ".join(str(m.get(role)) for m in messages)
    return Conversation(_checked(turns, order), system or "", _tools(record.get(cols["tools"]) if cols.get("tools")
                                                                       else ""))


def _openai(record: dict, cols: dict, tag: dict) -> Conversation:
    messages = record.get(cols["messages"]) if cols.get("messages") else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _Bad(f"`{cols.get('messages')}` is not a list of messages", "give the conversation as a list")
    role_key, content_key = tag["role_tag"], tag["content_tag"]
    system = record.get(cols["system"], "") if cols.get("system") else ""
    if tag.get("system_tag") and messages and messages[0].get(role_key) == tag["system_tag"]:
        system, messages = messages[0].get(content_key), messages[1:]
    roles = {tag.get("user_tag"): USER, tag.get("assistant_tag"): ASSISTANT, tag.get("observation_tag"): OBSERVATION,
             tag.get("function_tag"): FUNCTION, tag.get("system_tag"): "system"}
    turns, results = [], []
    for message in messages:
        role, content = message.get(role_key), message.get(content_key)
        if role in (tag.get("assistant_tag"), tag.get("function_tag")) and message.get("tool_calls"):
            content = json.dumps([call["function"] for call in message["tool_calls"]], ensure_ascii=False)
            role = tag.get("function_tag")
        if role == tag.get("observation_tag"):
            results.append(content)  # consecutive tool results are one observation
            continue
        if results:
            turns.append({"role": OBSERVATION, "content": "\n</tool_response>\n<tool_response>\n".join(results)})
            results = []
        turns.append({"role": roles.get(role, str(role)), "content": content})
    order = " -> ".join(str(m.get(role_key)) for m in messages)
    tools = _tools(record.get(cols["tools"], "") if cols.get("tools") else "")
    # LLaMA-Factory's openai converter asks for short answers unless the system prompt says otherwise.
    thinking = "detailed thinking off"
    if not system:
        system = "" if tools else thinking
    elif tools:
        system += "\n"
    elif "detailed thinking on" not in system and thinking not in system:
        system += "\n" + thinking
    return Conversation(_checked(turns, order), system, tools)


def to_conversation(record: Any, fmt: str, columns: Optional[dict] = None, tags: Optional[dict] = None) -> Conversation:
    """One record in LLaMA-Factory's aligned form; raises ``_Bad`` (the problem and the fix) where it drops it."""
    if not isinstance(record, dict):
        raise _Bad(f"the record is a {type(record).__name__}, not a JSON object", "write each record as an object")
    columns, tags = columns or {}, tags or {}
    if fmt == "alpaca":
        conversation = _alpaca(record, {**ALPACA_COLUMNS, **columns})
    elif fmt == "sharegpt":
        conversation = _sharegpt(record, {**SHAREGPT_COLUMNS, **columns}, {**SHAREGPT_TAGS, **tags})
    else:
        conversation = _openai(record, {**OPENAI_COLUMNS, **columns}, {**OPENAI_TAGS, **tags})
    for i, turn in enumerate(conversation.turns):
        if not isinstance(turn["content"], str):
            raise _Bad(f"turn {i} ({turn['role']}) is {type(turn['content']).__name__}, not text", "fill it in")
    if not isinstance(conversation.system, str) or not isinstance(conversation.tools, str):
        raise _Bad("the system prompt or the tools are not text", "give them as text (the tools as JSON text)")
    return conversation


# -- the template, the tokenizer, the datasets ------------------------------------------------------


def template_spec(sft_args: SFTArguments) -> TemplateSpec:
    """The template ``sft_args.template`` names, with ``default_system`` and ``tool_format`` applied."""
    from dataclasses import replace

    name = sft_args.template
    if name not in TEMPLATES:
        hint = "Multimodal templates have no text-only meaning. " if MULTIMODAL_TEMPLATE.search(str(name)) else ""
        raise InvalidArgumentError("template", name, f"a LLaMA-Factory template name: one of {sorted(TEMPLATES)}",
                                   hint)
    if sft_args.chat_template is not None:
        raise InvalidArgumentError("chat_template", sft_args.chat_template, f"unset when template is given "
                                   f"(template={name!r} tokenizes as LLaMA-Factory does; chat_template is TRL's way)")
    if sft_args.tool_format is not None and sft_args.tool_format not in TOOL_FORMATS:
        raise InvalidArgumentError("tool_format", sft_args.tool_format, f"one of {sorted(TOOL_FORMATS)}")
    spec = TEMPLATES[name]
    if sft_args.train_on_prompt and spec.efficient_eos:
        raise InvalidArgumentError("train_on_prompt", True, f"false with template={name!r}: its EOS is learned on "
                                   "the next prompt's first token (efficient_eos), as in LLaMA-Factory")
    if sft_args.default_system is not None:
        spec = replace(spec, default_system=sft_args.default_system)
    return with_tool_format(spec, sft_args.tool_format)


def _encode_records(spec: Any, option: str, encoder: TemplateEncoder, options: EncodeOptions,
                    bad: list) -> list[dict[str, list[int]]]:
    rows = []
    records, fmt = dataset_records(spec, option)
    for number, record in enumerate(records, start=1):
        try:
            input_ids, labels = encode_record(encoder, record, fmt, spec.columns, spec.tags, options)
        except _Bad as exc:
            bad.append((spec.file, number, exc))
            continue
        rows.append({"input_ids": input_ids, "labels": labels})
    return rows


def encode_record(encoder: TemplateEncoder, record: Any, fmt: str, columns: Optional[dict], tags: Optional[dict],
                  options: EncodeOptions) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record; ``_Bad`` for a record LLaMA-Factory drops or fails on."""
    conversation = to_conversation(record, fmt, columns, tags)
    try:
        return encode_example(encoder, conversation, options)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Tools or a function call that are not the JSON their format reads (LLaMA-Factory stops the run there).
        raise _Bad(f"its tools or a function call cannot be written ({type(exc).__name__}: {exc})",
                   'write tools as a JSON list of schemas, a call as {"name": ..., "arguments": {...}}') from None


def _split(split: str, data_args: Any, sft_args: SFTArguments, encoder: TemplateEncoder, options: EncodeOptions,
           skipped: dict[str, int]) -> Optional[list[dict]]:
    option, specs = _specs(data_args, sft_args, split)
    if not specs:
        return None
    bad: list = []
    rows = [row for spec in specs for row in _encode_records(spec, option, encoder, options, bad)]
    _refuse_or_count(bad, sft_args, split)
    if bad:
        skipped[split] = len(bad)
    if not rows:
        detail = f"Every record was bad; the first, record {bad[0][1]} of {bad[0][0]}: {bad[0][2].problem}." if bad \
            else "No record."
        raise InvalidArgumentError(option, specs[0].file, "data with at least one usable record", detail)
    limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
    return rows[:limit] if limit else rows


def load_template_data(data_args: Any, sft_args: SFTArguments, tokenizer: Any, seed: int = 0) -> SFTData:
    """Read every record, tokenize it as LLaMA-Factory does with ``sft_args.template``; the datasets.

    ``tokenizer`` is prepared first (:func:`~.template_tokens.prepare_tokenizer`: stop words,
    EOS, padding) and given the template as its chat template when it has none (or when
    LLaMA-Factory replaces it), so that the saved tokenizer generates as the model was trained.
    ``data.notes`` says what changed in the tokenizer.

    Raises:
        BadRecordError: a record LLaMA-Factory would drop or fail on, unless ``bad_records: skip``.
        InvalidArgumentError: an unknown template, a missing file, an option the template refuses.
    """
    import datasets

    check_sft_arguments(sft_args)
    spec = template_spec(sft_args)
    notes = prepare_tokenizer(spec, tokenizer)
    if not getattr(tokenizer, "chat_template", None) or spec.replace_jinja_template:
        tokenizer.chat_template = build_chat_template(sft_args.template, sft_args.default_system,
                                                      sft_args.enable_thinking)
    encoder = TemplateEncoder(spec, tokenizer)
    options = EncodeOptions(cutoff_len=data_args.max_seq_length, train_on_prompt=sft_args.train_on_prompt,
                            mask_history=sft_args.mask_history, enable_thinking=sft_args.enable_thinking)
    skipped: dict[str, int] = {}
    train = _split("train", data_args, sft_args, encoder, options, skipped)
    evaluation = _split("validation", data_args, sft_args, encoder, options, skipped)
    train_set = datasets.Dataset.from_list(train)
    eval_set = None if evaluation is None else datasets.Dataset.from_list(evaluation)
    value = data_args.validation_split
    if eval_set is None and value:
        parts = train_set.train_test_split(test_size=int(value) if value >= 1 else value, seed=seed)
        train_set, eval_set = parts["train"], parts["test"]
    return SFTData(train=train_set, eval=eval_set, chat_template=tokenizer.chat_template, assistant_only_loss=False,
                   skipped=skipped, tokenized=True, notes=notes)
