"""Chat templates named as LLaMA-Factory names them (``template: llama3``), as Jinja.

LLaMA-Factory formats conversations with its own templates, whatever the tokenizer ships; a
tokenizer (a tiny test model's, say) may ship none. Each template here is written from the
slots of LLaMA-Factory's ``data/template.py`` (0.9.5): the same text around the system
prompt, each user and assistant turn and each tool result, the same default system prompt,
the system prompt inside the first user turn where LLaMA-Factory puts it there
(``Llama2Template``: llama2, mistral, gemma). Assistant turns are wrapped in
``{% generation %}`` markers, so ``apply_chat_template(return_assistant_tokens_mask=True)``
and TRL's ``assistant_only_loss`` see exactly the tokens LLaMA-Factory labels: the reply with
its end-of-turn text. A user turn carries the assistant header that follows it, as in
LLaMA-Factory, so a prompt renders the same with or without ``add_generation_prompt``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

# Multimodal LLaMA-Factory templates: their image/video/audio placeholders have no text-only meaning.
MULTIMODAL_TEMPLATE = re.compile(r"(vl|vision|llava|omni|audio|video|paligemma|pixtral|mllama|minicpm_[vo]|ocr)", re.I)


@dataclass(frozen=True)
class TemplateSpec:
    """The text slots of one template; ``{content}``, ``{bos}`` and ``{eos}`` are filled in."""

    user: str = "{content}"
    assistant: str = "{content}{eos}"
    system: str = "{content}"
    observation: Optional[str] = None  # default: the user slot
    prefix: str = ""
    default_system: str = ""
    system_in_user: bool = False  # LLaMA-Factory's Llama2Template: the system text opens the first user turn
    thinking: bool = False  # LLaMA-Factory's ReasoningTemplate: an empty <think></think> where a reply has none
    eos: Optional[str] = None  # LLaMA-Factory's replace_eos: this stop word becomes the tokenizer's EOS


_CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
_CHATML = dict(user=_CHATML_USER, assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n")
_GEMMA = dict(
    prefix="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
    assistant="{content}<end_of_turn>\n", system="{content}\n\n",
    observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n", system_in_user=True,
)
_LLAMA4_HEADER = "<|header_start|>{role}<|header_end|>\n\n"
_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"

TEMPLATES: dict[str, TemplateSpec] = {
    "empty": TemplateSpec(assistant="{content}"),
    "default": TemplateSpec(
        user="Human: {content}{eos}\nAssistant:", assistant="{content}{eos}\n", system="System: {content}{eos}\n"
    ),
    "alpaca": TemplateSpec(
        user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n"
        ),
    ),
    "vicuna": TemplateSpec(
        user="USER: {content} ASSISTANT:",
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions."
        ),
    ),
    "llama2": TemplateSpec(
        user="{bos}[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True
    ),
    "llama3": TemplateSpec(
        prefix="{bos}",
        user=_LLAMA3_HEADER.format(role="user") + "{content}<|eot_id|>" + _LLAMA3_HEADER.format(role="assistant"),
        assistant="{content}<|eot_id|>",
        system=_LLAMA3_HEADER.format(role="system") + "{content}<|eot_id|>",
        observation=_LLAMA3_HEADER.format(role="ipython") + "{content}<|eot_id|>"
        + _LLAMA3_HEADER.format(role="assistant"),
        eos="<|eot_id|>",
    ),
    "llama4": TemplateSpec(
        prefix="{bos}",
        user=_LLAMA4_HEADER.format(role="user") + "{content}<|eot|>" + _LLAMA4_HEADER.format(role="assistant"),
        assistant="{content}<|eot|>",
        system=_LLAMA4_HEADER.format(role="system") + "{content}<|eot|>",
        observation=_LLAMA4_HEADER.format(role="ipython") + "{content}<|eot|>"
        + _LLAMA4_HEADER.format(role="assistant"),
    ),
    "llama2_zh": TemplateSpec(
        user="{bos}[INST] {content} [/INST]", system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True,
        default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
    ),
    "mistral": TemplateSpec(
        prefix="{bos}", user="[INST] {content}[/INST]", assistant=" {content}{eos}", system="{content}\n\n",
        observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]', system_in_user=True,
    ),
    "ministral": TemplateSpec(
        prefix="{bos}", user="[INST]{content}[/INST]", system="{content}\n\n",
        observation='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]', system_in_user=True,
    ),
    "qwen": TemplateSpec(
        **_CHATML, observation=_QWEN_TOOL, eos="<|im_end|>",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "qwen3_nothink": TemplateSpec(**_CHATML, observation=_QWEN_TOOL, eos="<|im_end|>"),
    "qwen3": TemplateSpec(**_CHATML, observation=_QWEN_TOOL, thinking=True, eos="<|im_end|>"),
    # Qwen3.5's text slots are Qwen3's (its tool format and vision plugin differ; text only here).
    "qwen3_5_nothink": TemplateSpec(**_CHATML, observation=_QWEN_TOOL, eos="<|im_end|>"),
    "qwen3_5": TemplateSpec(**_CHATML, observation=_QWEN_TOOL, thinking=True, eos="<|im_end|>"),
    "chatml": TemplateSpec(
        **_CHATML, observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n", eos="<|im_end|>"
    ),
    "yi": TemplateSpec(**_CHATML),
    "smollm2": TemplateSpec(**_CHATML, default_system="You are a helpful AI assistant named SmolLM, trained by "
                            "Hugging Face."),
    "gemma": TemplateSpec(**_GEMMA, eos="<end_of_turn>"),
    # LLaMA-Factory's efficient_eos (gemma2, glm4) also appends EOS after the last reply; not here.
    "gemma2": TemplateSpec(**_GEMMA),
    "phi": TemplateSpec(
        user="<|user|>\n{content}<|end|>\n<|assistant|>\n", assistant="{content}<|end|>\n",
        system="<|system|>\n{content}<|end|>\n", eos="<|end|>",
    ),
    "phi4": TemplateSpec(
        user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
        assistant="{content}<|im_end|>", system="<|im_start|>system<|im_sep|>{content}<|im_end|>", eos="<|im_end|>",
    ),
    "deepseek": TemplateSpec(prefix="{bos}", user="User: {content}\n\nAssistant:", system="{content}\n\n"),
    "deepseek3": TemplateSpec(prefix="{bos}", user="<｜User｜>{content}<｜Assistant｜>"),
    "glm4": TemplateSpec(
        prefix="[gMASK]<sop>", user="<|user|>\n{content}<|assistant|>", assistant="\n{content}",
        system="<|system|>\n{content}", observation="<|observation|>\n{content}<|assistant|>",
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
    observation = spec.observation or spec.user
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
        "{% generation %}{{ " + _expr(spec.assistant, reply) + " }}{% endgeneration %}",
        "{% elif m['role'] == 'tool' %}{{ " + _expr(observation, "m['content']") + " }}",
        "{% endif %}{% endfor %}",
    ])


def stop_token(name: str) -> Optional[str]:
    """The end-of-turn text that LLaMA-Factory makes the tokenizer's EOS for template ``name`` (replace_eos)."""
    spec = TEMPLATES.get(name)
    return spec.eos if spec is not None else None
