"""GGUF models: converted once into an ordinary folder equal to transformers' own GGUF load, trained from the CLI
(``gguf_file`` or a ``.gguf`` model_name_or_path), planned on the meta device, and refused with one line when bad.

Every file here is a tiny Llama written by ``helpers.write_tiny_gguf`` (F32 tensors), never the real model.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import write_yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_llama_strategies import cli
from hf_llama_strategies.cli import gguf as gguf_module
from hf_llama_strategies.cli.gguf import SOURCE_FILE, gguf_model_folder, resolve_gguf_file
from hf_llama_strategies.errors import InvalidArgumentError

pytest.importorskip("gguf")


def _sft_file(tmp_path) -> str:
    records = [{"instruction": f"Say {w}.", "output": f"{w}, {w}."} for w in ("hello", "well", "yes", "no") * 2]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def _config(tmp_path, **model_keys):
    return {
        **model_keys, "task": "sft", "train_file": _sft_file(tmp_path), "output_dir": str(tmp_path / "out"),
        "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_seq_length": 48,
        "trainable_layers": "-1:", "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
        "report_to": "none", "seed": 0, "print_plan": False,
    }


# -- the conversion -----------------------------------------------------------------------------


def test_converted_folder_is_transformers_gguf_load_as_an_ordinary_model(tiny_gguf, gguf_cache):
    folder = gguf_model_folder(tiny_gguf, announce=lambda _: None)
    assert os.path.dirname(folder) == gguf_cache
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", SOURCE_FILE} <= set(
        os.listdir(folder))
    assert "quantization_config" not in json.loads(open(os.path.join(folder, "config.json")).read())
    directory, name = os.path.split(tiny_gguf)
    theirs = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).state_dict()
    ours = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert ours.keys() == theirs.keys()
    # The same float32 tensors, written and read back: bit for bit.
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    their_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    our_tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nhello world<|im_end|>"
    assert our_tokenizer(text).input_ids == their_tokenizer(text).input_ids
    assert our_tokenizer.chat_template == their_tokenizer.chat_template
    assert (our_tokenizer.eos_token, our_tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_a_converted_file_is_not_read_again_and_a_changed_one_converts_anew(tiny_gguf, monkeypatch):
    first = gguf_model_folder(tiny_gguf, announce=lambda _: None)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "convert_gguf", no_conversion)
    monkeypatch.setattr(gguf_module, "check_gguf_file", no_conversion)
    assert gguf_model_folder(tiny_gguf, announce=lambda _: None) == first
    monkeypatch.undo()
    stat = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = gguf_model_folder(tiny_gguf, announce=lambda _: None)
    assert second != first and os.path.isfile(os.path.join(second, "model.safetensors"))


def test_a_cached_folder_cut_short_later_converts_again(tiny_gguf):
    folder = gguf_model_folder(tiny_gguf, announce=lambda _: None)
    weights = os.path.join(folder, "model.safetensors")
    whole = open(weights, "rb").read()
    with open(weights, "r+b") as fh:  # as a disk fault would leave it
        fh.truncate(len(whole) // 2)
    said = []
    assert gguf_model_folder(tiny_gguf, announce=said.append) == folder
    assert said and open(weights, "rb").read() == whole
    umask = os.umask(0)
    os.umask(umask)
    # As the user's umask makes folders, not mkdtemp's private 0700 (HF_HOME may be shared).
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask


def test_a_failed_conversion_leaves_no_folder_and_says_the_disk_is_full(tiny_gguf, gguf_cache, monkeypatch):
    def full_disk(path, out, option="gguf_file"):
        open(os.path.join(out, "model.safetensors"), "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_module, "convert_gguf", full_disk)
    with pytest.raises(gguf_module.GgufCacheError, match="No space left on device"):
        gguf_model_folder(tiny_gguf, announce=lambda _: None)
    assert os.listdir(gguf_cache) == []  # no half-written folder, not even the staging one


def test_the_keys_name_the_file_as_transformers_does(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"GGUF")
    inside = str(folder / "a.gguf")
    assert resolve_gguf_file(str(folder), "a.gguf") == inside
    assert resolve_gguf_file(inside, None) == inside
    assert resolve_gguf_file(None, inside) == inside
    assert resolve_gguf_file(inside, inside) == inside
    assert resolve_gguf_file(str(folder), None) is None
    (folder / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(InvalidArgumentError, match="gguf_file"):
        resolve_gguf_file(inside, str(folder / "b.gguf"))


# -- train and plan -----------------------------------------------------------------------------


@pytest.mark.parametrize("keys", ["gguf_file", "model_name_or_path"])
def test_train_from_gguf_saves_a_model_plain_transformers_loads_and_answers_the_same(
    tmp_path, tiny_gguf, keys, capsys
):
    directory, name = os.path.split(tiny_gguf)
    model_keys = {"model_name_or_path": directory, "gguf_file": name} if keys == "gguf_file" else {
        "model_name_or_path": tiny_gguf}
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", _config(tmp_path, **model_keys))]) == 0
    out = tmp_path / "out"
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["architectures"] == ["LlamaForCausalLM"]
    base = AutoModelForCausalLM.from_pretrained(gguf_model_folder(tiny_gguf)).state_dict()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = model.state_dict()
    # trainable_layers "-1:" of 2: layer 0 and the (tied) embeddings unchanged, layer 1 moved.
    assert all(torch.equal(trained[k], base[k]) for k in trained if ".layers.0." in k or "embed" in k)
    assert not torch.equal(trained["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert tokenizer.chat_template
    capsys.readouterr()
    assert cli.main(["chat", str(out), "--prompt", "Say yes.", "--max_new_tokens", "6"]) == 0
    answer = capsys.readouterr().out.strip()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say yes."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    greedy = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert answer == tokenizer.decode(greedy[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_plan_reads_a_gguf_config_without_converting_the_weights(tmp_path, tiny_gguf, gguf_cache, capsys):
    config = {"model_name_or_path": tiny_gguf, "trainable_layers": "-1:", "output_dir": str(tmp_path / "o")}
    assert cli.main(["plan", write_yaml(tmp_path / "p.yaml", config), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    directory, name = os.path.split(tiny_gguf)
    expected = AutoConfig.from_pretrained(directory, gguf_file=name)
    assert plan["num_parameters"] == AutoModelForCausalLM.from_config(expected).num_parameters()
    assert (plan["model_class"], plan["num_layers"]) == ("LlamaForCausalLM", 2)
    assert not os.path.exists(gguf_cache)


# -- bad input: one line naming the file, exit 2, nothing written ------------------------------


def _bad_files(tmp_path, tiny_gguf):
    data = open(tiny_gguf, "rb").read()
    truncated, text, odd = tmp_path / "cut.gguf", tmp_path / "text.gguf", tmp_path / "odd.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("model: not a gguf file\n")
    from helpers import write_tiny_gguf

    write_tiny_gguf(odd, architecture="nosuchmodel")
    return {
        "missing": (str(tmp_path / "nope.gguf"), "No such file"),
        "truncated": (str(truncated), "truncated or damaged"),
        "not gguf": (str(text), "GGUF magic"),
        "architecture": (str(odd), "nosuchmodel"),
    }


@pytest.mark.parametrize("case", ["missing", "truncated", "not gguf", "architecture"])
def test_a_bad_gguf_file_is_one_line_naming_it_and_nothing_is_written(tmp_path, tiny_gguf, gguf_cache, capsys, case):
    path, fragment = _bad_files(tmp_path, tiny_gguf)[case]
    for command in ("train", "plan"):
        config = _config(tmp_path, model_name_or_path=path)
        assert cli.main([command, write_yaml(tmp_path / "c.yaml", config)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and path in err and fragment in err, err
        assert not (tmp_path / "out").exists()
    assert not os.path.exists(gguf_cache) or not [n for n in os.listdir(gguf_cache) if not n.startswith(".")]


def test_without_the_gguf_package_the_line_names_the_install_command(tmp_path, tiny_gguf, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", _config(tmp_path, gguf_file=tiny_gguf))]) == 2
    err = capsys.readouterr().err
    assert 'pip install "hf-llama-strategies[gguf]"' in err and tiny_gguf in err
    assert not (tmp_path / "out").exists()


def test_gguf_file_beside_model_config_is_refused(tmp_path, tiny_gguf, tiny_config_dir, capsys):
    config = _config(tmp_path, model_config=tiny_config_dir, gguf_file=tiny_gguf)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    assert "exactly one" in capsys.readouterr().err
