"""Tool descriptions and function calls as text, in the formats LLaMA-Factory's templates use.

A record with tools (a JSON list of function schemas) gets a tool prompt appended to its
system prompt, and each function-call turn (``{"name": ..., "arguments": {...}}``, or a list
of them) is written as the model is to emit it. The formats are those of LLaMA-Factory 0.9.5
(``tool_format`` of its templates): ``default`` (``Action:`` / ``Action Input:``), ``llama3``,
``mistral``, ``qwen``, ``qwen3_5`` and ``glm4``. The wording is the models' own prompt text,
which is why it is kept here word for word.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Callable, NamedTuple


class FunctionCall(NamedTuple):
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _unwrapped(tool: dict) -> dict:
    """An OpenAI-style ``{"type": "function", "function": {...}}`` entry's function, else the entry."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _wrapped(tool: dict) -> dict:
    """The entry as OpenAI's ``{"type": "function", "function": {...}}``."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


# -- default: a plain-text list of the tools, calls as ``Action:`` / ``Action Input:`` ---------

_DEFAULT_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n```\n'
)


def _default_param(name: str, param: dict, required: list) -> str:
    enum = f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
    items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
    flag = ", required" if name in required else ""
    return f"  - {name} ({param.get('type', '')}{flag}): {param.get('description', '')}{enum}{items}\n"


def _default_tools(tools: list[dict]) -> str:
    text, names = "", []
    for tool in map(_unwrapped, tools):
        parameters = tool["parameters"]
        args = "".join(_default_param(n, p, parameters.get("required", []))
                       for n, p in parameters["properties"].items())
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
        names.append(tool["name"])
    return _DEFAULT_PROMPT.format(tool_text=text, tool_names=", ".join(names))


def _default_calls(calls: list[FunctionCall]) -> str:
    return "\n".join(f"Action: {c.name}\nAction Input: {c.arguments}" for c in calls)


# -- llama3: JSON schemas after a dated preamble; a call is {"name", "parameters"} -----------------

_LLAMA3_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function "
    'call. Respond in the format {{"name": function name, "parameters": dictionary of argument name and its '
    'value}}. Do not use variables.\n\n{tool_text}'
)


def today() -> str:
    """Today's date as LLaMA-Factory writes it into the llama3 tool prompt (``07 Dec 2025``)."""
    return datetime.datetime.now().strftime("%d %b %Y")


def _llama3_tools(tools: list[dict]) -> str:
    text = "".join(_dumps(_wrapped(tool), indent=4) + "\n\n" for tool in tools)
    return _LLAMA3_PROMPT.format(date=today(), tool_text=text)


def _llama3_calls(calls: list[FunctionCall]) -> str:
    objects = [{"name": c.name, "parameters": json.loads(c.arguments)} for c in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


# -- mistral: [AVAILABLE_TOOLS] JSON; calls as a JSON list ----------------------------------------


def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrapped(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _mistral_calls(calls: list[FunctionCall]) -> str:
    return _dumps([{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls])


# -- qwen (2.5 / 3): <tools> JSON lines; calls inside <tool_call> tags -----------------------------

_QWEN_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


def _qwen_tools(tools: list[dict]) -> str:
    return _QWEN_PROMPT.format(tool_text="".join("\n" + _dumps(_wrapped(tool)) for tool in tools))


def _qwen_calls(calls: list[FunctionCall]) -> str:
    texts = [_dumps({"name": c.name, "arguments": json.loads(c.arguments)}) for c in calls]
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


# -- qwen3_5: <tools> JSON lines; calls as <function=...><parameter=...> blocks ----------------------

_QWEN3_5_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}"
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: "
    "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language "
    "BEFORE the function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)


def _qwen3_5_tools(tools: list[dict]) -> str:
    def entry(tool: dict) -> dict:
        return tool.get("function", tool) if tool.get("type") == "function" else tool

    return _QWEN3_5_PROMPT.format(tool_text="".join("\n" + _dumps(entry(tool)) for tool in tools))


def _qwen3_5_calls(calls: list[FunctionCall]) -> str:
    texts = []
    for call in calls:
        text = f"<tool_call>\n<function={call.name}>"
        for key, value in json.loads(call.arguments).items():
            text += f"\n<parameter={key}>\n{value if isinstance(value, str) else _dumps(value)}\n</parameter>"
        texts.append(text + "\n</function>\n</tool_call>")
    return "\n".join(texts)


# -- glm4: an indented schema per tool, in Chinese; one call per turn ------------------------------

_GLM4_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)


_GLM4_ARGUMENTS = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _glm4_tools(tools: list[dict]) -> str:
    tools = [_unwrapped(tool) for tool in tools]
    text = "".join(f"\n\n## {tool['name']}\n\n{_dumps(tool, indent=4)}\n{_GLM4_ARGUMENTS}" for tool in tools)
    return _GLM4_PROMPT.format(tool_text=text)


def _glm4_calls(calls: list[FunctionCall]) -> str:
    if len(calls) > 1:
        raise ValueError("the glm4 template has no parallel function calls (one call per turn)")
    return f"{calls[0].name}\n{calls[0].arguments}"


#: tool format -> (tool prompt from the tool list, call text from the calls)
TOOL_FORMATS: dict[str, tuple[Callable[[list[dict]], str], Callable[[list[FunctionCall]], str]]] = {
    "default": (_default_tools, _default_calls),
    "llama3": (_llama3_tools, _llama3_calls),
    "mistral": (_mistral_tools, _mistral_calls),
    "qwen": (_qwen_tools, _qwen_calls),
    "qwen3_5": (_qwen3_5_tools, _qwen3_5_calls),
    "glm4": (_glm4_tools, _glm4_calls),
}


def tool_prompt(tool_format: str, tools_json: str) -> str:
    """The system-prompt text describing ``tools_json`` (a JSON list); ``""`` for an empty list.

    Raises ``ValueError`` (``json.JSONDecodeError``) for text that is not JSON, ``KeyError`` /
    ``TypeError`` for a tool without the fields its format needs.
    """
    tools = json.loads(tools_json)
    return TOOL_FORMATS[tool_format][0](tools) if len(tools) != 0 else ""


def parse_calls(content: str) -> list[FunctionCall]:
    """The calls of a function-call turn: a JSON object ``{"name", "arguments"}`` or a list of them."""
    calls = json.loads(content)
    calls = calls if isinstance(calls, list) else [calls]
    return [FunctionCall(call["name"], _dumps(call["arguments"])) for call in calls]


def calls_text(tool_format: str, calls: list[FunctionCall]) -> str:
    """The calls written as the model is to emit them in ``tool_format``."""
    return TOOL_FORMATS[tool_format][1](calls)
