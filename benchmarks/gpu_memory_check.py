#!/usr/bin/env python
"""``estimate_training_memory`` against what CUDA reports: the margin to add on a GPU.

For each configuration of ``benchmarks/memory_estimate.py``'s grid, on a GPU: the estimate (a dry
run on fake tensors) beside ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over
one steady-state optimizer step of the same ``StrategyTrainer`` run (peak statistics reset when
the step's batches are fetched), and the memory the process holds beyond what PyTorch reserved
(CUDA context, library handles: ``mem_get_info`` used minus reserved). Printed as ratios; the
margin to add is ``reserved / estimate`` plus the context.

What the dry run cannot see: the CUDA context, the caching allocator's rounding, reserve and
fragmentation, library workspaces (cuBLAS, cuDNN, flash attention). Target: within 5% of
``max_memory_allocated``.

Usage::

    python benchmarks/gpu_memory_check.py            # on a machine with CUDA; skips (exit 0) without
    python benchmarks/gpu_memory_check.py --smoke    # on the CPU: the same plumbing, no CUDA figures
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memory_estimate as bench  # noqa: E402
from _common import write_report  # noqa: E402

# Big enough that activations and weights dwarf the allocator's 512-byte rounding and 2 MiB blocks.
GPU_SHAPE = bench.Shape(layers=8, hidden=1024, intermediate=2816, heads=16, kv_heads=8, vocab=32000)
GPU_CASES = ["full", "full_ckpt", "last2", "last2_ckpt", "head_only", "full_long", "lisa2", "bf16_last2",
             "bf16_full_ckpt", "accum2", "accum2_last2_ckpt", "adafactor_full"]


def measure_on_cuda(case: bench.Case, shape: bench.Shape) -> dict[str, Any]:
    """One ``StrategyTrainer`` run on the GPU; CUDA's peak statistics over its steady-state step."""
    from transformers import LlamaForCausalLM
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.config()).train()
    step = bench.measure_step_for(case, shape)
    data = bench.RandomTokens(case.batch * case.accumulation * (step + 2), case.seq, shape.vocab)
    with tempfile.TemporaryDirectory() as out:
        args = bench.training_args(case, out, steps=step + 2, use_cpu=False)
        trainer = bench.MeasuringTrainer(
            model=model, args=args, train_dataset=data, strategy_args=bench.strategy_args(case),
            measure_step=step, cuda=True,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        free, total = torch.cuda.mem_get_info()
        outside = (total - free) - torch.cuda.memory_reserved()
    return {"max_allocated": trainer.cuda_max_allocated, "max_reserved": trainer.cuda_max_reserved,
            "tensor_peak": trainer.counter.peak if trainer.counter else None, "outside_pytorch": outside}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="on the CPU: 2 tiny configurations, no CUDA figures")
    parser.add_argument("--cases", default=",".join(GPU_CASES), help="comma list of configurations")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "gpu_memory_check.json"), help="JSON file ('' for none)")
    opts = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    by_name = {c.name: c for c in bench.GRID}
    if opts.smoke:
        rows = bench.run_grid([by_name["full"], by_name["last2_ckpt"]], bench.SMOKE_SHAPE, rss=False)
        print("CPU smoke run: the estimate and the tensor-level measurement ran; no CUDA figures.")
        return {"skipped": False, "smoke": True, "grid": rows}
    if not torch.cuda.is_available():
        print("gpu_memory_check: skipped, no CUDA device.")
        return {"skipped": True}
    rows = []
    for name in opts.cases.split(","):
        case = by_name[name]
        estimate = bench.estimate_case(case, GPU_SHAPE, use_cpu=False)
        cuda = measure_on_cuda(case, GPU_SHAPE)
        row = {
            "case": name, "estimate_bytes": estimate.peak_bytes, **cuda,
            "estimate_over_allocated": estimate.peak_bytes / cuda["max_allocated"],
            "reserved_over_estimate": cuda["max_reserved"] / estimate.peak_bytes,
        }
        rows.append(row)
        print(f"{name:20s} estimate/allocated {row['estimate_over_allocated']:.4f}  reserved/estimate "
              f"{row['reserved_over_estimate']:.4f}  outside PyTorch {cuda['outside_pytorch'] / 2**20:.0f} MiB",
              flush=True)
    report = {"skipped": False, "device": torch.cuda.get_device_name(), "shape": vars(GPU_SHAPE), "grid": rows}
    write_report(report, opts.out)
    return report


if __name__ == "__main__":
    main()
