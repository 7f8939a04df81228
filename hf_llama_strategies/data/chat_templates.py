"""Chat templates named as LLaMA-Factory names them (``template: llama3``): their text slots and rules.

One table, :data:`TEMPLATES`, describes each template as LLaMA-Factory 0.9.5's ``data/template.py``
behaves: the text around the system prompt, each user and assistant turn, each function call and
tool result (``{content}``, ``{bos}`` and ``{eos}`` filled in), the default system prompt, the
stop words (added to the tokenizer as special tokens; the first becomes its EOS with
``replace_eos``), ``efficient_eos`` (the EOS after the last reply only), the tool prompt format,
the system prompt inside the first user turn (``Llama2Template``: llama2, mistral, gemma) and
the empty thought of reasoning templates (qwen3).

Two readers:

* ``template:`` (``data/template_tokens.py``) tokenizes conversations piece by piece from these
  slots, exactly as LLaMA-Factory does;
* ``chat_template:`` with a shipped name (this module's :func:`build_chat_template`) writes the
  same slots as a Jinja chat template for TRL to render whole, the transformers way. Assistant
  turns are wrapped in ``{% generation %}`` markers, so TRL's ``assistant_only_loss`` learns the
  reply with its end-of-turn text; a user turn carries the assistant header that follows it, so
  a prompt renders the same with or without ``add_generation_prompt``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

# Multimodal LLaMA-Factory templates: their image/video/audio placeholders have no text-only meaning.
MULTIMODAL_TEMPLATE = re.compile(r"(vl|vision|llava|omni|audio|video|paligemma|pixtral|mllama|minicpm_[vo]|ocr)", re.I)

#: LLaMA-Factory's ``thought_words`` and ``tool_call_words`` (the same for every template here).
THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")
TOOL_CALL_WORDS = ("<tool_call>", "</tool_call>")


@dataclass(frozen=True)
class TemplateSpec:
    """The text slots and rules of one template; ``{content}``, ``{bos}`` and ``{eos}`` are filled in."""

    user: str = "{content}"
    assistant: Optional[str] = None  # default: "{content}{eos}" ("{content}" with efficient_eos)
    system: str = "{content}"
    observation: Optional[str] = None  # default: the user slot
    function: Optional[str] = None  # default: the assistant slot
    tool_format: str = "default"  # how tools are described in the system prompt, and calls written
    prefix: str = ""
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False  # the first stop word becomes the tokenizer's EOS
    efficient_eos: bool = False  # no EOS after each reply: one after the last, learned on the next prompt
    replace_jinja_template: bool = False  # its Jinja template replaces the tokenizer's own when saved
    system_in_user: bool = False  # LLaMA-Factory's Llama2Template: the system text opens the first user turn
    thinking: bool = False  # LLaMA-Factory's ReasoningTemplate: an empty thought where a reply has none

    @property
    def assistant_slot(self) -> str:
        """The assistant slot, LLaMA-Factory's default when the template names none."""
        if self.assistant is not None:
            return self.assistant
        return "{content}" if self.efficient_eos else "{content}{eos}"

    @property
    def function_slot(self) -> str:
        """The slot of a function-call turn: the assistant slot unless the template names one."""
        return self.function if self.function is not None else self.assistant_slot

    @property
    def observation_slot(self) -> str:
        return self.observation if self.observation is not None else self.user

    @property
    def eos(self) -> Optional[str]:
        """The stop word that becomes the tokenizer's EOS (``replace_eos``), or None."""
        return self.stop_words[0] if self.replace_eos and self.stop_words else None


_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML = dict(user=_CHATML_USER, assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n")
_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_QWEN = dict(**_CHATML, observation=_QWEN_TOOL, function="{content}<|im_end|>\n", tool_format="qwen",
             stop_words=("<|im_end|>",), replace_eos=True)
_QWEN3_5 = {**_QWEN, "tool_format": "qwen3_5"}
_GEMMA = dict(
    prefix="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    assistant="{content}<end_of_turn>\n", system="{content}\n\n",
    observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n", system_in_user=True,
)
_LLAMA4_HEADER = "<|header_start|>{role}<|header_end|>\n\n"
_LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_LLAMA2 = dict(user="{bos}[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True)

TEMPLATES: dict[str, TemplateSpec] = {
    "empty": TemplateSpec(assistant="{content}"),
    "default": TemplateSpec(
        user="Human: {content}{eos}\nAssistant:", assistant="{content}{eos}\n", system="System: {content}{eos}\n",
        replace_jinja_template=True,
    ),
    "alpaca": TemplateSpec(
        user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n"
        ),
        replace_jinja_template=True,
    ),
    "vicuna": TemplateSpec(
        user="USER: {content} ASSISTANT:",
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions."
        ),
        replace_jinja_template=True,
    ),
    "llama2": TemplateSpec(**_LLAMA2),
    "llama3": TemplateSpec(
        prefix="{bos}",
        user=_LLAMA3_HEADER.format(role="user") + "{content}<|eot_id|>" + _LLAMA3_HEADER.format(role="assistant"),
        assistant="{content}<|eot_id|>", function="{content}<|eot_id|>", tool_format="llama3",
        system=_LLAMA3_HEADER.format(role="system") + "{content}<|eot_id|>",
        observation=_LLAMA3_HEADER.format(role="ipython") + "{content}<|eot_id|>"
        + _LLAMA3_HEADER.format(role="assistant"),
        stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True,
    ),
    "llama4": TemplateSpec(
        prefix="{bos}",
        user=_LLAMA4_HEADER.format(role="user") + "{content}<|eot|>" + _LLAMA4_HEADER.format(role="assistant"),
        assistant="{content}<|eot|>", function="{content}<|eot|>", tool_format="llama3",
        system=_LLAMA4_HEADER.format(role="system") + "{content}<|eot|>",
        observation=_LLAMA4_HEADER.format(role="ipython") + "{content}<|eot|>"
        + _LLAMA4_HEADER.format(role="assistant"),
        stop_words=("<|eot|>", "<|eom|>"), replace_eos=True,
    ),
    "llama2_zh": TemplateSpec(**_LLAMA2, default_system="You are a helpful assistant. 你是一个乐于助人的助手。"),
    "mistral": TemplateSpec(
        prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}", system="{content}\n\n",
        function="[TOOL_CALLS] {content}{eos}", tool_format="mistral",
        observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]', system_in_user=True,
    ),
    "ministral": TemplateSpec(
        prefix="{bos}", user="[INST]{content}[/INST]", system="{content}\n\n",
        function="[TOOL_CALLS]{content}{eos}", tool_format="mistral",
        observation='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]', system_in_user=True,
    ),
    "qwen": TemplateSpec(**_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful "
                         "assistant."),
    "qwen3_nothink": TemplateSpec(**_QWEN),
    "qwen3": TemplateSpec(**_QWEN, thinking=True),
    # Qwen3.5's text slots are Qwen3's with its own tool format (its vision plugin: text only here).
    "qwen3_5_nothink": TemplateSpec(**_QWEN3_5),
    "qwen3_5": TemplateSpec(**_QWEN3_5, thinking=True),
    "chatml": TemplateSpec(
        **_CHATML, observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
        stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True, replace_jinja_template=True,
    ),
    "yi": TemplateSpec(**_CHATML, stop_words=("<|im_end|>",)),
    "smollm2": TemplateSpec(**_CHATML, stop_words=("<|im_end|>",), default_system="You are a helpful AI assistant "
                            "named SmolLM, trained by Hugging Face."),
    "gemma": TemplateSpec(**_GEMMA, stop_words=("<end_of_turn>",), replace_eos=True),
    "gemma2": TemplateSpec(**_GEMMA, stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True),
    "phi": TemplateSpec(
        user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>\n",
        system="<|system|>\n{content}<|end|>\n", stop_words=("<|end|>",), replace_eos=True,
    ),
    "phi4": TemplateSpec(
        user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
        assistant="{content}<|im_end|>", system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
        stop_words=("<|im_end|>",), replace_eos=True,
    ),
    "deepseek": TemplateSpec(prefix="{bos}", user="User: {content}\n\nAssistant:", system="{content}\n\n"),
    "deepseek3": TemplateSpec(prefix="{bos}", user="<｜User｜>{content}<｜Assistant｜>"),
    "glm4": TemplateSpec(
        prefix="[gMASK]<sop>", user="<|user|>\n{content}<|assistant|>", assistant="\n{content}",
        system="<|system|>\n{content}", observation="<|observation|>\n{content}<|assistant|>",
        function="{content}", tool_format="glm4", stop_words=("<|user|>", "<|observation|>"), efficient_eos=True,
    ),
    "cohere": TemplateSpec(
        prefix="{bos}",
        user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>"
        "<|CHATBOT_TOKEN|>",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
    ),
    "granite3": TemplateSpec(
        user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
        assistant="{content}<|end_of_text|>\n",
        system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
    ),
    "olmo": TemplateSpec(prefix="{eos}", user="<|user|>\n{content}<|assistant|>\n"),
    "zephyr": TemplateSpec(
        user="<|user|>\n{content}{eos}<|assistant|>\n", system="<|system|>\n{content}{eos}",
        default_system="You are Zephyr, a helpful assistant.",
    ),
}
TEMPLATES["qwen2"] = TEMPLATES["qwen"]

_THINK = "<think>\n\n</think>\n\n"


def _expr(slot: str, content: str) -> str:
    """A Jinja expression concatenating the slot's literal text, ``content``, bos and eos."""
    parts = []
    for piece in re.split(r"(\{content\}|\{bos\}|\{eos\})", slot):
        if piece == "{content}":
            parts.append(content)
        elif piece == "{bos}":
            parts.append("bos_token")
        elif piece == "{eos}":
            parts.append("eos_token")
        elif piece:
            parts.append(json.dumps(piece))
    return " ~ ".join(parts) if parts else '""'


def build_chat_template(name: str, default_system: Optional[str] = None, enable_thinking: bool = True) -> str:
    """The Jinja chat template of LLaMA-Factory's template ``name`` (see :data:`TEMPLATES`).

    ``default_system`` replaces the template's default system prompt (LLaMA-Factory's key of
    that name); ``enable_thinking`` matters to ``qwen3`` only: true puts an empty thought,
    trained, before each reply that has none; false puts it in the prompt, untrained.
    """
    spec = TEMPLATES[name]
    system = spec.default_system if default_system is None else default_system
    observation = spec.observation_slot
    reply = "m['content']"
    before_reply = ""
    if spec.thinking:
        if enable_thinking:
            reply = f"(m['content'] if '<think>' in m['content'] else {json.dumps(_THINK)} ~ m['content'])"
        else:
            before_reply = "{% if '<think>' not in m['content'] %}" + "{{ " + json.dumps(_THINK) + " }}{% endif %}"
    first_user = _expr(spec.user, _expr(spec.system, "ns.system") + " ~ m['content']")
    return "".join([
        "{% set ns = namespace(system=" + json.dumps(system) + ") %}",
        "{% set msgs = messages %}",
        "{% if messages and messages[0]['role'] == 'system' %}",
        "{% set ns.system = messages[0]['content'] %}{% set msgs = messages[1:] %}{% endif %}",
        "{{ " + _expr(spec.prefix, '""') + " }}" if spec.prefix else "",
        "{% for m in msgs %}",
        "{% if loop.first and ns.system and not " + json.dumps(spec.system_in_user).lower() + " %}",
        "{{ " + _expr(spec.system, "ns.system") + " }}{% endif %}",
        "{% if m['role'] == 'user' %}",
        "{% if loop.first and ns.system and " + json.dumps(spec.system_in_user).lower() + " %}",
        "{{ " + first_user + " }}{% else %}{{ " + _expr(spec.user, "m['content']") + " }}{% endif %}",
        "{% elif m['role'] == 'assistant' %}",
        before_reply,
        "{% generation %}{{ " + _expr(spec.assistant_slot, reply) + " }}{% endgeneration %}",
        "{% elif m['role'] == 'tool' %}{{ " + _expr(observation, "m['content']") + " }}",
        "{% endif %}{% endfor %}",
    ])


def stop_token(name: str) -> Optional[str]:
    """The end-of-turn text that LLaMA-Factory makes the tokenizer's EOS for template ``name`` (replace_eos)."""
    spec = TEMPLATES.get(name)
    return spec.eos if spec is not None else None
