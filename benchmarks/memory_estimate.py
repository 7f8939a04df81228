#!/usr/bin/env python
"""``estimate_training_memory`` against real training steps: the peak of live tensor bytes and RSS.

For every configuration of a grid (what trains, activation checkpointing, batch shape, LISA,
bf16 autocast, gradient accumulation), one process:

1. estimates the step's peak on fake tensors (``estimate_training_memory``), the model built on
   the meta device from its config;
2. trains the same model for real with ``StrategyTrainer`` and measures, during a steady-state
   optimizer step (the optimizer already holds its state), the peak of live tensor bytes with
   the same counter (:class:`~hf_llama_strategies.memory.counter.LiveTensorCounter`) over the real
   tensors: target ``estimate / measured`` within 1%;
3. with ``--rss``, trains a larger model (a few hundred MB) in a child process per configuration
   and measures the growth of its peak resident set over the step (Linux ``VmHWM``, reset just
   before the step; glibc's mmap threshold pinned so freed tensors go back to the system): an
   independent measurement, target within 10%.

It also times ``hf-llama-strategies plan`` with the estimate on the shipped Llama 3 70B config
at batch 1 x 4096 (target under 10 s and 2 GB of RAM) and ``--fit 80GiB`` (under 60 s), each in a
fresh process, with ``--llama70b``.

Usage::

    python benchmarks/memory_estimate.py            # the grid, tensor-level
    python benchmarks/memory_estimate.py --rss      # and the RSS comparison (minutes)
    python benchmarks/memory_estimate.py --llama70b # and the 70B timings
    python benchmarks/memory_estimate.py --smoke    # 3 configurations of a tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import transformers  # noqa: E402
from _common import RandomTokens, load_average, reset_peak_rss, rss_kib, write_report  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyTrainer, estimate_training_memory  # noqa: E402
from hf_llama_strategies.memory.counter import BUFFERS, GRADIENTS, INPUTS, OPTIMIZER_STATE, WEIGHTS, LiveTensorCounter  # noqa: E402

# -- configurations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    strategy: dict = field(default_factory=dict)
    checkpointing: bool = False
    reentrant: bool = False
    batch: int = 4
    seq: int = 64
    bf16: bool = False
    accumulation: int = 1
    optim: str = "adamw_torch"


GRID = [
    Case("full"),
    Case("full_ckpt", checkpointing=True),
    Case("last2", {"trainable_layers": "-2:"}),
    Case("last2_ckpt", {"trainable_layers": "-2:"}, checkpointing=True),
    Case("last2_ckpt_reentrant", {"trainable_layers": "-2:"}, checkpointing=True, reentrant=True),
    Case("head_only", {"trainable_layers": "none"}),
    Case("head_only_ckpt", {"trainable_layers": "none"}, checkpointing=True),
    Case("full_long", batch=2, seq=128),
    Case("last2_long_ckpt", {"trainable_layers": "-2:"}, checkpointing=True, batch=2, seq=128),
    # Measured in the steady states the estimate simulates (see measure_step_for).
    Case("lisa2", {"lisa_layers": 2, "lisa_interval_steps": 2}),
    Case("lisa2_keep_state", {"lisa_layers": 2, "lisa_interval_steps": 1, "lisa_drop_optimizer_state": False}),
    Case("gradual", {"unfreeze_schedule": "gradual", "unfreeze_interval_steps": 1}),
    Case("bf16_last2", {"trainable_layers": "-2:", "precision": "bf16"}, bf16=True),
    Case("bf16_full_ckpt", {"precision": "bf16"}, checkpointing=True, bf16=True),
    Case("accum2", accumulation=2),
    Case("accum2_last2_ckpt", {"trainable_layers": "-2:"}, checkpointing=True, accumulation=2),
    Case("sgd_last2", {"trainable_layers": "-2:"}, optim="sgd"),
    Case("adafactor_full", optim="adafactor"),
]
SMOKE_GRID = [GRID[0], GRID[3], GRID[14]]


@dataclass
class Shape:
    layers: int = 4
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 1024

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )


TENSOR_SHAPE = Shape()
SMOKE_SHAPE = Shape(layers=3, hidden=64, intermediate=128, vocab=256)
# About 300 MB of fp32 weights: RSS growth over a step is far above the allocator's noise.
RSS_SHAPE = Shape(layers=8, hidden=512, intermediate=1408, heads=8, kv_heads=4, vocab=32000)


def measure_step_for(case: Case, shape: "Shape") -> int:
    """The first optimizer step (0-based) in the steady state that the estimate simulates.

    Step 1 (the optimizer holds the state step 0 made) inside a LISA draw's interval; for LISA
    keeping state, the first step at which every layer drawn holds state from an earlier draw;
    for gradual unfreezing, the step after the last stage began.
    """
    options = case.strategy
    if options.get("unfreeze_schedule") == "gradual":
        return shape.layers * options["unfreeze_interval_steps"] + 1
    if options.get("lisa_layers") and options.get("lisa_drop_optimizer_state") is False:
        from hf_llama_strategies.strategies.lisa import draw_layers

        interval, seen, index = options["lisa_interval_steps"], set(), 0
        while len(seen) < shape.layers:
            seen.update(draw_layers(range(shape.layers), options["lisa_layers"], SEED, index))
            index += 1
        return index * interval
    return 1


SEED = 0


def training_args(case: Case, output_dir: str, steps: int, use_cpu: bool = True) -> TrainingArguments:
    ckpt = {}
    if case.checkpointing:
        ckpt = dict(activation_checkpointing=True,
                    activation_checkpointing_kwargs={"use_reentrant": case.reentrant})
    return TrainingArguments(
        output_dir=output_dir, use_cpu=use_cpu, report_to="none", seed=SEED, max_steps=steps,
        per_device_train_batch_size=case.batch, gradient_accumulation_steps=case.accumulation,
        learning_rate=1e-4, logging_steps=10_000, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, optim=case.optim, bf16=case.bf16, **ckpt,
    )


def strategy_args(case: Case) -> StrategyArguments:
    return StrategyArguments(print_plan=False, **case.strategy)


# -- measuring a real step ---------------------------------------------------------------------------


class MeasuringTrainer(StrategyTrainer):
    """``StrategyTrainer`` that counts live tensor bytes during optimizer step ``measure_step`` (0-based).

    The counter starts once the step's micro-batches are fetched (they are counted as inputs, as the
    weights, buffers and the optimizer state that exist already) and stops when the step ends.
    """

    def __init__(self, *args: Any, measure_step: int = 1, rss: bool = False, cuda: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measure_step = measure_step
        self.rss = rss
        self.cuda = cuda
        self.cuda_max_allocated: Optional[int] = None
        self.cuda_max_reserved: Optional[int] = None
        self.counter: Optional[LiveTensorCounter] = None
        self.rss_growth: Optional[int] = None
        self._rss_before = 0
        self.add_callback(_Stop(self))

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.state.global_step == self.measure_step and self.counter is None:
            counter = LiveTensorCounter()
            for param in self.model.parameters():
                counter.track(param, WEIGHTS)
                counter.track(param.grad, GRADIENTS)
            for buffer in self.model.buffers():
                counter.track(buffer, BUFFERS)
            for state in self.optimizer.state.values():
                for value in state.values():
                    counter.track(value, OPTIMIZER_STATE)
            for batch in batches:
                for value in batch.values():
                    counter.track(value, INPUTS)
            self.counter = counter
            if self.rss:
                gc.collect()
                reset_peak_rss()
                self._rss_before = rss_kib("VmRSS")
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            counter.__enter__()
        return batches, items


class _Stop(TrainerCallback):
    def __init__(self, trainer: MeasuringTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        trainer = self.trainer
        if trainer.counter is not None and state.global_step == trainer.measure_step + 1:
            trainer.counter.__exit__(None, None, None)
            if trainer.cuda:
                torch.cuda.synchronize()
                trainer.cuda_max_allocated = torch.cuda.max_memory_allocated()
                trainer.cuda_max_reserved = torch.cuda.max_memory_reserved()
            if trainer.rss:
                trainer.rss_growth = (rss_kib("VmHWM") - trainer._rss_before) * 1024
            control.should_training_stop = True


def measure_real_step(case: Case, shape: Shape, rss: bool = False) -> dict[str, Any]:
    """Train ``case`` on a fresh model and measure its second optimizer step (steady state)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.config()).train()
    step = measure_step_for(case, shape)
    data = RandomTokens(case.batch * case.accumulation * (step + 2), case.seq, shape.vocab)
    with tempfile.TemporaryDirectory() as out:
        args = training_args(case, out, steps=step + 2)
        trainer = MeasuringTrainer(
            model=model, args=args, train_dataset=data, strategy_args=strategy_args(case), measure_step=step, rss=rss,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    counter = trainer.counter
    assert counter is not None, "the measured step did not run"
    return {"peak_bytes": counter.peak, "rss_growth_bytes": trainer.rss_growth}


def estimate_case(case: Case, shape: Shape, use_cpu: bool = True) -> Any:
    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config())
    with tempfile.TemporaryDirectory() as out:
        args = training_args(case, out, steps=measure_step_for(case, shape) + 2, use_cpu=use_cpu)
        return estimate_training_memory(model, strategy_args(case), args, seq_len=case.seq)


# -- RSS -------------------------------------------------------------------------------------------------


RSS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import memory_estimate as bench
from _common import pin_malloc
pin_malloc()
case = bench.Case(**json.loads(sys.argv[2]))
print("RESULT " + json.dumps(bench.measure_real_step(case, bench.RSS_SHAPE, rss=True)))
"""


def measure_rss(case: Case) -> int:
    """Peak RSS growth over one steady-state step (``RSS_SHAPE``), in a fresh process.

    The growth is taken from the resident set when the step begins: the weights, optimizer state
    and batches already resident are the step's "before", so it compares with
    ``peak_bytes - bytes alive when the step begins``.
    """
    payload = json.dumps(asdict(case))
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, os.path.dirname(os.path.abspath(__file__)), payload],
                         capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    return json.loads(out.split("RESULT ", 1)[1])["rss_growth_bytes"]


# -- the 70B plan -------------------------------------------------------------------------------------

PLAN_CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from hf_llama_strategies import cli
code = cli.main(["plan", cli.CONFIGS_DIR + "/llama3-70b.yaml", *sys.argv[1:]])
print("RESULT " + json.dumps({"code": code, "seconds": time.perf_counter() - start,
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def time_plan(*argv: str) -> dict[str, Any]:
    """``hf-llama-strategies plan`` of the shipped 70B config in a fresh process: seconds, peak RSS, output."""
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD, *argv], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    text, result = out.split("RESULT ", 1)
    return {**json.loads(result), "output": text}


# -- main ------------------------------------------------------------------------------------------------------


def run_grid(cases: list[Case], shape: Shape, rss: bool, rss_seq: Optional[int] = None) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        started = time.perf_counter()
        estimate = estimate_case(case, shape)
        seconds = time.perf_counter() - started
        real = measure_real_step(case, shape)
        row = {
            "case": case.name, "estimate_peak_bytes": estimate.peak_bytes, "measured_peak_bytes": real["peak_bytes"],
            "ratio": estimate.peak_bytes / real["peak_bytes"], "peak_phase": estimate.peak_phase,
            "simulated": estimate.simulated, "estimate_seconds": seconds,
        }
        if rss:
            # Longer sequences make activations, not only gradients, a large part of the step.
            big_case = dataclasses.replace(case, seq=rss_seq) if rss_seq else case
            big = estimate_case(big_case, RSS_SHAPE)
            # What the step adds to what is resident when it begins (weights, state, batches).
            growth = big.peak_breakdown["gradients"] + big.peak_breakdown["activations"]
            measured = measure_rss(big_case)
            row.update(rss_estimate_growth_bytes=growth, rss_measured_growth_bytes=measured,
                       rss_ratio=growth / measured if measured else None)
        rows.append(row)
        print(f"{case.name:24s} estimate/measured {row['ratio']:.6f}"
              + (f"  RSS {row['rss_ratio']:.3f}" if rss and row.get("rss_ratio") else ""), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], rss: bool) -> str:
    head = "| configuration | estimate MiB | measured MiB | estimate / measured | peak in |"
    line = "|---|---|---|---|---|"
    if rss:
        head += " step growth, estimate MiB | RSS growth MiB | estimate / RSS |"
        line += "---|---|---|"
    out = [head, line]
    for r in rows:
        text = (f"| {r['case']} | {r['estimate_peak_bytes'] / 2**20:.3f} | {r['measured_peak_bytes'] / 2**20:.3f} "
                f"| {r['ratio']:.6f} | {r['peak_phase']} |")
        if rss:
            text += (f" {r['rss_estimate_growth_bytes'] / 2**20:.1f} | {r['rss_measured_growth_bytes'] / 2**20:.1f} "
                     f"| {r['rss_ratio']:.3f} |")
        out.append(text)
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 configurations of a tiny model")
    parser.add_argument("--rss", action="store_true", help="also compare with the peak RSS growth of a larger model")
    parser.add_argument(
        "--rss_seq", type=int, default=None, help="sequence length of the RSS runs (default: each case's)"
    )
    parser.add_argument("--llama70b", action="store_true", help="also time `plan` of the 70B config (batch 1 x 4096)")
    parser.add_argument("--cases", default=None, help="comma list of configuration names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "memory_estimate.json"), help="JSON file ('' for none)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    cases, shape = (SMOKE_GRID, SMOKE_SHAPE) if opts.smoke else (GRID, TENSOR_SHAPE)
    if opts.cases:
        by_name = {c.name: c for c in GRID}
        unknown = [n for n in opts.cases.split(",") if n not in by_name]
        if unknown:
            parser.error(f"unknown configurations {unknown}; valid: {', '.join(by_name)}")
        cases = [by_name[n] for n in opts.cases.split(",")]
    started = time.perf_counter()
    report: dict[str, Any] = {
        "shape": asdict(shape), "rss_shape": asdict(RSS_SHAPE) if opts.rss else None,
        "load_average_before": load_average(),
        "rss_seq": opts.rss_seq,
        "grid": run_grid(cases, shape, opts.rss, opts.rss_seq),
    }
    if opts.llama70b:
        shape_args = ("--per_device_train_batch_size", "1", "--max_seq_length", "4096")
        report["llama70b"] = {
            "plan": {k: v for k, v in time_plan(*shape_args).items() if k != "output"},
            "fit_80GiB": {k: v for k, v in time_plan(*shape_args, "--fit", "80GiB").items() if k != "output"},
        }
    report["load_average_after"] = load_average()
    report["wall_s"] = time.perf_counter() - started
    print()
    print(markdown(report["grid"], opts.rss))
    if opts.llama70b:
        for name, r in report["llama70b"].items():
            print(f"70B {name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"load average (1/5/15 min) before {report['load_average_before']}, after {report['load_average_after']}")
    write_report(report, opts.out)
    return report


if __name__ == "__main__":
    main()
