#!/usr/bin/env python
"""``hf-llama-strategies compare`` against its candidates trained one by one with ``train``.

Measured in one process, side by side, on a Llama built from a config with saved weights (8 layers,
hidden 256, vocab 4096 by default; ``--smoke``: 3 layers, hidden 64), the demo tokenizer, and
the demo's texts as a causal-LM corpus (128-token blocks, batch 8):

* **fresh state**: loading the model again (``from_pretrained``, what ``train`` does) against a
  ``copy.deepcopy`` of a pristine CPU copy (what ``compare`` does): seconds (median of 5) and
  whether every parameter and buffer is byte for byte the loaded one;
* **compare vs alone**: one ``compare`` of the candidates (head only, last 2, last 25%, last 50%,
  full) for ``--steps`` steps, and each candidate trained alone with ``train`` (the same keys,
  evaluations at the same steps): whole-command wall times, training-loop times, and whether
  every candidate's per-step training losses and eval losses equal its ``train`` run's, bit for
  bit. The claim checked: compare's wall time is below the sum of the ``train`` runs by at least
  what compare says the shared frozen prefix cost; and each candidate's time "as trained alone"
  (compare's table) against its ``train`` run's training loop.

Rounds alternate the order (compare first, then the ``train`` runs first) after one untimed
warm-up run. Usage::

    python benchmarks/compare.py                 # 2 rounds, 20 steps
    python benchmarks/compare.py --smoke         # a tiny model, 1 round, 2 steps: checks that it runs

Writes ``benchmarks/results/compare.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from _common import load_average, write_report  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_llama_strategies.cli.compare import CompareOptions, run_compare  # noqa: E402
from hf_llama_strategies.cli.config import parse_config  # noqa: E402
from hf_llama_strategies.cli.demo import DEMO_DIR  # noqa: E402
from hf_llama_strategies.cli.train import build_task_model, load_task_data, run_train  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "compare.json")
SHAPES = {
    "default": dict(layers=8, hidden=256, intermediate=688, heads=8, vocab=4096, seq=128, batch=8),
    "smoke": dict(layers=3, hidden=64, intermediate=128, heads=4, vocab=128, seq=32, batch=4),
}
CANDIDATES = [
    {"name": "head only", "trainable_layers": "none", "train_norm": False},
    {"name": "last 2", "trainable_layers": "-2:"},
    {"name": "last 25%", "trainable_layers": "-25%"},
    {"name": "last 50%", "trainable_layers": "-50%"},
    {"name": "full", "trainable_layers": "all"},
]


def candidates_for(layers: int) -> list[dict[str, Any]]:
    """The candidates with their layer counts resolved for a model of ``layers`` layers (distinct ones only)."""
    out, seen = [], set()
    for spec in CANDIDATES:
        spec = dict(spec)
        value = spec["trainable_layers"]
        if value.endswith("%"):
            count = max(1, -(-layers * int(value[1:-1]) // 100))
            spec["trainable_layers"] = f"-{count}:"
        if spec["trainable_layers"] not in seen:
            seen.add(spec["trainable_layers"])
            out.append(spec)
    return out


def write_inputs(folder: str, shape: dict[str, int]) -> dict[str, str]:
    """A saved model (config and weights), the demo texts as JSON lines: what both commands read."""
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
                         max_position_embeddings=max(shape["seq"], 64), pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = os.path.join(folder, "model")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    paths = {"model": model_dir}
    for split in ("train", "validation"):
        rows = list(csv.reader(open(os.path.join(DEMO_DIR, f"{split}.csv"), encoding="utf-8")))[1:]
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": text}) + "\n" for text, _ in rows)
    return paths


def base_config(paths: dict[str, str], shape: dict[str, int], steps: int, out: str) -> dict[str, Any]:
    return {
        "model_name_or_path": paths["model"], "tokenizer_name_or_path": DEMO_DIR, "task": "causal_lm",
        "train_file": paths["train"], "validation_file": paths["validation"], "max_seq_length": shape["seq"],
        "max_eval_samples": 64, "per_device_train_batch_size": shape["batch"], "per_device_eval_batch_size": 16,
        "max_steps": steps, "logging_steps": 1, "learning_rate": 1e-3, "seed": 0, "use_cpu": True,
        "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "print_plan": False, "output_dir": out,
    }


# -- fresh state: a new load against a deep copy -----------------------------------------------


def bytes_of(model: torch.nn.Module) -> dict[str, bytes]:
    tensors = {**dict(model.named_parameters()), **{f"buffer:{n}": b for n, b in model.named_buffers()}}
    return {n: t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n, t in tensors.items()}


def fresh_state(config: dict[str, Any], reps: int) -> dict[str, Any]:
    parsed = parse_config(config)
    task_data = load_task_data(parsed)
    load_seconds, copy_seconds = [], []
    pristine = build_task_model(parsed, task_data)
    for _ in range(reps):
        started = time.perf_counter()
        loaded = build_task_model(parsed, task_data)
        load_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        copied = copy.deepcopy(pristine)
        copy_seconds.append(time.perf_counter() - started)
    return {
        "load_seconds_median": statistics.median(load_seconds),
        "deepcopy_seconds_median": statistics.median(copy_seconds),
        "deepcopy_equals_load_byte_for_byte": bytes_of(copied) == bytes_of(loaded),
    }


# -- compare against train, one candidate at a time ----------------------------------------------


def run_compare_timed(config: dict[str, Any], candidates: list[dict], points: int) -> tuple[float, dict]:
    options = CompareOptions(eval_points=points, candidates=json.dumps(candidates))
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        report = run_compare(config, [], options)
    return time.perf_counter() - started, report


def run_alone_timed(config: dict[str, Any], keys: dict[str, Any], steps: int, points: int) -> dict[str, Any]:
    alone = {**config, **keys, "eval_strategy": "steps", "eval_steps": max(1, steps // points), "eval_on_start": True}
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run_train(alone)
    wall = time.perf_counter() - started
    state = json.load(open(os.path.join(alone["output_dir"], "trainer_state.json"), encoding="utf-8"))
    history = state["log_history"]
    end = next(i for i, h in enumerate(history) if "train_runtime" in h)
    # The evaluations inside the training loop (train's final one reuses the last step's, or follows it).
    evals = [h for h in history[:end] if "eval_loss" in h]
    train_runtime = history[end]["train_runtime"]
    return {
        "wall_seconds": wall, "train_runtime": train_runtime,
        "loop_seconds": train_runtime - sum(h["eval_runtime"] for h in evals),
        "losses": [h["loss"] for h in history if "loss" in h], "eval_losses": [h["eval_loss"] for h in evals],
    }


def one_round(config: dict[str, Any], candidates: list[dict], steps: int, points: int, folder: str,
              compare_first: bool) -> dict[str, Any]:
    alone: dict[str, dict] = {}

    def alones() -> None:
        for spec in candidates:
            keys = {k: v for k, v in spec.items() if k != "name"}
            out = os.path.join(folder, f"alone-{len(alone)}-{int(compare_first)}")
            alone[spec["name"]] = run_alone_timed(dict(config, output_dir=out), keys, steps, points)

    if not compare_first:
        alones()
    wall, report = run_compare_timed(dict(config, output_dir=os.path.join(folder, f"cmp-{int(compare_first)}")),
                                     candidates, points)
    if compare_first:
        alones()
    rows = []
    for row in report["candidates"]:
        mine = alone[row["name"]]
        rows.append({
            "name": row["name"], "shared_prefix": row["shared_prefix"], "compare_seconds_as_alone": row["seconds"],
            "alone_loop_seconds": mine["loop_seconds"], "alone_wall_seconds": mine["wall_seconds"],
            "losses_equal": row["train_losses"] == mine["losses"],
            "eval_losses_equal": [p["eval_loss"] for p in row["eval_points"]] == mine["eval_losses"],
        })
    shared = report["shared_prefix"] or {}
    alone_wall = sum(a["wall_seconds"] for a in alone.values())
    return {
        "compare_first": compare_first, "compare_wall_seconds": wall, "alone_wall_seconds_sum": alone_wall,
        "alone_loop_seconds_sum": sum(a["loop_seconds"] for a in alone.values()),
        "shared_cost_seconds": shared.get("cost_seconds", 0.0),
        "shared_saved_seconds": shared.get("saved_seconds"),
        "shared_runs": shared.get("runs"), "shared_boundary": shared.get("boundary"),
        "below_alone_by_at_least_the_shared_cost": wall <= alone_wall - shared.get("cost_seconds", 0.0),
        "candidates": rows, "load_average": load_average(),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["| round | compare wall s | sum of train walls s | sum of train loops s | shared prefix s (saved) | "
             "below by >= shared | all losses equal |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["rounds"], start=1):
        equal = all(c["losses_equal"] and c["eval_losses_equal"] for c in r["candidates"])
        lines.append(
            f"| {i} ({'compare first' if r['compare_first'] else 'train first'}) | {r['compare_wall_seconds']:.1f} | "
            f"{r['alone_wall_seconds_sum']:.1f} | {r['alone_loop_seconds_sum']:.1f} | "
            f"{r['shared_cost_seconds']:.2f} ({r['shared_saved_seconds'] or 0:.2f}) | "
            f"{r['below_alone_by_at_least_the_shared_cost']} | {equal} |"
        )
    lines += ["", "| candidate | shared prefix | compare: time as if alone s | train: loop s | ratio |",
              "|---|---|---|---|---|"]
    for c in report["rounds"][-1]["candidates"]:
        ratio = c["compare_seconds_as_alone"] / c["alone_loop_seconds"] if c["alone_loop_seconds"] else float("nan")
        lines.append(f"| {c['name']} | {c['shared_prefix']} | {c['compare_seconds_as_alone']:.2f} | "
                     f"{c['alone_loop_seconds']:.2f} | {ratio:.2f} |")
    fresh = report["fresh_state"]
    lines += ["", f"fresh state: load {fresh['load_seconds_median']:.3f} s, deepcopy "
                  f"{fresh['deepcopy_seconds_median']:.3f} s (median of {report['reps']}); byte for byte: "
                  f"{fresh['deepcopy_equals_load_byte_for_byte']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--points", type=int, default=2, help="evaluations after the one before training")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 1 round, 2 steps")
    parser.add_argument("--out", default=DEFAULT_OUT)
    opts = parser.parse_args(argv)
    shape = SHAPES["smoke" if opts.smoke else "default"]
    if opts.smoke:
        opts.steps, opts.rounds, opts.points = 2, 1, 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    reps = 2 if opts.smoke else 5
    with tempfile.TemporaryDirectory() as folder:
        paths = write_inputs(folder, shape)
        config = base_config(paths, shape, opts.steps, os.path.join(folder, "out"))
        fresh = fresh_state(config, reps)
        candidates = candidates_for(shape["layers"])
        with contextlib.redirect_stdout(io.StringIO()):  # warm-up: the process's first forward and backward
            run_train(dict(config, max_steps=1, output_dir=os.path.join(folder, "warmup")))
        rounds = [one_round(config, candidates, opts.steps, opts.points, folder, compare_first=i % 2 == 0)
                  for i in range(opts.rounds)]
    report = {
        "shape": shape, "steps": opts.steps, "points": opts.points, "reps": reps, "smoke": opts.smoke,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "fresh_state": fresh, "rounds": rounds,
    }
    write_report(report, opts.out, announce=not opts.smoke)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
