#!/usr/bin/env python
"""Speed and memory of hf-llama-strategies against a plain ``transformers.Trainer``.

Every figure is a ratio measured side by side in one process: each round trains every
variant once (a fresh model and Trainer, the same seed and data), in a shuffled order, and
each ratio is taken between two variants of the same round, so that a slow spell of the
machine hits numerator and denominator alike. Reported: the median over rounds and the
spread (min-max and interquartile range).

What it measures, on a tiny Llama (8 layers, hidden 256, vocab 4096, batch 8 x 128 by default):

(a) ``StrategyTrainer`` full fine-tuning vs plain ``Trainer`` (step time);
(b) last 2 layers vs full fine-tuning, with and without activation checkpointing, in
    LLaMA-Factory's configuration (the two layers only) and with the final norm and head;
(c) our checkpointing path vs transformers' default (plain ``Trainer``, same freezing by hand);
(d) optimizer-state bytes and gradient bytes against trainable parameters (AdamW moments are
    8 bytes per trainable fp32 parameter; no gradient tensor ever exists for a frozen one);
(e) peak memory: the process's peak resident set during training (Linux ``VmHWM``, reset
    before each run) and, exactly, the activation bytes autograd keeps for backward.

Timings come three ways: wall-clock step time (what the targets are about), the fastest step
of each variant (load only ever adds time) and process CPU time. Two extra steps per variant
(first round) count the work itself, which no load disturbs: the FLOPs of matrix products and
attention and the ATen operator calls as they run (backward and recomputation included), and the Python
function calls. Each ratio is printed beside its target and its FLOP floor: the ratio of the
step's matrix-product FLOPs (forward, recomputation, and the weight and input gradients that
backward needs), computed from the model's shapes (:func:`flop_floor`), beside the floors the
issue quotes.

Usage::

    python benchmarks/speed_memory.py                 # the full run (7 rounds of 6 steps)
    python benchmarks/speed_memory.py --quick         # 3 rounds of 4 steps
    python benchmarks/speed_memory.py --smoke         # a tiny model, 1 round: checks that it runs
    python benchmarks/speed_memory.py --threads 1     # on a busy machine: 2 threads that wait for
                                                      # each other at every operator suffer most

Writes ``benchmarks/results/speed_memory.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import transformers  # noqa: E402
from _common import RandomTokens, load_average, pin_malloc, reset_peak_rss, rss_kib, write_report  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "speed_memory.json")

# The floors quoted in issue 8 (measured configurations' FLOP floors, for comparison).
ISSUE_FLOORS = {"lf": 0.53, "lf_ckpt": 0.46, "l2nh": 0.58, "l2nh_ckpt": 0.50}


# -- the model ------------------------------------------------------------------------------


@dataclass
class ModelShape:
    layers: int = 8
    hidden: int = 256
    intermediate: int = 688  # Llama's 8/3 x hidden, rounded up to a multiple of 16
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 4096
    batch: int = 8
    seq: int = 128

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.seq, 64),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )


SMOKE_SHAPE = ModelShape(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, batch=2, seq=16)


# -- FLOP floors ------------------------------------------------------------------------------


def flop_floor(shape: ModelShape, freezing: str, checkpointing: Optional[str]) -> float:
    """Matmul FLOPs of one step with ``freezing``, relative to full fine-tuning (same checkpointing).

    Counted per token, in multiply-accumulates: every projection's and attention product's
    forward; in backward, the weight gradient where the weight trains and the input gradient
    where anything below trains (so not the input gradient of the lowest trainable layer's
    q/k/v projections); with ``checkpointing``, one more forward of every layer that backward
    reaches, except, for ``"non_reentrant"``, its last projection (``down_proj``): torch stops
    recomputing once backward has the tensors it saved. Element-wise work, the loss and the
    optimizer are left out (the optimizer and gradient clipping, proportional to what trains,
    would lower the ratios).
    """
    h, i, hd = shape.hidden, shape.intermediate, shape.hidden // shape.heads
    q, kv, o = h * shape.heads * hd, 2 * h * shape.kv_heads * hd, shape.heads * hd * h
    attn = 2 * shape.seq * shape.heads * hd
    layer = q + kv + o + 3 * h * i + attn
    head = h * shape.vocab
    forward = shape.layers * layer + head
    recomputed = {None: 0, "reentrant": layer, "non_reentrant": layer - h * i}[checkpointing]

    def step(trainable_layers: int, head_trains: bool, embeddings_train: bool) -> int:
        backward = 2 * head if head_trains else head  # the input gradient: a layer below trains
        backward += 2 * layer * trainable_layers
        if not embeddings_train:
            backward -= q + kv
        return forward + backward + recomputed * trainable_layers

    full = step(shape.layers, True, True)
    part = {"lf": step(2, False, False), "l2nh": step(2, True, False), "full": full}[freezing]
    return part / full


# -- variants ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    trainer: str  # "plain" (transformers.Trainer, frozen by hand) or "ours" (StrategyTrainer)
    freezing: str  # "full", "lf" (last 2 layers only), "l2nh" (last 2 layers + norm + head)
    checkpointing: Optional[str] = None  # None, "non_reentrant", "reentrant"


VARIANTS = [
    Variant("plain_full", "plain", "full"),
    Variant("ours_full", "ours", "full"),
    Variant("plain_full_ckpt", "plain", "full", "non_reentrant"),
    Variant("ours_full_ckpt", "ours", "full", "non_reentrant"),
    Variant("ours_full_ckpt_r", "ours", "full", "reentrant"),
    Variant("ours_lf", "ours", "lf"),
    Variant("ours_lf_ckpt", "ours", "lf", "non_reentrant"),
    Variant("ours_lf_ckpt_r", "ours", "lf", "reentrant"),
    Variant("ours_l2nh", "ours", "l2nh"),
    Variant("ours_l2nh_ckpt", "ours", "l2nh", "non_reentrant"),
    Variant("ours_l2nh_ckpt_r", "ours", "l2nh", "reentrant"),
    Variant("plain_lf_ckpt", "plain", "lf", "non_reentrant"),
    Variant("plain_l2nh_ckpt", "plain", "l2nh", "non_reentrant"),
]
BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(frozen=True)
class Comparison:
    section: str
    label: str
    numerator: str
    denominator: str
    target: Optional[float] = None
    floor: Optional[tuple[str, Optional[str]]] = None  # (freezing, checkpointing) for flop_floor
    issue_floor: Optional[str] = None


COMPARISONS = [
    Comparison("a", "StrategyTrainer / Trainer, full fine-tuning", "ours_full", "plain_full", 1.02),
    Comparison(
        "a", "StrategyTrainer / Trainer, full fine-tuning, checkpointing", "ours_full_ckpt", "plain_full_ckpt", 1.02
    ),
    Comparison("b", "last 2 layers only (LLaMA-Factory) / full", "ours_lf", "ours_full", None, ("lf", None), "lf"),
    Comparison(
        "b", "last 2 layers only / full, checkpointing", "ours_lf_ckpt", "ours_full_ckpt",
        0.46, ("lf", "non_reentrant"), "lf_ckpt",
    ),
    Comparison(
        "b", "last 2 layers only / full, checkpointing, reentrant", "ours_lf_ckpt_r", "ours_full_ckpt_r",
        0.46, ("lf", "reentrant"), "lf_ckpt",
    ),
    Comparison("b", "last 2 layers + norm + head / full", "ours_l2nh", "ours_full", 0.60, ("l2nh", None), "l2nh"),
    Comparison(
        "b", "last 2 layers + norm + head / full, checkpointing", "ours_l2nh_ckpt", "ours_full_ckpt",
        0.52, ("l2nh", "non_reentrant"), "l2nh_ckpt",
    ),
    Comparison(
        "b", "last 2 layers + norm + head / full, checkpointing, reentrant", "ours_l2nh_ckpt_r", "ours_full_ckpt_r",
        0.52, ("l2nh", "reentrant"), "l2nh_ckpt",
    ),
    Comparison(
        "c", "transformers' default: last 2 layers only / full, checkpointing", "plain_lf_ckpt", "plain_full_ckpt",
        None, ("lf", "non_reentrant"),
    ),
    Comparison(
        "c", "transformers' default: last 2 + norm + head / full, checkpointing", "plain_l2nh_ckpt", "plain_full_ckpt",
        None, ("l2nh", "non_reentrant"),
    ),
    Comparison("c", "ours / transformers' default, last 2 layers only, checkpointing", "ours_lf_ckpt", "plain_lf_ckpt"),
    Comparison(
        "c", "ours / transformers' default, last 2 + norm + head, checkpointing", "ours_l2nh_ckpt", "plain_l2nh_ckpt"
    ),
]


def strategy_for(freezing: str) -> StrategyArguments:
    if freezing == "full":
        return StrategyArguments(print_plan=False)
    if freezing == "lf":
        return StrategyArguments(trainable_layers="-2:", train_norm=False, train_head=False, print_plan=False)
    return StrategyArguments(trainable_layers="-2:", print_plan=False)


def freeze_by_hand(model: torch.nn.Module, freezing: str, layers: int) -> None:
    if freezing == "full":
        return
    trainable = tuple(f"model.layers.{i}." for i in range(layers - 2, layers))
    if freezing == "l2nh":
        trainable += ("model.norm.", "lm_head.")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trainable))


# -- measuring --------------------------------------------------------------------------------


class WorkCounter(TorchDispatchMode):
    """Counts ATen operator calls and the FLOPs of matrix products and attention, as they run.

    Below autograd, so backward and the recomputation of checkpointed layers count too (a
    non-reentrant checkpoint stops recomputing once backward has what it needs: its saving
    shows here).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls += 1
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            q, k, v = args[:3]
            self.flops += sdpa_flop_count(q.shape, k.shape, v.shape)
        elif packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            grad_out, q, k, v = args[:4]
            self.flops += sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
        return out


class Probe(TrainerCallback):
    """Step times, gradient bytes (every step), optimizer-state bytes, and the work of a step.

    With ``count_from`` set, step ``count_from`` (1-based, after the timed ones) runs under
    cProfile (Python function calls) and the next one under :class:`WorkCounter` (ATen calls,
    FLOPs): measures of work that no load on the machine disturbs.
    """

    def __init__(self, count_from: Optional[int] = None) -> None:
        self.step_ends: list[tuple[float, float]] = []  # (wall clock, process CPU time)
        self.count_from = count_from
        self.python_calls: Optional[int] = None
        self.aten_calls: Optional[int] = None
        self.flops: Optional[int] = None
        self._python: Optional[cProfile.Profile] = None
        self._work: Optional[WorkCounter] = None
        self.grad_bytes: list[int] = []
        self.frozen_with_grad: set[str] = set()
        self.moment_bytes: Optional[int] = None
        self.step_counter_bytes: Optional[int] = None
        self.optimizer_params: Optional[int] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_ends.append((time.perf_counter(), time.process_time()))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        total = 0
        for name, param in model.named_parameters():
            if param.grad is None:
                continue
            if not param.requires_grad:
                self.frozen_with_grad.add(name)
            total += param.grad.numel() * param.grad.element_size()
        self.grad_bytes.append(total)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.moment_bytes is not None:
            return
        moments = counters = params = 0
        for group in optimizer.param_groups:
            for param in group["params"]:
                params += param.numel()
                for value in optimizer.state.get(param, {}).values():
                    if not torch.is_tensor(value):
                        continue
                    if value.shape == param.shape:
                        moments += value.numel() * value.element_size()
                    else:
                        counters += value.numel() * value.element_size()
        self.moment_bytes, self.step_counter_bytes, self.optimizer_params = moments, counters, params

    def on_step_begin(self, args, state, control, **kwargs):
        if self.count_from is None:
            return
        if state.global_step + 1 == self.count_from:
            self._python = cProfile.Profile()
            self._python.enable()
        elif state.global_step + 1 == self.count_from + 1:
            self._work = WorkCounter()
            self._work.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._python is not None:
            self._python.disable()
            self.python_calls = pstats.Stats(self._python).total_calls  # type: ignore[attr-defined]
            self._python = None
        elif self._work is not None:
            self._work.__exit__(None, None, None)
            self.aten_calls, self.flops = self._work.calls, self._work.flops
            self._work = None
        elif self.count_from is None or state.global_step < self.count_from:
            self.step_ends.append((time.perf_counter(), time.process_time()))


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one forward."""
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    total = sum(seen.values())
    if loss.requires_grad:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return total


@dataclass
class RunResult:
    variant: str
    round: int
    step_times: list[float]  # wall clock, s
    step_time: float  # median of the measured steps
    step_cpu_times: list[float]  # process CPU time (all threads), s
    step_cpu_time: float
    peak_rss_mib: Optional[float]
    grad_bytes: int
    frozen_with_grad: list[str]
    moment_bytes: int
    step_counter_bytes: int
    optimizer_params: int
    trainable_params: int
    total_params: int
    saved_activation_bytes: Optional[int] = None
    python_calls_per_step: Optional[int] = None
    aten_calls_per_step: Optional[int] = None
    flops_per_step: Optional[int] = None


def run_variant(
    variant: Variant, shape: ModelShape, warmup: int, steps: int, round_index: int, count_work: bool
) -> RunResult:
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.config()).train()
    total_steps = warmup + steps + (2 if count_work else 0)
    data = RandomTokens(shape.batch * total_steps, shape.seq, shape.vocab)
    ckpt_kwargs = {}
    if variant.checkpointing is not None:
        ckpt_kwargs = dict(
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": variant.checkpointing == "reentrant"},
        )
    probe = Probe(count_from=warmup + steps + 1 if count_work else None)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            report_to="none",
            seed=0,
            max_steps=total_steps,
            per_device_train_batch_size=shape.batch,
            learning_rate=1e-4,
            logging_steps=10_000,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            **ckpt_kwargs,
        )
        if variant.trainer == "ours":
            trainer: Trainer = StrategyTrainer(
                model=model, args=args, train_dataset=data, strategy_args=strategy_for(variant.freezing),
                callbacks=[probe],
            )
        else:
            freeze_by_hand(model, variant.freezing, shape.layers)
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[probe])
        trainer.remove_callback(PrinterCallback)
        gc.collect()
        has_peak = reset_peak_rss()
        rss_before = rss_kib("VmRSS")
        trainer.train()
        peak = rss_kib("VmHWM") if has_peak else None
    times = [b[0] - a[0] for a, b in zip(probe.step_ends, probe.step_ends[1:])][warmup:]
    cpu_times = [b[1] - a[1] for a, b in zip(probe.step_ends, probe.step_ends[1:])][warmup:]
    activations = None
    if count_work:
        batch = {k: v[: shape.batch] for k, v in {"input_ids": data.ids, "labels": data.ids}.items()}
        activations = saved_activation_bytes(model, batch)
    result = RunResult(
        variant=variant.name,
        round=round_index,
        step_times=times,
        step_time=statistics.median(times),
        step_cpu_times=cpu_times,
        step_cpu_time=statistics.median(cpu_times),
        peak_rss_mib=None if peak is None or rss_before is None else (peak - rss_before) / 1024,
        grad_bytes=max(probe.grad_bytes),
        frozen_with_grad=sorted(probe.frozen_with_grad),
        moment_bytes=probe.moment_bytes or 0,
        step_counter_bytes=probe.step_counter_bytes or 0,
        optimizer_params=probe.optimizer_params or 0,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        saved_activation_bytes=activations,
        python_calls_per_step=probe.python_calls,
        aten_calls_per_step=probe.aten_calls,
        flops_per_step=probe.flops,
    )
    del trainer, model
    gc.collect()
    return result


# -- statistics and output --------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
        "q1": q1, "q3": q3, "n": len(ordered),
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def summarise(results: list[RunResult], shape: ModelShape) -> dict[str, Any]:
    by_round: dict[int, dict[str, RunResult]] = {}
    for r in results:
        by_round.setdefault(r.round, {})[r.variant] = r
    comparisons = []
    for c in COMPARISONS:
        pairs = [
            (rows[c.numerator], rows[c.denominator])
            for rows in by_round.values()
            if c.numerator in rows and c.denominator in rows
        ]
        if not pairs:
            continue
        ratios = [num.step_time / den.step_time for num, den in pairs]
        cpu_ratios = [num.step_cpu_time / den.step_cpu_time for num, den in pairs]
        # Load only ever adds time: the fastest steps are the least disturbed estimate.
        best = min(t for num, _ in pairs for t in num.step_times) / min(t for _, den in pairs for t in den.step_times)
        best_cpu = min(t for num, _ in pairs for t in num.step_cpu_times) / min(
            t for _, den in pairs for t in den.step_cpu_times
        )
        stats = spread(ratios)
        floor = flop_floor(shape, *c.floor) if c.floor else None
        work = {}
        for key in ("flops_per_step", "aten_calls_per_step", "python_calls_per_step"):
            num = next((getattr(r, key) for r in results if r.variant == c.numerator and getattr(r, key)), None)
            den = next((getattr(r, key) for r in results if r.variant == c.denominator and getattr(r, key)), None)
            work[key.replace("_per_step", "_ratio")] = num / den if num and den else None
        comparisons.append(
            {
                **asdict(c),
                "ratio": stats,
                "ratios": ratios,
                "best_step_ratio": best,
                "cpu_time_ratio": spread(cpu_ratios),
                "best_cpu_step_ratio": best_cpu,
                "cpu_time_ratios": cpu_ratios,
                "flop_floor": floor,
                "issue_flop_floor": ISSUE_FLOORS.get(c.issue_floor) if c.issue_floor else None,
                "meets_target": None if c.target is None else stats["median"] <= c.target,
                **work,
            }
        )
    variants = {}
    for name in BY_NAME:
        runs = [r for r in results if r.variant == name]
        if not runs:
            continue
        first = runs[0]
        peaks = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
        activations = next((r.saved_activation_bytes for r in runs if r.saved_activation_bytes is not None), None)
        counted = next((r for r in runs if r.aten_calls_per_step is not None), None)
        variants[name] = {
            **asdict(BY_NAME[name]),
            "step_time_s": spread([r.step_time for r in runs]),
            "step_cpu_time_s": spread([r.step_cpu_time for r in runs]),
            "trainable_params": first.trainable_params,
            "total_params": first.total_params,
            "optimizer_params": first.optimizer_params,
            "adamw_moment_bytes": first.moment_bytes,
            "adamw_moment_bytes_per_trainable_param": first.moment_bytes / first.trainable_params,
            "adamw_step_counter_bytes": first.step_counter_bytes,
            "grad_bytes": first.grad_bytes,
            "grad_bytes_per_trainable_param": first.grad_bytes / first.trainable_params,
            "frozen_params_with_grad": sorted({n for r in runs for n in r.frozen_with_grad}),
            "peak_rss_increase_mib": spread(peaks) if peaks else None,
            "saved_activation_bytes": activations,
            "python_calls_per_step": counted.python_calls_per_step if counted else None,
            "aten_calls_per_step": counted.aten_calls_per_step if counted else None,
            "flops_per_step": counted.flops_per_step if counted else None,
        }
    return {"comparisons": comparisons, "variants": variants}


def _fmt_ratio(stats: dict[str, float]) -> str:
    return f"{stats['median']:.3f} [{stats['q1']:.3f}-{stats['q3']:.3f}]"


def _num(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The comparisons and the per-variant figures as Markdown tables, with the machine."""
    lines = [
        "| | figure | step time: median [IQR] | fastest steps | CPU time | target | FLOPs counted "
        "| FLOP floor (model / issue) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["comparisons"]:
        target = ""
        if c["target"] is not None:
            target = f"<= {c['target']:.2f}" + (" ok" if c["meets_target"] else " **missed**")
        floor = _num(c["flop_floor"], ".3f")
        if c["issue_flop_floor"] is not None:
            floor += f" / {c['issue_flop_floor']:.2f}"
        lines.append(
            f"| ({c['section']}) | {c['label']} | {_fmt_ratio(c['ratio'])} | {c['best_step_ratio']:.3f} "
            f"| {c['cpu_time_ratio']['median']:.3f} | {target} | {_num(c['flops_ratio'], '.3f')} | {floor} |"
        )
    lines += [
        "",
        "| variant | step s: median [IQR] | trainable / total | AdamW state B per trainable param | grad B per "
        "trainable param | frozen params with a grad | peak RSS +MiB | saved activations MiB | GFLOP per step "
        "| ATen calls per step | Python calls per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["variants"].items():
        peak = "" if v["peak_rss_increase_mib"] is None else f"{v['peak_rss_increase_mib']['median']:.0f}"
        acts = "" if v["saved_activation_bytes"] is None else f"{v['saved_activation_bytes'] / 2**20:.1f}"
        t = v["step_time_s"]
        lines.append(
            f"| {name} | {t['median']:.3f} [{t['q1']:.3f}-{t['q3']:.3f}] | {v['trainable_params'] / 1e6:.2f}M "
            f"/ {v['total_params'] / 1e6:.2f}M | {v['adamw_moment_bytes_per_trainable_param']:.2f} "
            f"| {v['grad_bytes_per_trainable_param']:.2f} | {len(v['frozen_params_with_grad'])} | {peak} | {acts} "
            f"| {_num(v['flops_per_step'] and v['flops_per_step'] / 1e9, '.2f')} "
            f"| {_num(v['aten_calls_per_step'], 'd')} | {_num(v['python_calls_per_step'], 'd')} |"
        )
    m = meta["machine"]
    load = lambda key: "/".join(f"{x:.1f}" for x in meta[key]) if meta.get(key) else "?"  # noqa: E731
    lines += [
        "",
        f"Measured on {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"transformers {m['transformers']}: {meta['rounds']} interleaved rounds of {meta['steps']} steps (after "
        f"{meta['warmup']} warm-up steps); load average (1/5/15 min) {load('load_average_before')} before, "
        f"{load('load_average_after')} after; {meta['wall_s'] / 60:.0f} min.",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (every variant once per round)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run before measuring")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 4 steps")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 1 round of 2 steps: checks it runs")
    parser.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round variant order")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file to write ('' for none)")
    parser.add_argument("--summarise", metavar="JSON", default=None, help="recompute the tables of a saved run")
    opts = parser.parse_args(argv)
    if opts.summarise:
        with open(opts.summarise, encoding="utf-8") as fh:
            saved = json.load(fh)
        results = [RunResult(**r) for r in saved["runs"]]
        shape = ModelShape(**saved["meta"]["shape"])
        return _report(results, shape, saved["meta"], opts.out)
    shape = ModelShape()
    if opts.quick:
        opts.rounds, opts.steps = min(opts.rounds, 3), min(opts.steps, 4)
    if opts.smoke:
        shape, opts.rounds, opts.steps, opts.warmup = SMOKE_SHAPE, 1, 2, 1
    names = opts.variants.split(",") if opts.variants else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(BY_NAME)}")
    torch.set_num_threads(opts.threads)
    pin_malloc()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    meta = {
        "machine": machine_info(),
        "shape": asdict(shape),
        "rounds": opts.rounds,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "load_average_before": load_average(),
    }
    order_rng = random.Random(opts.seed)
    results: list[RunResult] = []
    started = time.perf_counter()
    for round_index in range(opts.rounds):
        order = list(names)
        order_rng.shuffle(order)
        for name in order:
            result = run_variant(BY_NAME[name], shape, opts.warmup, opts.steps, round_index, round_index == 0)
            results.append(result)
            step_ms = result.step_time * 1000
            print(f"round {round_index + 1}/{opts.rounds}  {name:18s} {step_ms:8.1f} ms/step", flush=True)
    meta["load_average_after"] = load_average()
    meta["wall_s"] = time.perf_counter() - started
    return _report(results, shape, meta, opts.out)


def _report(results: list[RunResult], shape: ModelShape, meta: dict[str, Any], out: str) -> dict[str, Any]:
    summary = summarise(results, shape)
    report = {"meta": meta, **summary, "runs": [asdict(r) for r in results]}
    print()
    print(markdown(summary, meta))
    write_report(report, out, announce=True)
    return report


if __name__ == "__main__":
    main()
