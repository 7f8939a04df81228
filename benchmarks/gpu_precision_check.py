"""GPU check of the mixed-precision strategy. Runs only where a CUDA device exists.

Without CUDA it prints ``SKIPPED: ...`` and exits 0. On a GPU:

1. **fp16 on a model loaded in fp16.** A small Llama is saved and loaded back with
   ``dtype=torch.float16``; ``StrategyTrainer`` trains its last two layers with
   ``precision: fp16``. It must train (finite losses) with fp32 trainable parameters,
   fp16 frozen ones and a loss scaler, and without "Attempting to unscale FP16
   gradients". As a control, a plain ``Trainer`` with ``fp16=True`` on the same fp16
   load is expected to hit that error (so the check checks something).
2. **bf16 vs fp32 step time.** The same architecture, full fine-tuning, ``precision: bf16``
   and ``precision: fp32`` side by side in this process; the median step time (CUDA
   synchronised, after warm-up steps) of each and their ratio are printed. Skipped with a
   message where the GPU has no native bf16 (where ``precision: bf16`` is refused).

``--cpu-smoke`` runs part 2 on the CPU with a tiny model (bf16 autocast vs fp32) so that the
code path is exercised by the test suite; its ratio says nothing about GPUs.

Usage::

    python benchmarks/gpu_precision_check.py [--steps 20] [--warmup 5] [--hidden 1024]
        [--layers 8] [--seq 512] [--batch 8]

Exit status: 0 when every check passed or was skipped, 1 when a check failed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also when loaded by path

from _common import RandomTokens  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # noqa: E402

UNSCALE_ERROR = "Attempting to unscale FP16 gradients"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, synchronised with the GPU."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def make_config(opts: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=opts.vocab,
        hidden_size=opts.hidden,
        intermediate_size=int(opts.hidden * 2.75),
        num_hidden_layers=opts.layers,
        num_attention_heads=max(1, opts.hidden // 64),
        num_key_value_heads=max(1, opts.hidden // 64),
        max_position_embeddings=max(opts.seq, 64),
        tie_word_embeddings=False,
    )


def saved_model(opts: argparse.Namespace, directory: str) -> str:
    torch.manual_seed(0)
    LlamaForCausalLM(make_config(opts)).save_pretrained(directory)
    return directory


def load(path: str, dtype: torch.dtype) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).train()


def training_args(out: str, opts: argparse.Namespace, steps: int, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=out, report_to="none", save_strategy="no", max_steps=steps, logging_steps=1,
        per_device_train_batch_size=opts.batch, learning_rate=1e-4, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, use_cpu=opts.cpu_smoke,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def check_fp16(path: str, opts: argparse.Namespace, out: str) -> bool:
    """Part 1. True when it passed."""
    data = RandomTokens(opts.batch * 4, opts.seq, opts.vocab)
    model = load(path, torch.float16)
    strategy = StrategyArguments(precision="fp16", trainable_layers="-2:", print_plan=False)
    ok = True
    try:
        trainer = StrategyTrainer(
            model=model, args=training_args(out + "/fp16", opts, 8), train_dataset=data, strategy_args=strategy
        )
        trainer.train()
    except ValueError as exc:
        print(f"FAIL fp16: training a model loaded in fp16 with precision fp16 raised: {exc}")
        return False
    run = losses(trainer)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    print(f"fp16: losses {[round(x, 4) for x in run]}; trainable {trained}, frozen {frozen}, "
          f"loss scaler {'on' if trainer.accelerator.scaler is not None else 'off'}")
    if not run or not all(math.isfinite(x) for x in run):
        print("FAIL fp16: non-finite or missing losses")
        ok = False
    if trained != {torch.float32} or frozen != {torch.float16} or trainer.accelerator.scaler is None:
        print("FAIL fp16: expected fp32 trainable, fp16 frozen parameters and a loss scaler")
        ok = False

    # Control: the plain Trainer on the same load, last two layers unfrozen by hand.
    control = load(path, torch.float16)
    trainable = (f"model.layers.{opts.layers - 2}.", f"model.layers.{opts.layers - 1}.", "model.norm.", "lm_head.")
    for name, param in control.named_parameters():
        param.requires_grad_(name.startswith(trainable))
    try:
        Trainer(model=control, args=training_args(out + "/control", opts, 2, fp16=True), train_dataset=data).train()
        print("note: the control (plain Trainer, fp16=True, fp16 weights) trained without the unscale error")
    except ValueError as exc:
        if UNSCALE_ERROR not in str(exc):
            raise
        print(f"control: plain Trainer with fp16=True on fp16 weights fails as expected ({exc})")
    if ok:
        print(f"PASS fp16: a model loaded in fp16 trains with precision fp16, no '{UNSCALE_ERROR}'")
    return ok


def time_steps(path: str, opts: argparse.Namespace, out: str, precision: str) -> tuple[float, list[float]]:
    model = load(path, torch.float32)
    strategy = StrategyArguments(precision=precision, print_plan=False)
    timer = StepTimer()
    args = training_args(f"{out}/{precision}", opts, opts.warmup + opts.steps)
    data = RandomTokens(opts.batch * (opts.warmup + opts.steps), opts.seq, opts.vocab)
    # StrategyTrainer maps precision onto fp16/bf16 (resolve_training_arguments) at construction.
    trainer = StrategyTrainer(model=model, args=args, train_dataset=data, strategy_args=strategy, callbacks=[timer])
    assert trainer.args.bf16 == (precision == "bf16") and not trainer.args.fp16
    trainer.train()
    steps = timer.times[opts.warmup:]
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return statistics.median(steps), steps


def compare_bf16_fp32(path: str, opts: argparse.Namespace, out: str) -> Optional[float]:
    """Part 2: median bf16 step time / median fp32 step time."""
    bf16, _ = time_steps(path, opts, out, "bf16")
    fp32, _ = time_steps(path, opts, out, "fp32")
    ratio = bf16 / fp32
    tf32 = "on" if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32 else "off"
    print(f"step time (median of {opts.steps} after {opts.warmup} warm-up): bf16 {bf16 * 1e3:.1f} ms, "
          f"fp32 {fp32 * 1e3:.1f} ms (tf32 {tf32}); bf16/fp32 ratio {ratio:.3f}")
    return ratio


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cpu-smoke", action="store_true", help="run the timing part on the CPU, tiny sizes")
    opts = parser.parse_args(argv)
    if opts.cpu_smoke:
        opts.hidden, opts.layers, opts.seq, opts.batch, opts.vocab = 64, 2, 16, 2, 128
        opts.steps, opts.warmup = min(opts.steps, 3), min(opts.warmup, 1)
    return opts


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse(argv)
    if not torch.cuda.is_available() and not opts.cpu_smoke:
        print("SKIPPED: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU.")
        return 0
    device = "CPU (smoke run)" if opts.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = saved_model(opts, tmp + "/model")
        if not opts.cpu_smoke:
            ok = check_fp16(path, opts, tmp)
        if opts.cpu_smoke or torch.cuda.is_bf16_supported(including_emulation=False):
            compare_bf16_fp32(path, opts, tmp)
        else:
            print(f"SKIPPED bf16 timing: {device} has no native bf16 (precision: bf16 is refused there)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
