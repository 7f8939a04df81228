"""DeepSpeed: ZeRO-2 and ZeRO-3 on 2 CPU processes; ZeRO-3 keeps the dtypes as loaded.

DeepSpeed 0.19 runs on a CPU through its CPU accelerator and gloo. The launched script
loads the model after the ``TrainingArguments`` exist, so that under ZeRO-3 it is built
inside ``deepspeed.zero.Init`` and the plan is made for partitioned parameters (their
local tensors are empty), as for a model too large for one device. Runs in fp32 are
compared with a 1-process run without DeepSpeed (tolerance of ``test_integration_ddp.py``);
the bf16 ZeRO-3 run checks dtypes: no fp32 upcast by the plan, fp32 master weights in
DeepSpeed's optimizer.
"""

from __future__ import annotations

import os
import types

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'hf-llama-strategies[deepspeed]'")

import torch  # noqa: E402
from distributed_integration import check_matches_reference, launch, reference, save_model  # noqa: E402
from helpers import make_training_args  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_llama_strategies import (  # noqa: E402
    InvalidArgumentError,
    PlanError,
    StrategyArguments,
    StrategyCallback,
    StrategyTrainer,
    build_plan,
)
from hf_llama_strategies.context import resolve_training_arguments  # noqa: E402
from hf_llama_strategies.core.hardware import HardwareProbe  # noqa: E402

ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}
ZERO2 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
A100 = HardwareProbe("cuda", "A100", bf16_supported=True, tf32_supported=True, compute_capability=(8, 0))


@pytest.fixture(autouse=True)
def no_deepspeed_leak():
    """Leave no DeepSpeed state behind for the tests that follow.

    A Trainer built with a DeepSpeed config sets ACCELERATE_USE_DEEPSPEED=true in the
    environment for good (accelerate), and TrainingArguments with a ZeRO-3 config make every
    model built while they live be built inside deepspeed.zero.Init (a global weak reference
    in transformers; a failed test's traceback can keep them alive).
    """
    environ = dict(os.environ)
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    out = tmp_path_factory.mktemp("deepspeed")
    save_model(str(out))
    scenarios = ["zero2", "zero3", "zero3_bf16", "zero2_dynamic_unchecked"]
    dumps = launch("torchrun", out, scenarios)
    return dumps, {s: reference(s, out) for s in ("zero2", "zero3", "zero2_dynamic_unchecked")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", ["zero2", "zero3"])
def test_zero_two_processes_match_one_process_without_deepspeed(launched, scenario):
    dumps, references = launched
    rank0, rank1 = dumps[scenario]
    assert rank0["wrapped"] == "DeepSpeedEngine"
    # DeepSpeed wrapped the optimizer the plan built: its groups are the plan's.
    assert [g for g, _ in rank0["groups"]] == ["default", "default.no_decay", "head"]
    assert [g for g, _ in references[scenario]["groups"]] == ["default", "default.no_decay", "head"]
    assert rank0["partitioned_when_planned"] is (scenario == "zero3")
    assert rank0["plan"]["num_trainable"] == references[scenario]["plan"]["num_trainable"] > 0
    check_matches_reference(rank0, rank1, references[scenario])


@pytest.mark.multiprocess
def test_zero3_bf16_keeps_parameters_as_loaded_and_deepspeed_keeps_fp32_masters(launched):
    dumps, references = launched
    rank0, rank1 = dumps["zero3_bf16"]
    plan = rank0["plan"]
    assert rank0["partitioned_when_planned"] and plan["settings"]["precision"]["zero3"] is True
    assert plan["settings"]["precision"]["mode"] == "bf16"
    # No upcast: every parameter, trainable or frozen, is planned (and kept) in bf16 ...
    assert {p["dtype"] for p in plan["parameters"]} == {"torch.bfloat16"}
    assert rank0["dtypes"] == ["torch.bfloat16"]
    # ... and DeepSpeed's optimizer holds the fp32 master weights.
    assert rank0["master_dtypes"] == ["torch.float32"]
    moved = {n for n in rank0["final"] if not torch.equal(rank0["final"][n], rank0["initial"][n])}
    assert moved == {n for n in rank0["final"] if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.",
                                                                "lm_head."))}
    assert all(torch.equal(rank0["final"][n], rank1["final"][n]) for n in rank0["final"])
    # A sanity check of the course of training: bf16 autocast against the fp32 run
    # (the bf16 mantissa alone is ~4e-3 relative); measured within 2e-4.
    assert rank0["losses"] == pytest.approx(references["zero3"]["losses"], rel=1e-2)


# -- the plan's dtypes under DeepSpeed, without launching ----------------------------------


def ds_args(tmp_path, config, **overrides):
    return resolve_training_arguments(
        make_training_args(tmp_path, deepspeed={**config}, **overrides), StrategyArguments(), probe=A100
    )


def plan_dtypes(plan, trainable: bool) -> set[str]:
    return {d.dtype for d in plan if d.trainable is trainable}


def test_zero3_skips_the_fp32_upcast_that_zero2_makes(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    options = StrategyArguments(trainable_layers="-1:", precision="bf16")
    zero3 = build_plan(model, options, ds_args(tmp_path, ZERO3, bf16=True))
    assert plan_dtypes(zero3, True) == plan_dtypes(zero3, False) == {"torch.bfloat16"}
    assert zero3.settings["precision"]["zero3"] is True
    assert "DeepSpeed ZeRO-3 casts them and keeps fp32 master weights" in zero3.settings["precision"]["summary"]
    assert any(note.startswith("DeepSpeed ZeRO-3: no parameter is cast here") for note in zero3.notes)
    # Control: ZeRO-2 (DeepSpeed casts the module itself too, but unpartitioned parameters
    # are ours until then) gets the usual fp32 master weights.
    zero2 = build_plan(model, options, ds_args(tmp_path, ZERO2, bf16=True))
    assert plan_dtypes(zero2, True) == {"torch.float32"} and plan_dtypes(zero2, False) == {"torch.bfloat16"}
    assert zero2.settings["precision"]["zero3"] is False


def test_zero3_from_accelerate_launch_is_recognised(tmp_path):
    # `accelerate launch --use_deepspeed --zero_stage 3`: TrainingArguments hold accelerate's
    # plugin and no `deepspeed` value.
    args = make_training_args(tmp_path, bf16=True)
    args.deepspeed_plugin = types.SimpleNamespace(hf_ds_config=types.SimpleNamespace(config=ZERO3))
    plan = build_plan(tiny_model("llama").to(torch.bfloat16), StrategyArguments(trainable_layers="-1:"),
                      resolve_training_arguments(args, StrategyArguments(), probe=A100))
    assert plan_dtypes(plan, True) == {"torch.bfloat16"}


def test_zero3_refuses_a_frozen_dtype_it_could_not_keep(tmp_path):
    expected = r"frozen_dtype='bf16' is not valid: expected unset with DeepSpeed ZeRO-3"
    with pytest.raises(InvalidArgumentError, match=expected):
        build_plan(tiny_model("llama"), StrategyArguments(trainable_layers="-1:", frozen_dtype="bf16"),
                   ds_args(tmp_path, ZERO3, bf16=True))


def test_a_partitioned_parameter_is_never_cast(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    plan = build_plan(model, StrategyArguments(precision="fp32"))  # would upcast everything
    model.model.norm.weight.ds_id = 0  # what deepspeed.zero.Init marks a partitioned parameter with
    with pytest.raises(PlanError, match="DeepSpeed ZeRO-3 has partitioned it"):
        plan.apply(model)


# -- dynamic plans: refused under DeepSpeed --------------------------------------------------

LISA = dict(lisa_layers=1, lisa_interval_steps=2)


def test_dynamic_plans_are_refused_under_deepspeed_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    args = make_training_args(out, deepspeed={**ZERO2})
    with pytest.raises(PlanError, match=r"which DeepSpeed cannot follow \(TrainingArguments.deepspeed\)") as info:
        StrategyTrainer(model=tiny_model("llama"), args=args, strategy_args=StrategyArguments(**LISA))
    assert "Train dynamic schedules with DDP or FSDP2" in str(info.value)
    assert not out.exists()
    gradual = StrategyArguments(unfreeze_schedule="gradual", unfreeze_interval_steps=2)
    with pytest.raises(PlanError, match="DeepSpeed cannot follow"):
        Trainer(model=tiny_model("llama"), args=make_training_args(out, deepspeed={**ZERO2}),
                callbacks=[StrategyCallback(gradual)])
    # Static plans are fine.
    StrategyTrainer(model=tiny_model("llama"), args=make_training_args(out, deepspeed={**ZERO2}),
                    strategy_args=StrategyArguments(trainable_layers="-1:"))


@pytest.mark.multiprocess
def test_control_without_the_refusal_deepspeed_moves_layers_the_schedule_left_inactive(launched):
    dumps, references = launched
    rank0, _ = dumps["zero2_dynamic_unchecked"]
    ref = references["zero2_dynamic_unchecked"]
    assert rank0["wrapped"] == "DeepSpeedEngine" and rank0["batches"][0] + dumps["zero2_dynamic_unchecked"][1][
        "batches"][0] == ref["batches"][0]
    never_trained = [n for n in ref["final"] if torch.equal(ref["final"][n], ref["initial"][n])]
    assert any(".layers." in n for n in never_trained)  # LISA left a layer out (3 draws of 1 in 4 layers)
    moved_anyway = [n for n in never_trained if not torch.equal(rank0["final"][n], rank0["initial"][n])]
    assert moved_anyway
