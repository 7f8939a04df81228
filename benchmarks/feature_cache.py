#!/usr/bin/env python
"""The frozen-prefix cache against the same training without it, and against LLaMA-Factory's freeze mode.

Every figure is a ratio of whole-run times (``trainer.train()``, pre-pass and disk reads included)
measured side by side in one process: each round trains every variant once, in a shuffled order,
on the speed benchmark's model (``benchmarks/speed_memory.py``: 8 layers, hidden 256, vocab 4096,
batch 8 x 128) for 3 epochs over the same data; the median over rounds is reported with its spread.

Variants:

* ``head_off`` / ``head_memory``: LlamaForSequenceClassification on that backbone, only the
  classification head trains (the seed article's sentiment example);
* ``head_disk_warm``: the same with ``frozen_prefix_cache: disk`` and another ``head_lr``, reading
  a cache a previous run of the round wrote (``head_disk_cold``, timed too): an LR sweep's next run;
* ``last2_off`` / ``last2_memory``: LlamaForCausalLM, the last 2 of 8 layers train (LLaMA-Factory's
  ``finetuning_type: freeze``, ``freeze_trainable_layers: 2``: the layers only);
* ``llamafactory`` (with ``--llamafactory PATH``): LLaMA-Factory's ``llamafactory-cli train`` in its
  own virtual environment, ``stage: pt``, ``finetuning_type: freeze``, ``freeze_trainable_layers: 2``,
  on the same model (saved weights), the same number of 128-token blocks, batch and epochs; its
  ``train_runtime`` against ours (the same measure, from the Trainer's metrics).

Usage::

    python benchmarks/feature_cache.py                      # 3 rounds
    python benchmarks/feature_cache.py --llamafactory /work/venvs/lf/bin/llamafactory-cli
    python benchmarks/feature_cache.py --smoke              # a tiny model, 1 round: checks that it runs

Writes ``benchmarks/results/feature_cache.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _speed_benchmark() -> Any:
    """``benchmarks/speed_memory.py`` as a module: its model shape, data and statistics."""
    name = "speed_memory"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "speed_memory.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


speed = _speed_benchmark()

import transformers  # noqa: E402
from _common import RandomTokens, load_average, write_report  # noqa: E402
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback, TrainerCallback  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # noqa: E402
from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "feature_cache.json")
DEMO_TOKENIZER = os.path.join(os.path.dirname(HERE), "hf_llama_strategies", "assets", "demo")
EPOCHS = 3
HEAD_ONLY = dict(trainable_layers="none", train_norm=False)
LAST_TWO = dict(trainable_layers="-2:", train_norm=False, train_head=False)


@dataclass(frozen=True)
class Variant:
    name: str
    task: str  # "seq_cls" or "causal_lm"
    mode: str  # frozen_prefix_cache
    head_lr: Optional[float] = None


VARIANTS = [
    Variant("head_off", "seq_cls", "off"),
    Variant("head_memory", "seq_cls", "memory"),
    Variant("last2_off", "causal_lm", "off"),
    Variant("last2_memory", "causal_lm", "memory"),
]
# Run in this order inside a round (the warm run reads what the cold one wrote).
DISK_PAIR = [Variant("head_disk_cold", "seq_cls", "disk", 1e-3), Variant("head_disk_warm", "seq_cls", "disk", 3e-3)]
COMPARISONS = [
    ("head only, memory cache / uncached", "head_memory", "head_off", 0.40),
    ("last 2 of 8 layers, memory cache / uncached", "last2_memory", "last2_off", 0.70),
    ("head only, warm disk cache (another head_lr) / uncached", "head_disk_warm", "head_off", 0.05),
    ("head only, cold disk cache / uncached", "head_disk_cold", "head_off", None),
    ("last 2 of 8 layers, memory cache / LLaMA-Factory 0.9.5 freeze", "last2_memory", "llamafactory", None),
    ("last 2 of 8 layers, uncached / LLaMA-Factory 0.9.5 freeze", "last2_off", "llamafactory", None),
]


def flop_floors(shape: Any) -> dict[str, float]:
    """Matmul FLOPs of a whole cached run relative to the uncached one, from the model's shapes.

    Per token, in multiply-accumulates, as :func:`speed_memory.flop_floor` counts them. Uncached,
    every epoch runs the forward of all layers and the head, and backward where something trains
    (the head's weight gradient; for the last 2 layers, their weight and input gradients and the
    head's input gradient). Cached, every epoch runs only what lies above the boundary, and the
    pre-pass runs the prefix once. The warm disk run computes no prefix at all.
    """
    h, i, hd = shape.hidden, shape.intermediate, shape.hidden // shape.heads
    q, kv, o = h * shape.heads * hd, 2 * h * shape.kv_heads * hd, shape.heads * hd * h
    layer = q + kv + o + 3 * h * i + 2 * shape.seq * shape.heads * hd
    lm_head, score = h * shape.vocab, h * 2
    # Head only (sequence classification): forward everything, backward the score's weight only.
    head_off = EPOCHS * (shape.layers * layer + 2 * score)
    head_on = EPOCHS * 2 * score + shape.layers * layer
    # Last 2 layers (causal LM): backward = 2 layers' weight and input gradients (but the lowest
    # one's q/k/v input gradient) and the head's input gradient.
    step = shape.layers * layer + lm_head + lm_head + 2 * 2 * layer - (q + kv)
    prefix = (shape.layers - 2) * layer
    last2_off = EPOCHS * step
    last2_on = EPOCHS * (step - prefix) + prefix
    return {"head_memory/head_off": head_on / head_off, "head_disk_cold/head_off": head_on / head_off,
            "head_disk_warm/head_off": EPOCHS * 2 * score / head_off, "last2_memory/last2_off": last2_on / last2_off}


class LoopTimer(TrainerCallback):
    """Time from ``on_train_begin`` (before the cache's own: fingerprint, disk reads) to ``on_train_end``.

    What the Trainer does before (dataloader, optimizer, accelerate's ``gc.collect``) is the same
    for every variant and left out of this measure; ``wall_s`` keeps it.
    """

    def __init__(self) -> None:
        self.begin = self.end = self.cpu_begin = self.cpu_end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


class Labelled(torch.utils.data.Dataset):
    """The speed benchmark's random tokens with a binary label each (sequence classification)."""

    def __init__(self, tokens: Any) -> None:
        self.tokens = tokens
        self.labels = torch.randint(0, 2, (len(tokens),), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = dict(self.tokens[i])
        item["labels"] = self.labels[i]
        return item


def build_model(task: str, shape: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    config = shape.config()
    if task == "seq_cls":
        config.num_labels = 2
        return LlamaForSequenceClassification(config)
    return LlamaForCausalLM(config)


@dataclass
class RunResult:
    variant: str
    round: int
    wall_s: float
    train_runtime_s: float
    loop_s: Optional[float] = None
    steps: Optional[int] = None
    loop_cpu_s: Optional[float] = None  # process CPU time of the loop: what a busy machine disturbs least
    cache_bytes: Optional[int] = None
    prepass_s: Optional[float] = None
    prepass_samples: Optional[int] = None
    hits: Optional[int] = None
    misses: Optional[int] = None
    loaded_entries: Optional[int] = None


def run_variant(variant: Variant, shape: Any, samples: int, round_index: int, cache_dir: str) -> RunResult:
    model = build_model(variant.task, shape).train()
    tokens = RandomTokens(samples, shape.seq, shape.vocab)
    data = Labelled(tokens) if variant.task == "seq_cls" else tokens
    options = HEAD_ONLY if variant.task == "seq_cls" else LAST_TWO
    extra: dict[str, Any] = {}
    if variant.mode == "disk":
        extra["frozen_prefix_cache_dir"] = cache_dir
    if variant.head_lr is not None:
        extra["head_lr"] = variant.head_lr
    strategy = StrategyArguments(print_plan=False, frozen_prefix_cache=variant.mode, **options, **extra)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, use_cpu=True, report_to="none", seed=0, num_train_epochs=EPOCHS,
            per_device_train_batch_size=shape.batch, per_device_eval_batch_size=shape.batch, learning_rate=1e-4,
            logging_steps=10_000, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = StrategyTrainer(model=model, args=args, train_dataset=data, strategy_args=strategy)
        trainer.remove_callback(PrinterCallback)
        timer = LoopTimer()
        trainer.callback_handler.callbacks.insert(0, timer)  # before the cache's on_train_begin
        gc.collect()
        started = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - started
    cache = get_frozen_prefix_cache(model)
    result = RunResult(variant.name, round_index, wall, float(output.metrics["train_runtime"]), timer.end - timer.begin,
                       output.global_step, timer.cpu_end - timer.cpu_begin)
    if cache is not None:
        result.cache_bytes, result.prepass_s, result.prepass_samples = cache.nbytes, cache.prepass_seconds, \
            cache.prepass_samples
        result.hits, result.misses, result.loaded_entries = cache.hits, cache.misses, cache.loaded_entries
    del trainer, model
    gc.collect()
    return result


# -- LLaMA-Factory ------------------------------------------------------------------------------


def prepare_llamafactory(workdir: str, shape: Any, samples: int) -> dict[str, str]:
    """Save the benchmark's causal LM, a tokenizer and a text dataset of ``samples`` 128-token blocks."""
    model_dir = os.path.join(workdir, "model")
    build_model("causal_lm", shape).save_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 1] or ["a", "b"]
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir)
    # pt stage: texts (each with an EOS) are concatenated and cut into cutoff_len blocks: one text of
    # about cutoff_len - 1 tokens per block gives about as many blocks, and steps, as our runs.
    texts = []
    for _ in range(samples):
        picked: list[str] = []
        while len(tokenizer(" ".join(picked), add_special_tokens=False)["input_ids"]) < shape.seq - 1:
            picked.append(rng.choice(words))
        texts.append({"text": " ".join(picked)})
    with open(os.path.join(data_dir, "blocks.json"), "w", encoding="utf-8") as fh:
        json.dump(texts, fh)
    with open(os.path.join(data_dir, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"blocks": {"file_name": "blocks.json", "columns": {"prompt": "text"}}}, fh)
    return {"model": model_dir, "data": data_dir}


def run_llamafactory(cli: str, paths: dict[str, str], shape: Any, samples: int, threads: int,
                     round_index: int) -> RunResult:
    with tempfile.TemporaryDirectory() as out:
        config = {
            "model_name_or_path": paths["model"], "trust_remote_code": False,
            "stage": "pt", "do_train": True, "finetuning_type": "freeze",
            "freeze_trainable_layers": 2, "freeze_trainable_modules": "all",
            "dataset": "blocks", "dataset_dir": paths["data"], "cutoff_len": shape.seq, "max_samples": samples,
            "preprocessing_num_workers": 1, "overwrite_cache": True, "template": "default",
            "output_dir": out, "logging_steps": 10_000, "save_strategy": "no", "report_to": "none",
            "per_device_train_batch_size": shape.batch, "learning_rate": 1e-4, "num_train_epochs": EPOCHS,
            "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True, "bf16": False, "fp16": False,
            "use_cpu": True, "plot_loss": False,
        }
        import yaml

        # YAML: LLaMA-Factory 0.9.5 fails reading a JSON config (json.load of a Path).
        path = os.path.join(out, "lf.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
                   HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1")
        env.pop("PYTHONPATH", None)
        started = time.perf_counter()
        proc = subprocess.run([cli, "train", path], env=env, capture_output=True, text=True, cwd=out)
        wall = time.perf_counter() - started
        results = os.path.join(out, "train_results.json")
        if proc.returncode != 0 or not os.path.exists(results):
            raise RuntimeError(f"llamafactory-cli failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        with open(results, encoding="utf-8") as fh:
            metrics = json.load(fh)
        with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
            steps = int(json.load(fh)["global_step"])
    return RunResult("llamafactory", round_index, wall, float(metrics["train_runtime"]), steps=steps)


# -- report -----------------------------------------------------------------------------------


def summarise(results: list[RunResult], shape: Any) -> dict[str, Any]:
    floors = flop_floors(shape)
    by_round: dict[int, dict[str, RunResult]] = {}
    for r in results:
        by_round.setdefault(r.round, {})[r.variant] = r
    comparisons = []
    for label, num, den, target in COMPARISONS:
        pairs = [(rows[num], rows[den]) for rows in by_round.values() if num in rows and den in rows]
        if not pairs:
            continue
        # Against LLaMA-Factory: the Trainer's train_runtime per optimizer step on both sides (its process
        # start is not ours, and its packing may make a block more or fewer).
        key = "train_runtime_s" if "llamafactory" in (num, den) else "loop_s"
        if key == "train_runtime_s":
            ratios = [(a.train_runtime_s / a.steps) / (b.train_runtime_s / b.steps) for a, b in pairs]
        else:
            ratios = [getattr(a, key) / getattr(b, key) for a, b in pairs]
        stats = speed.spread(ratios)
        walls = None if key == "train_runtime_s" else speed.spread([a.wall_s / b.wall_s for a, b in pairs])
        cpu = None if key == "train_runtime_s" else speed.spread([a.loop_cpu_s / b.loop_cpu_s for a, b in pairs])
        comparisons.append({"label": label, "numerator": num, "denominator": den, "measure": key, "target": target,
                            "ratio": stats, "ratios": ratios, "wall_ratio": walls, "cpu_ratio": cpu,
                            "flop_floor": floors.get(f"{num}/{den}"),
                            "meets_target": None if target is None else stats["median"] <= target})
    variants = {}
    for name in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == name]
        first = runs[0]
        variants[name] = {
            "wall_s": speed.spread([r.wall_s for r in runs]),
            "loop_s": None if first.loop_s is None else speed.spread([r.loop_s for r in runs]),
            "train_runtime_s": speed.spread([r.train_runtime_s for r in runs]),
            "cache_bytes": first.cache_bytes,
            "prepass_s": None if first.prepass_s is None else speed.spread(
                [r.prepass_s for r in runs if r.prepass_s is not None]),
            "prepass_samples": first.prepass_samples,
            "hits": first.hits,
            "misses": first.misses,
            "loaded_entries": first.loaded_entries,
            "steps": first.steps,
        }
    return {"comparisons": comparisons, "variants": variants}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = ["| figure | training loop: median [min-max] | target | loop CPU time | whole train() call | FLOP floor |",
             "|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        r = c["ratio"]
        target = ""
        if c["target"] is not None:
            target = f"<= {c['target']:.2f}" + (" ok" if c["meets_target"] else " **missed**")
        wall = "" if c["wall_ratio"] is None else f"{c['wall_ratio']['median']:.3f}"
        cpu = "" if c["cpu_ratio"] is None else f"{c['cpu_ratio']['median']:.3f}"
        if c["measure"] == "train_runtime_s":
            wall = "(train_runtime per step, both)"
        floor = "" if c["flop_floor"] is None else f"{c['flop_floor']:.3f}"
        lines.append(f"| {c['label']} | {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] | {target} | {cpu} | {wall} "
                     f"| {floor} |")
    lines += ["", "| variant | loop s / train() s (medians) | steps | cache | pre-pass s | pre-pass samples "
              "| hits / misses / read from disk |", "|---|---|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        cache = "" if v["cache_bytes"] is None else f"{v['cache_bytes'] / 2**20:.2f} MiB"
        prepass = "" if not v["prepass_s"] else f"{v['prepass_s']['median']:.2f}"
        counts = "" if v["hits"] is None else f"{v['hits']} / {v['misses']} / {v['loaded_entries']}"
        loop = "" if v["loop_s"] is None else f"{v['loop_s']['median']:.2f} / "
        lines.append(f"| {name} | {loop}{v['wall_s']['median']:.2f} | {v['steps']} | {cache} | {prepass} | "
                     f"{'' if v['prepass_samples'] is None else v['prepass_samples']} | {counts} |")
    m = meta["machine"]
    lines += ["", f"{meta['samples']} samples x {meta['shape']['seq']} tokens, batch {meta['shape']['batch']}, "
              f"{EPOCHS} epochs; {meta['rounds']} interleaved rounds on {m['cpu']}, {m['torch_threads']} torch "
              "threads, "
              f"torch {m['torch']}, transformers {m['transformers']}; {meta['wall_s'] / 60:.1f} min."]
    if meta.get("llamafactory_error"):
        lines.append(f"LLaMA-Factory did not run: {meta['llamafactory_error']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64, help="training samples (8 steps per epoch at batch 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 1 round: checks that it runs")
    parser.add_argument("--llamafactory", default=None, help="path of llamafactory-cli (its own venv)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round variant order")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file to write ('' for none)")
    opts = parser.parse_args(argv)
    shape = speed.ModelShape()
    if opts.smoke:
        shape, opts.rounds, opts.samples = speed.SMOKE_SHAPE, 1, 8
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    meta: dict[str, Any] = {"machine": speed.machine_info(), "shape": asdict(shape), "rounds": opts.rounds,
                            "samples": opts.samples, "epochs": EPOCHS, "load_average_before": load_average()}
    order_rng = random.Random(opts.seed)
    results: list[RunResult] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        lf_paths = None
        if opts.llamafactory:
            lf_paths = prepare_llamafactory(os.path.join(work, "lf"), shape, opts.samples)
        for round_index in range(opts.rounds):
            units: list[Any] = [[v] for v in VARIANTS] + [DISK_PAIR] + ([["llamafactory"]] if lf_paths else [])
            order_rng.shuffle(units)
            cache_dir = os.path.join(work, f"cache-{round_index}")
            for unit in units:
                for variant in unit:
                    if variant == "llamafactory":
                        try:
                            result = run_llamafactory(opts.llamafactory, lf_paths, shape, opts.samples, opts.threads,
                                                      round_index)
                        except (RuntimeError, OSError) as exc:
                            meta["llamafactory_error"] = str(exc)[-2000:]
                            print(meta["llamafactory_error"], flush=True)
                            lf_paths = None
                            continue
                    else:
                        result = run_variant(variant, shape, opts.samples, round_index, cache_dir)
                    results.append(result)
                    print(f"round {round_index + 1}/{opts.rounds}  {result.variant:16s} {result.wall_s:7.2f} s",
                          flush=True)
            shutil.rmtree(cache_dir, ignore_errors=True)
    meta["load_average_after"] = load_average()
    meta["wall_s"] = time.perf_counter() - started
    summary = summarise(results, shape)
    report = {"meta": meta, **summary, "runs": [asdict(r) for r in results]}
    print()
    print(markdown(summary, meta))
    write_report(report, opts.out, announce=True)
    return report


if __name__ == "__main__":
    main()
