"""What the tests share that is not a fixture: tiny datasets, run settings, comparisons, config files.

Test modules import from here (``from helpers import ...``; ``conftest.py`` puts this directory
on ``sys.path``), never from one another. Fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import types

import torch
from transformers import Trainer, TrainingArguments

from hf_llama_strategies import hookimpl
from hf_llama_strategies.cli.demo import DEMO_DIR

VOCAB = 128


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences, as causal-LM examples or labelled classification examples."""

    def __init__(self, n: int = 32, seq_len: int = 16, seed: int = 0, num_labels: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)
        self.labels = None if num_labels is None else torch.randint(0, num_labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i]
        labels = ids.clone() if self.labels is None else self.labels[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def losses(trainer) -> list[float]:
    """The training losses a Trainer logged, in order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def snapshot(model: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter's bytes (any dtype), to compare runs bit for bit."""
    return {n: p.detach().cpu().flatten().view(torch.uint8).numpy().tobytes() for n, p in model.named_parameters()}


# -- comparing runs whose frozen prefix ran at other batch shapes ----------------------------
#
# Bit for bit only where the shapes are the same by construction. The frozen-prefix cache's
# pre-pass runs the prefix on rows batched and padded otherwise than in training; CPU matrix
# kernels choose their blocking (the order of a dot product's sums) by shape, so the states it
# serves differ from the uncached ones by fp32 rounding: about sqrt(K) * 2**-24 relative for a
# K-term product, K <= 128 in the tiny models, so ~1e-6 after a few layers. Losses inherit that:
# LOSS_RTOL = 1e-5 (measured: 2e-7). Trained weights: Adam divides each gradient element by its
# running RMS, so an element whose gradient is within rounding of zero can take a visibly
# different step (up to 2 * lr per step) while every other element differs at rounding level.
# Hence, per tensor, at most OFF_SHARE of the elements may differ from the reference by more than
# STEP_SHARE of the tensor's largest update. Measured on an AMD EPYC with 1 and 2 threads and
# pre-pass batches of 2, 4 and 8 rows: none does (the largest difference is 0.4% of the largest
# update, 1-6 elements per tensor above 1e-7). A row served from another sample, or misaligned
# padding, moves most elements by a whole step and fails.
LOSS_RTOL = 1e-5
STEP_SHARE = 1e-2
OFF_SHARE = 1e-3


def assert_trained_alike(trained: torch.nn.Module, reference: torch.nn.Module, initial: torch.nn.Module) -> None:
    """``trained`` took the steps ``reference`` took from ``initial``, up to fp32 rounding (see above)."""
    moved = 0
    for (name, a), b, c in zip(trained.named_parameters(), reference.parameters(), initial.parameters()):
        if not b.requires_grad:
            continue
        update = (b.detach() - c.detach()).abs()
        moved += bool(update.max() > 0)
        off = (a.detach() - b.detach()).abs() > STEP_SHARE * update.max()
        assert off.float().mean().item() <= OFF_SHARE, (
            f"{name}: {int(off.sum())} of {off.numel()} elements differ by more than {STEP_SHARE:g} of the largest "
            "update"
        )
    assert moved, "nothing trained"


def described(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[tuple]:
    """(name, lr, weight_decay, parameter names) of every optimizer group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (g.get("name"), g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in optimizer.param_groups
    ]


def files(directory) -> list[str]:
    """Every file under ``directory``, as sorted relative paths."""
    return sorted(os.path.relpath(os.path.join(root, f), directory) for root, _, fs in os.walk(directory) for f in fs)


def callback_types(trainer: Trainer) -> list[type]:
    """The types of a Trainer's callbacks, in order."""
    return [type(c) for c in trainer.callback_handler.callbacks]


class ProbeIs:
    """A plugin that describes ``probe``'s hardware (the ``hfls_hardware_probe`` hook), for machines we lack."""

    def __init__(self, probe) -> None:
        self.probe = probe

    @hookimpl
    def hfls_hardware_probe(self, training_args):
        return self.probe


def strategy(**options):
    """StrategyArguments that print no plan table (keeps test output short)."""
    from hf_llama_strategies import StrategyArguments

    return StrategyArguments(print_plan=False, **options)


def load_benchmark(name: str) -> types.ModuleType:
    """``benchmarks/<name>.py`` as a fresh module (the benchmarks are scripts, not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_training_args(output_dir, **overrides) -> TrainingArguments:
    """Deterministic CPU TrainingArguments for short runs."""
    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        seed=0,
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


# -- the command line: a config for a tiny CPU run, written as YAML ---------------------------


def base_config(tiny_config_dir, output_dir, **extra):
    """A CLI config training the ``tiny_config_dir`` model with the demo tokenizer, 3 steps on CPU."""
    config = {
        "model_config": tiny_config_dir, "tokenizer_name_or_path": DEMO_DIR, "output_dir": str(output_dir),
        "max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "logging_steps": 1,
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "max_seq_length": 24, "seed": 0,
    }
    config.update(extra)
    return config


def write_yaml(path, config):
    """Write ``config`` to ``path`` as YAML; return the path as a string."""
    import yaml

    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


# -- GGUF files (llama.cpp's format), written from a tiny Llama ---------------------------------

#: ChatML, as SmolLM2's GGUF file ships it (without its default system prompt).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GGUF_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_MERGES = ["l l", "\u0120 w", "h e"]


def _byte_level_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order (a byte-level BPE's base vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def _llama_cpp_permute(weight, heads: int):
    """llama.cpp's layout of a q/k projection (rotary halves interleaved), which transformers undoes on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(path, *, tie: bool = True, layers: int = 2, seed: int = 0, architecture: str = "llama"):
    """Write a 2-layer Llama (hidden 32, byte-level BPE, ChatML template) as an F32 GGUF file; return the model.

    The tensors and keys are those llama.cpp's converter writes for a Llama; transformers reads the
    file back to the same weights, bit for bit.
    """
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = GGUF_SPECIAL + _byte_level_chars() + ["".join(m.split()) for m in GGUF_MERGES]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(8)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(GGUF_SPECIAL) + [1] * (len(tokens) - len(GGUF_SPECIAL)))
    writer.add_token_merges(GGUF_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML)
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for name, value in _gguf_tensors(weights, layers, tie).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _gguf_tensors(weights: dict, layers: int, tie: bool) -> dict:
    renames = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
    out = {"token_embd.weight": weights["model.embed_tokens.weight"]}
    for i in range(layers):
        ours = f"model.layers.{i}."
        out[f"blk.{i}.attn_q.weight"] = _llama_cpp_permute(weights[ours + "self_attn.q_proj.weight"], 4)
        out[f"blk.{i}.attn_k.weight"] = _llama_cpp_permute(weights[ours + "self_attn.k_proj.weight"], 2)
        for theirs, name in renames.items():
            out[f"blk.{i}.{theirs}.weight"] = weights[ours + name + ".weight"]
    out["output_norm.weight"] = weights["model.norm.weight"]
    if not tie:
        out["output.weight"] = weights["lm_head.weight"]
    return out


# -- TRL (an optional extra: imported only when a test asks for it) ---------------------------


@functools.cache
def _strategy_sft_trainer() -> type:
    from trl import SFTTrainer

    from hf_llama_strategies import StrategyTrainerMixin

    class StrategySFTTrainer(StrategyTrainerMixin, SFTTrainer):
        pass

    return StrategySFTTrainer


def __getattr__(name: str):
    # ``from helpers import StrategySFTTrainer`` imports TRL; nothing else here does.
    if name == "StrategySFTTrainer":
        return _strategy_sft_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- runs of the command line that must lose nothing (test_safety.py, test_faults.py) ---------


def lm_run_config(tiny_config_dir, lm_file, out, **extra):
    """A causal-LM CLI run that saves a checkpoint every 2 of its 6 steps (fp32, CPU, deterministic)."""
    values = dict(
        train_file=lm_file, max_steps=6, save_strategy="steps", save_steps=2, precision="fp32", report_to="none",
        per_device_train_batch_size=2, learning_rate=1e-3, print_plan=False,
    )
    values.update(extra)
    return base_config(tiny_config_dir, out, **values)


def tree(path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (empty dict when absent)."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def weights(path) -> dict[str, torch.Tensor]:
    """The tensors of ``path/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b) -> None:
    """The models saved in folders ``a`` and ``b`` are bit-identical."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def one_line_error(capsys) -> str:
    """The one ``hf-llama-strategies: error: ...`` line a refused CLI run printed (and nothing else on stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-llama-strategies: error: "), err
    assert "Traceback" not in err
    return lines[0]


def copy_run(reference, dest, keep=("checkpoint-2", "checkpoint-4")):
    """output_dir as a run killed after saving ``keep`` would have left it (``reference``: the conftest fixture)."""
    dest.mkdir()
    for name in keep:
        shutil.copytree(reference["out"] / name, dest / name)
    return dest
