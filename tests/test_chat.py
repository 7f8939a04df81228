"""``hf-llama-strategies chat``: greedy answers through the chat template, equal to plain transformers; --compare,
--prompts, the interactive loop, and bad input as one line with exit 2.

The model is a tiny Llama written as a GGUF file (``helpers.write_tiny_gguf``) and its converted folder.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llama_strategies import cli
from hf_llama_strategies.cli.chat import read_prompts, run_chat
from hf_llama_strategies.cli.gguf import gguf_model_folder

pytest.importorskip("gguf")


def _plain_answer(folder: str, prompt: str, max_new_tokens: int, system: str | None = None) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture
def two_models(tmp_path, tiny_gguf):
    """The tiny GGUF model (as ``base``) and a copy with other weights in a folder (as the fine-tuned one)."""
    base = gguf_model_folder(tiny_gguf, announce=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.model.layers[-1].parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)) * 0.5)
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    AutoTokenizer.from_pretrained(base).save_pretrained(tuned)
    return str(tuned), tiny_gguf, base


def test_one_prompt_prints_the_greedy_answer_plain_transformers_gives(two_models, capsys):
    tuned, _, _ = two_models
    assert cli.main(["chat", tuned, "--prompt", "hello", "--max_new_tokens", "8", "--system", "Be brief."]) == 0
    assert capsys.readouterr().out.strip() == _plain_answer(tuned, "hello", 8, system="Be brief.")


def test_compare_prints_the_base_answer_beside_each_prompt_of_a_file(tmp_path, two_models, capsys):
    tuned, gguf_path, base = two_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# Greetings\nhello\n\nwell well\n# Other\nyes\n", encoding="utf-8")
    results = run_chat([tuned, "--compare", gguf_path, "--prompts", str(prompts), "--max_new_tokens", "5"])
    assert [p for p, _ in results] == ["hello", "well well", "yes"]
    out = capsys.readouterr().out
    assert out.index("# Greetings") < out.index("> hello") < out.index("> well well") < out.index("# Other")
    for prompt, (answer, base_answer) in results:
        # Left-padded batches give these tiny models' greedy answers unchanged (no near-tie among their logits).
        assert answer == _plain_answer(tuned, prompt, 5)
        assert base_answer == _plain_answer(base, prompt, 5)
        assert f"  model: {answer}" in out and f"  base : {base_answer}" in out
    assert any(a != b for _, (a, b) in results)  # the two models differ, so the labels matter


def test_interactive_loop_ends_at_an_empty_line_or_end_of_input(two_models, capsys):
    tuned, _, _ = two_models
    typed = iter(["hello", "yes", ""])
    results = run_chat([tuned, "--max_new_tokens", "4"], read_line=lambda _: next(typed))
    assert [p for p, _ in results] == ["hello", "yes"]

    def then_eof(_):
        raise EOFError

    assert run_chat([tuned, "--max_new_tokens", "4"], read_line=then_eof) == []


def test_prompts_file_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("#  Head \n\n  a prompt  \nb\n", encoding="utf-8")
    assert read_prompts(str(path)) == [("header", "Head"), ("prompt", "a prompt"), ("prompt", "b")]


@pytest.mark.parametrize("argv, fragment", [
    (["MODEL", "--max_new_tokens", "0"], "--max_new_tokens='0'"),
    (["MODEL", "--max_new_tokens", "many"], "--max_new_tokens='many'"),
    (["MODEL", "--prompt", "a", "--prompts", "PROMPTS"], "not both"),
    (["MODEL", "--prompts", "nope.txt"], "--prompts='nope.txt'"),
    (["MODEL", "--prompts", "EMPTY"], "at least one prompt"),
    (["MODEL", "--temperature", "1"], "unrecognized arguments: --temperature"),
    (["./no/such/model"], "MODEL='./no/such/model'"),
    (["missing.gguf"], "MODEL='missing.gguf'"),
    (["MODEL", "--compare", "./nothing"], "--compare='./nothing'"),
    (["NO_TEMPLATE", "--prompt", "a"], "chat template"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, two_models, tiny_config_dir, capsys, argv, fragment):
    tuned, _, _ = two_models
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a header\n\n", encoding="utf-8")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n", encoding="utf-8")
    no_template = tmp_path / "no_template"
    AutoModelForCausalLM.from_pretrained(tuned).save_pretrained(no_template)
    tokenizer = AutoTokenizer.from_pretrained(tuned)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    names = {"MODEL": tuned, "PROMPTS": str(prompts), "EMPTY": str(empty), "NO_TEMPLATE": str(no_template)}
    capsys.readouterr()
    assert cli.main(["chat", *[names.get(a, a) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
