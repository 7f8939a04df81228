"""Strategies under DDP, FSDP2 and DeepSpeed on CPU (gloo): run by the integration tests.

Not a test module itself. ``test_integration_ddp.py``, ``test_integration_fsdp.py`` and
``test_integration_deepspeed.py`` launch it with ``torchrun`` or ``accelerate launch``
(2 processes) and call :func:`run` in-process for the 1-process reference; every process
dumps ``OUT_DIR/<scenario>_rank<r>.pt`` (``<scenario>_reference.pt`` for the reference):
losses, initial and final parameters (gathered in full under FSDP2 and ZeRO-3), the
input ids of every micro-batch, the optimizer's groups and what wrapped the model.

The global batch is the same in every run: ``GLOBAL_BATCH`` rows per optimizer step,
split over the processes (2 x 2 rows, or 1 x 4 rows for the reference).

    torchrun --nproc_per_node 2 tests/distributed_integration.py OUT_DIR SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import TokenDataset, make_training_args  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyCallback, StrategyTrainer  # noqa: E402
from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache  # noqa: E402

GLOBAL_BATCH = 4
#: A directory of OUT_DIR: when present, the model is loaded from it (the tests save
#: ``tiny_model`` there for the DeepSpeed runs, so that ZeRO-3 loads it partitioned).
SAVED_MODEL = "tiny_llama"
MAX_STEPS = 6
NUM_LAYERS = 4
FREEZE_AND_HEAD_LR = dict(trainable_layers="-2:", head_lr=3e-3)
DS_BASE = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}

#: scenario -> (strategy options, how it trains, TrainingArguments added in the launched run)
SCENARIOS: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "static": (dict(trainable_layers="-2:"), "trainer", {}),
    "layerwise": (dict(layer_lr_decay=0.8, head_lr=3e-3), "trainer", {}),
    "dynamic": (dict(lisa_layers=1, lisa_interval_steps=2), "trainer", {}),
    # An unmodified Trainer with the callback and its optimizer factory.
    "callback": (FREEZE_AND_HEAD_LR, "callback", {}),
    "fsdp2": (
        FREEZE_AND_HEAD_LR,
        "fsdp",
        dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    ),
    "fsdp2_dynamic": (
        dict(lisa_layers=1, lisa_interval_steps=2),
        "fsdp",
        dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    ),
    # The negative control of the refusal of dynamic plans under DeepSpeed: the check is
    # switched off, and layers LISA leaves inactive move anyway.
    "zero2_dynamic_unchecked": (
        dict(lisa_layers=1, lisa_interval_steps=2), "unchecked",
        dict(deepspeed={**DS_BASE, "zero_optimization": {"stage": 2}}),
    ),
    "zero2": (FREEZE_AND_HEAD_LR, "trainer", dict(deepspeed={**DS_BASE, "zero_optimization": {"stage": 2}})),
    "zero3": (FREEZE_AND_HEAD_LR, "trainer", dict(deepspeed={**DS_BASE, "zero_optimization": {"stage": 3}})),
    # bf16 autocast: without ZeRO-3 the plan would upcast the trainable parameters to fp32.
    "zero3_bf16": (
        {**FREEZE_AND_HEAD_LR, "precision": "auto"},
        "trainer",
        dict(bf16=True, deepspeed={**DS_BASE, "zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}),
    ),
    # The frozen-prefix cache (last layer trains) and its uncached twin; "disk" shares one
    # directory (CACHE_DIR under OUT_DIR) between the ranks.
    "cache_off": (dict(trainable_layers="-1:"), "trainer", {}),
    "cache_memory": (dict(trainable_layers="-1:", frozen_prefix_cache="memory"), "trainer", {}),
    "cache_disk": (dict(trainable_layers="-1:", frozen_prefix_cache="disk"), "trainer", {}),
}
CACHE_DIR = "frozen_prefix_cache"
#: Training samples (TokenDataset(n=...)); 64 unless named: the cache scenarios' 8 samples make
#: the 6 steps 3 epochs, so that each rank meets its (reshuffled) samples again.
DATA_SIZE = {"cache_off": 8, "cache_memory": 8, "cache_disk": 8}


class RecordingMixin:
    """Records the input ids of every micro-batch this process trains on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.__dict__.setdefault("batches", []).append(inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


class RecordingStrategyTrainer(RecordingMixin, StrategyTrainer):
    pass


class RecordingTrainer(RecordingMixin, Trainer):
    pass


class CpuFsdpStrategyTrainer(RecordingStrategyTrainer):
    """Turns accelerate's FSDP plugin on in a CPU (gloo) run.

    accelerate 1.15 enables FSDP only for GPU-like distributed types: with ``use_cpu`` it
    silently wraps the model in DDP instead. torch 2.13's FSDP2 (``fully_shard``) itself
    runs on CPU with gloo, so the test switches the distributed type to FSDP once the
    accelerator exists; from there on it is the Trainer's and accelerate's FSDP2 path
    (``fsdp2_prepare_model``, optimizer parameters swapped to the sharded DTensors).
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and self.args.fsdp_plugin_args:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


def _full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, by its name in the unwrapped model (a collective under FSDP2/ZeRO-3)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in params}


def _disable_deepspeed_shm_op() -> None:
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel (a C++
    # build of minutes, with a compiler) at init; gloo does the same collectives.
    # (importlib: `import deepspeed.comm.torch as m` gives the torch package, which
    # deepspeed.comm re-exports under that name.)
    try:
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    ds_torch.build_shm_op = lambda: None


def run(scenario: str, out_dir: str, reference: bool = False, **overrides: Any) -> str:
    """Train ``scenario`` and dump what the tests compare; returns the dump's path.

    ``reference``: one process, the whole global batch, no FSDP or DeepSpeed.
    ``overrides``: more ``TrainingArguments`` (a control run with another learning rate).
    """
    options, kind, extra = SCENARIOS[scenario]
    world_size = 1 if reference else int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0 if reference else int(os.environ.get("RANK", "0"))
    extra = {} if reference else extra
    if "deepspeed" in extra:
        _disable_deepspeed_shm_op()
    # TrainingArguments first: with ZeRO-3 they decide how a model loaded afterwards is built.
    args = make_training_args(
        os.path.join(out_dir, f"{scenario}_{'reference' if reference else 'run'}"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        **{**extra, **overrides},
    )
    if "deepspeed" in extra:
        import deepspeed

        # What TrainingArguments does when DeepSpeed runs on a GPU; with use_cpu it leaves
        # DeepSpeed's communication to deepspeed.initialize, too late for zero.Init below.
        deepspeed.init_distributed(dist_backend="gloo")
    saved = os.path.join(out_dir, SAVED_MODEL)
    if os.path.isdir(saved):
        # Under ZeRO-3 from_pretrained loads inside deepspeed.zero.Init: partitioned from the start.
        model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").train()
    else:
        model = tiny_model("llama", num_hidden_layers=NUM_LAYERS).train()
    initial = _full_parameters(model)
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if options.get("frozen_prefix_cache") == "disk":
        options = {**options, "frozen_prefix_cache_dir": os.path.join(out_dir, CACHE_DIR)}
    strategy = StrategyArguments(print_plan=False, **options)
    data = TokenDataset(n=DATA_SIZE.get(scenario, 64))
    if kind == "callback":
        callback = StrategyCallback(strategy)
        trainer: Trainer = RecordingTrainer(
            model=model, args=args, train_dataset=data, callbacks=[callback],
            optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs(),
        )
    else:
        if kind == "unchecked" and not reference:
            import hf_llama_strategies.core.distributed

            hf_llama_strategies.core.distributed._check_deepspeed = lambda plan, settings: None
        cls = CpuFsdpStrategyTrainer if kind == "fsdp" and not reference else RecordingStrategyTrainer
        trainer = cls(model=model, args=args, train_dataset=data, strategy_args=strategy)
    trainer.train()
    cache = get_frozen_prefix_cache(trainer.model)
    final = _full_parameters(trainer.model)
    groups = [(g.get("name"), len(g["params"])) for g in trainer.optimizer.param_groups]
    # DeepSpeed's ZeRO optimizers keep their own (fp32) master partitions of the trainable parameters.
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    masters = getattr(inner, "fp32_partitioned_groups_flat", None) or getattr(
        inner, "single_partition_of_fp32_groups", None
    )
    dump = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "initial": initial,
        "final": final,
        "batches": trainer.batches,
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "param_types": sorted({type(p).__name__ for p in trainer.model_wrapped.parameters()}),
        "groups": groups,
        "partitioned_when_planned": partitioned,
        "plan": trainer.strategy_plan.to_dict() if hasattr(trainer, "strategy_plan") else None,
        "master_dtypes": sorted({str(t.dtype) for t in masters}) if masters else None,
        "dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        # accelerate launch passes its settings to the processes as ACCELERATE_* variables.
        "launched_by_accelerate": "ACCELERATE_MIXED_PRECISION" in os.environ,
        "cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses,
                                             "prepass_samples": cache.prepass_samples,
                                             "loaded_entries": cache.loaded_entries, "entries": len(cache.entries)},
    }
    path = os.path.join(out_dir, f"{scenario}_{'reference' if reference else f'rank{rank}'}.pt")
    if reference or rank < world_size:
        torch.save(dump, path)
    if not reference and world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return path


def save_model(out_dir: str) -> str:
    """Save the tiny model the scenarios train into ``OUT_DIR/tiny_llama`` (before launching)."""
    path = os.path.join(out_dir, SAVED_MODEL)
    tiny_model("llama", num_hidden_layers=NUM_LAYERS).save_pretrained(path)
    return path


# -- the tests' side: launching and comparing --------------------------------------------
# Tolerances of a 2-process run against the 1-process reference: see test_integration_ddp.py.
LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-4
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def launch_command(launcher: str, out_dir: str, scenarios: list[str]) -> list[str]:
    script = [os.path.join(HERE, "distributed_integration.py"), out_dir, *scenarios]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    # --multi_gpu is accelerate's torchrun-style launcher; the script's use_cpu=True makes
    # the processes use gloo on the CPU (--cpu alone would start a single process).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]


def launch(launcher: str, out_dir, scenarios: list[str], timeout: int = 300) -> dict[str, list[dict]]:
    """Run the scenarios in 2 processes; return ``{scenario: [rank 0 dump, rank 1 dump]}``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]),
               # No user-level accelerate config file may leak into the launch.
               HF_HOME=str(out_dir / "hf_home"))
    result = subprocess.run(launch_command(launcher, str(out_dir), scenarios), env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {s: [torch.load(out_dir / f"{s}_rank{r}.pt") for r in (0, 1)] for s in scenarios}


def reference(scenario: str, out_dir, **overrides) -> dict:
    """The scenario in this process: 1 process, the whole global batch."""
    return torch.load(run(scenario, str(out_dir), reference=True, **overrides))


def check_matches_reference(rank0: dict, rank1: dict, ref: dict) -> None:
    """What every 2-process run must satisfy against its 1-process reference."""
    import pytest

    assert rank0["world_size"] == 2 and ref["world_size"] == 1
    # The same rows at every step: rank 0's micro-batch then rank 1's is the reference's batch.
    assert len(ref["batches"]) == MAX_STEPS
    assert [a + b for a, b in zip(rank0["batches"], rank1["batches"])] == ref["batches"]
    assert rank0["batches"] != rank1["batches"]
    assert rank0["groups"] == rank1["groups"]
    # Logged losses are means over the processes: the same on both ranks.
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == MAX_STEPS
    assert rank0["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL, abs=0)
    for name, final in rank0["final"].items():
        assert torch.equal(final, rank1["final"][name]), f"{name} differs between ranks"
        assert torch.equal(rank0["initial"][name], ref["initial"][name])
        trained = not torch.equal(ref["final"][name], ref["initial"][name])
        if trained:
            assert not torch.equal(final, rank0["initial"][name]), f"{name} trained in 1 process, not in 2"
            diff = (final - ref["final"][name]).abs().max().item()
            assert diff <= PARAM_ATOL, f"{name}: {diff} from the 1-process run"
        else:
            assert torch.equal(final, rank0["initial"][name]), f"{name} is frozen and must not move"


def main() -> None:
    out_dir, scenarios = sys.argv[1], sys.argv[2:]
    for scenario in scenarios:
        run(scenario, out_dir)


if __name__ == "__main__":
    main()
