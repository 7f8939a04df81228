"""Conversations into input ids and labels, token for token as LLaMA-Factory 0.9.5 makes them.

``template: llama3`` (a LLaMA-Factory YAML's key, or the native one) trains on exactly the
tokens LLaMA-Factory would, record for record:

* each piece of a template (the prefix, the system turn, a user turn, a reply, each text
  between ``{bos}`` / ``{eos}``) is tokenized on its own and the ids concatenated, as
  LLaMA-Factory's ``Template._encode`` does: no merge across a piece boundary, a
  SentencePiece ``▁`` at the start of each piece, and a prompt tokenized as it is at
  inference;
* the tokenizer is prepared as LLaMA-Factory prepares it (:func:`prepare_tokenizer`): the stop
  words are added as special tokens, the first one made its EOS with ``replace_eos``;
* :func:`encode_example` labels the replies (all tokens with ``train_on_prompt``; the last
  reply only with ``mask_history``), cuts each prompt and reply in proportion to fit
  ``cutoff_len`` (LLaMA-Factory's ``infer_seqlen``), and with ``efficient_eos`` ends the
  sequence with EOS and learns it on the first token of each later prompt.

A conversation here is LLaMA-Factory's aligned form (:class:`Conversation`): turns alternating
between the prompt side (``user``, ``observation``) and the reply side (``assistant``,
``function``), a system prompt and the tools' JSON text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .chat_templates import THOUGHT_WORDS, TOOL_CALL_WORDS, TemplateSpec
from .tool_formats import calls_text, parse_calls, tool_prompt

IGNORE_INDEX = -100
USER, ASSISTANT, FUNCTION, OBSERVATION = "user", "assistant", "function", "observation"
_MARKERS = re.compile(r"(\{bos\}|\{eos\})")


@dataclass
class Conversation:
    """One record in LLaMA-Factory's aligned form: turns (prompt side first), system prompt, tools JSON."""

    turns: list[dict[str, str]]
    system: str = ""
    tools: str = ""


@dataclass(frozen=True)
class EncodeOptions:
    """What shapes the labels and the length (the keys of the same names)."""

    cutoff_len: int = 2048
    train_on_prompt: bool = False
    mask_history: bool = False
    enable_thinking: bool = True


@dataclass
class TemplateEncoder:
    """A template bound to a prepared tokenizer (see :func:`prepare_tokenizer`)."""

    spec: TemplateSpec
    tokenizer: Any
    _cache: dict = field(default_factory=dict, repr=False)

    # -- pieces ---------------------------------------------------------------------------------

    def _elements(self, slot: str, content: str = "") -> list:
        """The slot's pieces: text (``{content}`` filled in) and the markers ``{bos}`` / ``{eos}``."""
        return [p if p in ("{bos}", "{eos}") else p.replace("{content}", content, 1)
                for p in _MARKERS.split(slot) if p]

    def _ids(self, elements: list) -> list[int]:
        ids: list[int] = []
        for element in elements:
            if element == "{bos}":
                ids += [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
            elif element == "{eos}":
                ids += [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            elif element:
                ids += self.tokenizer.encode(element, add_special_tokens=False)
        return ids

    # -- turns ----------------------------------------------------------------------------------

    def _function(self, content: str) -> str:
        """A function-call turn's text: its calls in the template's tool format, a thought kept before them."""
        spec = self.spec
        # LLaMA-Factory looks for <tool_call> tags and thoughts in calls, except in Llama2Template's turns.
        words = None if spec.system_in_user else (TOOL_CALL_WORDS, THOUGHT_WORDS)
        tagged = words and re.search(f"{re.escape(words[0][0])}(.*?){re.escape(words[0][1])}", content, re.DOTALL)
        if tagged:
            return content.replace(tagged.group(0), "") + calls_text(spec.tool_format, parse_calls(tagged.group(1)))
        thought = words and re.search(f"{re.escape(words[1][0])}(.*?){re.escape(words[1][1])}", content, re.DOTALL)
        if thought:
            calls = parse_calls(content.replace(thought.group(0), ""))
            return thought.group(0) + calls_text(spec.tool_format, calls)
        return calls_text(spec.tool_format, parse_calls(content))

    def _turn(self, role: str, content: str) -> list:
        spec = self.spec
        if role == USER:
            return self._elements(spec.user, content)
        if role == ASSISTANT:
            return self._elements(spec.assistant_slot, content)
        if role == OBSERVATION:
            return self._elements(spec.observation_slot, content)
        if role == FUNCTION:
            return self._elements(spec.function_slot, self._function(content))
        raise ValueError(f"unexpected role {role!r}")

    def encode_turns(self, conversation: Conversation) -> list[list[int]]:
        """Each turn's ids; the first carries the prefix and the system prompt (with the tools)."""
        spec = self.spec
        system = conversation.system or spec.default_system
        tools = conversation.tools
        encoded = []
        for i, turn in enumerate(conversation.turns):
            elements, content = [], turn["content"]
            if i == 0:
                elements += self._elements(spec.prefix)
                if system or tools:
                    text = system + (tool_prompt(spec.tool_format, tools) if tools else "")
                    if spec.system_in_user:
                        # Llama2Template: the system slot's text opens the first user turn.
                        content = (self._elements(spec.system, text)[0] + content) if turn["role"] == USER \
                            else content
                    else:
                        elements += self._elements(spec.system, text)
            encoded.append(self._ids(elements + self._turn(turn["role"], content)))
        return encoded

    # -- reasoning templates ----------------------------------------------------------------------

    def _thought_ids(self) -> list[int]:
        if "thought" not in self._cache:
            self._cache["thought"] = self.tokenizer.encode("".join(THOUGHT_WORDS), add_special_tokens=False)
        return self._cache["thought"]

    def encode_pairs(self, conversation: Conversation, options: EncodeOptions) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reply ids) for each exchange; reasoning templates add an empty thought where none is."""
        if not self.spec.thinking:
            encoded = self.encode_turns(conversation)
            return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
        turns = [dict(t) for t in conversation.turns]
        discard_history = options.mask_history  # LLaMA-Factory's preserve_thinking is off (refused otherwise)
        for i in range(1, len(turns), 2):
            if not options.enable_thinking or (discard_history and i < len(turns) - 1):
                turns[i]["content"] = _without_thought(turns[i]["content"])
        encoded = self.encode_turns(replace(conversation, turns=turns))
        for i in [len(turns) - 2] if discard_history else range(0, len(turns), 2):
            reply = turns[i + 1]["content"]
            if THOUGHT_WORDS[0].strip() not in reply and THOUGHT_WORDS[1].strip() not in reply:
                if options.enable_thinking:
                    encoded[i + 1] = self._thought_ids() + encoded[i + 1]
                else:
                    encoded[i] = encoded[i] + self._thought_ids()
        return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


def _without_thought(content: str) -> str:
    pattern = f"{re.escape(THOUGHT_WORDS[0])}(.*?){re.escape(THOUGHT_WORDS[1])}"
    return re.sub(pattern, "", content, flags=re.DOTALL).lstrip("\n")


def fit_lengths(prompt_len: int, reply_len: int, budget: int) -> tuple[int, int]:
    """How much of a prompt and its reply fit in ``budget`` tokens (LLaMA-Factory's ``infer_seqlen``).

    A short reply (under half the budget) is kept whole and the prompt cut; else a short prompt
    is kept whole and the reply cut; else both are cut in proportion to their lengths.
    """
    if reply_len * 2 < budget:
        max_reply = budget
    elif prompt_len * 2 < budget:
        max_reply = budget - prompt_len
    else:
        max_reply = int(budget * (reply_len / (prompt_len + reply_len)))
    new_reply = min(max_reply, reply_len)
    return min(max(budget - new_reply, 0), prompt_len), new_reply


def encode_example(encoder: TemplateEncoder, conversation: Conversation,
                   options: EncodeOptions) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation, as LLaMA-Factory's supervised processor makes them."""
    efficient_eos = encoder.spec.efficient_eos
    eos = encoder.tokenizer.eos_token_id
    pairs = encoder.encode_pairs(conversation, options)
    if options.mask_history:
        pairs = pairs[::-1]  # the last exchanges first: they keep their place within cutoff_len
    input_ids: list[int] = []
    labels: list[int] = []
    total = 1 if efficient_eos else 0
    for index, (prompt, reply) in enumerate(pairs):
        if total >= options.cutoff_len:
            break
        prompt_len, reply_len = fit_lengths(len(prompt), len(reply), options.cutoff_len - total)
        prompt, reply = prompt[:prompt_len], reply[:reply_len]
        total += prompt_len + reply_len
        if options.train_on_prompt:
            prompt_labels = prompt
        elif efficient_eos and index != 0:
            prompt_labels = [eos] + [IGNORE_INDEX] * (prompt_len - 1)
        else:
            prompt_labels = [IGNORE_INDEX] * prompt_len
        reply_labels = [IGNORE_INDEX] * reply_len if options.mask_history and index != 0 else reply
        if options.mask_history:
            input_ids, labels = prompt + reply + input_ids, prompt_labels + reply_labels + labels
        else:
            input_ids, labels = input_ids + prompt + reply, labels + prompt_labels + reply_labels
    if efficient_eos:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return input_ids, labels


def prepare_tokenizer(spec: TemplateSpec, tokenizer: Any) -> list[str]:
    """Prepare ``tokenizer`` for ``spec`` as LLaMA-Factory does; returns what changed, one line each.

    With ``replace_eos`` the first stop word becomes the EOS (added when the vocabulary lacks
    it); a tokenizer without EOS gets ``<|endoftext|>``, one without padding pads with EOS; the
    other stop words are added as special tokens. Added tokens grow ``len(tokenizer)`` past
    the model's embeddings: the caller resizes them.
    """
    changes: list[str] = []
    stop_words = list(spec.stop_words)
    if spec.replace_eos and stop_words:
        changes += _set_eos(tokenizer, stop_words.pop(0))
    if tokenizer.eos_token_id is None:
        changes += _set_eos(tokenizer, "<|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    missing = [w for w in stop_words if w not in tokenizer.get_vocab()]
    if stop_words:
        tokenizer.add_special_tokens({"additional_special_tokens": stop_words})
    if missing:
        changes.append(f"stop words {', '.join(missing)} added to the vocabulary as special tokens")
    return changes


def _set_eos(tokenizer: Any, token: str) -> list[str]:
    if tokenizer.eos_token == token:
        return []
    new = token not in tokenizer.get_vocab()
    tokenizer.add_special_tokens({"eos_token": token})
    return [f"EOS is {token}" + (" (added to the vocabulary)" if new else "")]


def with_tool_format(spec: TemplateSpec, tool_format: Optional[str]) -> TemplateSpec:
    """``spec`` with LLaMA-Factory's ``tool_format`` override: its tools, and calls in a plain reply slot."""
    if tool_format is None:
        return spec
    return replace(spec, tool_format=tool_format, function="{content}" if spec.efficient_eos else "{content}{eos}")
