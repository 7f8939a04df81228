"""``hf-llama-strategies chat MODEL``: greedy answers through the model's chat template, to try what you trained.

``--prompt TEXT`` answers once; ``--prompts FILE`` answers every line of a file; with neither, an
interactive loop reads prompts until an empty line or end of input. ``--compare BASE`` puts a
second model's answer (the model before fine-tuning) beside each one. MODEL and BASE are model
folders, GGUF files (converted once, see :mod:`.gguf`) or Hub ids.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

from ..core.options import check_positive_int
from ..errors import CliError, InvalidArgumentError
from .gguf import gguf_model_folder, is_gguf_name

#: Prompts of ``--prompts`` answered together (left-padded): greedy answers equal one-at-a-time
#: generation up to float rounding (the padded batch runs other kernel shapes).
BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ChatOptions:
    """What ``chat`` was asked: the model, the prompts, the system prompt, the length, the model to compare."""

    model: str
    prompt: Optional[str] = None
    prompts: Optional[str] = None
    system: Optional[str] = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    compare: Optional[str] = None


@dataclass
class ChatModel:
    """A loaded model with its tokenizer, and the name it is shown under."""

    label: str
    source: str
    model: Any
    tokenizer: Any


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"chat: {message}")


def parse_chat_options(argv: Sequence[str]) -> ChatOptions:
    """``chat``'s command line, checked (one line naming the option on bad input)."""
    parser = _Parser(prog="hf-llama-strategies chat", allow_abbrev=False, add_help=False)
    parser.add_argument("model")
    parser.add_argument("--prompt")
    parser.add_argument("--prompts")
    parser.add_argument("--system")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", default=str(DEFAULT_MAX_NEW_TOKENS))
    parser.add_argument("--compare")
    args = parser.parse_args(list(argv))
    if args.prompt is not None and args.prompts is not None:
        raise CliError("chat: give --prompt TEXT or --prompts FILE, not both.")
    if args.prompt is not None and not args.prompt.strip():
        raise InvalidArgumentError("--prompt", args.prompt, "a non-empty prompt")
    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise InvalidArgumentError("--prompts", args.prompts, "a text file of prompts, one a line", "No such file.")
    tokens = check_positive_int("--max_new_tokens", args.max_new_tokens, from_text=True)
    return ChatOptions(model=args.model, prompt=args.prompt, prompts=args.prompts, system=args.system,
                       max_new_tokens=tokens, compare=args.compare)


def read_prompts(path: str) -> list[tuple[str, str]]:
    """The lines of a prompts file as ``("prompt", text)``; ``# text`` lines as ``("header", text)``, shown as is.

    Blank lines are skipped. Raises InvalidArgumentError (naming the file) when it is not UTF-8
    text or holds no prompt.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError("--prompts", path, "a UTF-8 text file", f"Byte {exc.start} is not UTF-8.") from None
    except OSError as exc:
        raise InvalidArgumentError("--prompts", path, "a readable text file", exc.strerror) from None
    items = [("header", s[1:].strip()) if s.startswith("#") else ("prompt", s) for s in map(str.strip, lines) if s]
    if not any(kind == "prompt" for kind, _ in items):
        raise InvalidArgumentError("--prompts", path, "a text file with at least one prompt (one a line)")
    return items


def _looks_local(source: str) -> bool:
    """A path (``./x``, ``/x``, ``a/b/c``) rather than a Hub id (``name``, ``owner/name``)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def load_chat_model(source: str, option: str, label: str) -> ChatModel:
    """A model folder, a GGUF file (its cached conversion) or a Hub id, with its tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_gguf_name(source) or os.path.isfile(source):
        if not os.path.isfile(source):
            raise InvalidArgumentError(option, source, "a model folder, a .gguf file or a Hub id", "No such file.")
        folder = gguf_model_folder(source, option=option, announce=lambda m: print(m, file=sys.stderr))
    elif os.path.isdir(source):
        folder = source
    elif _looks_local(source):
        raise InvalidArgumentError(option, source, "a model folder, a .gguf file or a Hub id", "No such path.")
    else:
        folder = source
    try:
        with _no_progress_bars():  # the answers are the output; a weights bar per model would bury them
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidArgumentError(option, source, "a causal language model: a folder, a .gguf file or a Hub id",
                                   first) from None
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(
            option, source, "a model whose tokenizer has a chat template",
            "Train it with task: sft (its chat_template is saved with the tokenizer), or add one to its "
            "tokenizer_config.json / chat_template.jinja.",
        )
    model.eval()
    return ChatModel(label=label, source=source, model=model, tokenizer=tokenizer)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def _messages(prompt: str, system: Optional[str]) -> list[dict[str, str]]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": prompt}]


class Reply(NamedTuple):
    """One generated answer, and whether it ended (a stop token) within ``max_new_tokens``."""

    text: str
    finished: bool


def generate_answers(
    chat: ChatModel, prompts: Sequence[str], system: Optional[str] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = BATCH_SIZE,
) -> list[str]:
    """Greedy answers to ``prompts``, each a fresh conversation (the system prompt, then the prompt)."""
    return [r.text for r in generate_replies(chat, prompts, system, max_new_tokens, batch_size)]


def generate_replies(
    chat: ChatModel, prompts: Sequence[str], system: Optional[str] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = BATCH_SIZE,
) -> list[Reply]:
    """:func:`generate_answers`, each answer with whether it finished."""
    replies: list[Reply] = []
    for start in range(0, len(prompts), batch_size):
        replies.extend(_answer_batch(chat, prompts[start:start + batch_size], system, max_new_tokens))
    return replies


def _answer_batch(chat: ChatModel, prompts: Sequence[str], system: Optional[str], max_new_tokens: int) -> list[Reply]:
    import torch

    tokenizer, model = chat.tokenizer, chat.model
    texts = [
        tokenizer.apply_chat_template(_messages(p, system), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        # The template holds the special tokens (BOS where the model wants one) already.
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    config = _greedy(model, tokenizer, max_new_tokens)
    with torch.inference_mode():
        out = model.generate(**batch.to(model.device), generation_config=config)
    stops = set(config.eos_token_id or [])
    return [
        Reply(tokenizer.decode(row, skip_special_tokens=True).strip(), any(int(t) in stops for t in row))
        for row in out[:, batch["input_ids"].shape[1]:]
    ]


def _greedy(model: Any, tokenizer: Any, max_new_tokens: int) -> Any:
    """The model's generation settings (its stop tokens), made greedy: no sampling setting left to warn about."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, min_p=None,
                  max_new_tokens=max_new_tokens, max_length=None)
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stops = [t for t in stops if t is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)  # the end of a turn, as the chat template ends replies
    config.eos_token_id = stops or None
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _show(answer: str, label: Optional[str], width: int) -> str:
    lines = answer.splitlines() or [""]
    if label is None:
        return "\n".join(lines)
    pad = " " * (width + 4)
    return f"  {label.ljust(width)}: " + f"\n{pad}".join(lines)


def _print_answers(prompt: str, answers: Sequence[tuple[Optional[str], str]], echo: bool, out: Any) -> None:
    width = max((len(label or "") for label, _ in answers), default=0)
    if echo:
        print(f"> {prompt}", file=out)
    for label, answer in answers:
        print(_show(answer, label, width), file=out)
    if echo:
        print(file=out)


def run_chat(
    argv: Sequence[str], read_line: Callable[[str], str] = input, out: Any = None,
) -> list[tuple[str, list[str]]]:
    """``chat``: load the model(s), answer the prompts; returns ``[(prompt, [answer, base answer]), ...]``."""
    out = out or sys.stdout
    options = parse_chat_options(argv)
    items = read_prompts(options.prompts) if options.prompts else None
    models = [load_chat_model(options.model, "MODEL", "model")]
    if options.compare:
        models.append(load_chat_model(options.compare, "--compare", "base"))
        print(f"model: {options.model}\nbase:  {options.compare}\n", file=out)
    if options.prompt is not None:
        return [_answer_and_print(models, options, [options.prompt], echo=bool(options.compare), out=out)[0]]
    if items is not None:
        return _answer_file(models, options, items, out)
    if read_line is input and sys.stdin.isatty():
        print("type a prompt; an empty line or Ctrl-D ends", file=sys.stderr)
    results = []
    for prompt in _interactive(read_line):
        results.extend(_answer_and_print(models, options, [prompt], echo=False, out=out))
        print(file=out)
    return results


def _answer_file(models: list[ChatModel], options: ChatOptions, items: list[tuple[str, str]], out: Any) -> list:
    """Answer a prompts file a batch at a time, printing each batch (headings in place) as it is done."""
    results: list[tuple[str, list[str]]] = []
    pending: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        pending.append(item)
        prompts = [text for kind, text in pending if kind == "prompt"]
        if len(prompts) == BATCH_SIZE or index == len(items) - 1:
            answers = [generate_answers(m, prompts, options.system, options.max_new_tokens) for m in models]
            done = iter(range(len(prompts)))
            for kind, text in pending:
                if kind == "header":
                    print(f"# {text}", file=out)
                    continue
                i = next(done)
                pairs = [(m.label if len(models) > 1 else None, a[i]) for m, a in zip(models, answers)]
                _print_answers(text, pairs, echo=True, out=out)
                results.append((text, [a[i] for a in answers]))
            out.flush()
            pending = []
    return results


def _answer_and_print(models: list[ChatModel], options: ChatOptions, prompts: list[str], echo: bool,
                      out: Any) -> list[tuple[str, list[str]]]:
    answers = [generate_answers(m, prompts, options.system, options.max_new_tokens) for m in models]
    results = []
    for i, prompt in enumerate(prompts):
        pairs = [(m.label if len(models) > 1 else None, a[i]) for m, a in zip(models, answers)]
        _print_answers(prompt, pairs, echo=echo, out=out)
        results.append((prompt, [a[i] for a in answers]))
    return results


def _interactive(read_line: Callable[[str], str]) -> Iterator[str]:
    """Prompts typed at ``> ``, until an empty line or end of input (Ctrl-D)."""
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line
