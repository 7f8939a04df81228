"""FSDP: FSDP2 trained on 2 CPU processes; FSDP1's ``use_orig_params`` set or demanded.

FSDP2 (torch 2.13's ``fully_shard``) runs on CPU with gloo, but accelerate 1.15 enables
FSDP only for GPU-like distributed types and silently uses DDP with ``use_cpu``; the
launched script turns accelerate's FSDP plugin on for its CPU run (see
``CpuFsdpStrategyTrainer`` in ``distributed_integration.py``), from where the Trainer's
and accelerate's own FSDP2 code runs. The run is compared with a 1-process run without
FSDP, with the tolerance of ``test_integration_ddp.py`` (same global batch, same rows):
a static plan with a head rate, and LISA (``requires_grad`` toggled on sharded parameters).

FSDP1 cannot run on CPU here: accelerate refuses to build its FSDP1 plugin without a GPU
("no available devices"), so its ``use_orig_params`` check is tested at construction,
where it fails (or sets the value) before anything is written.
``benchmarks/gpu_fsdp_check.py`` trains FSDP1 and FSDP2 on GPUs.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
from distributed_integration import check_matches_reference, launch, reference
from helpers import TokenDataset, load_benchmark, make_training_args, strategy
from tiny_models import tiny_model
from transformers import TrainerControl, TrainerState

from hf_llama_strategies import (
    InvalidArgumentError,
    StrategyCallback,
    StrategyTrainer,
    build_plan,
)
from hf_llama_strategies.core.distributed import DistributedSettings, check_distributed


def check_fsdp_arguments(plan, args, can_set):
    """The run's one distributed check, on the settings of ``args``; what the run must set."""
    return check_distributed(plan, DistributedSettings.read(args), can_set=can_set)


FSDP1_NO_ORIG = dict(fsdp=True, fsdp_config={"version": 1, "use_orig_params": False})


@pytest.fixture(autouse=True)
def no_environment_leak():
    # The FSDP1 check may set FSDP_USE_ORIG_PARAMS, and accelerate records FSDP settings in
    # the environment: none of it may reach the tests that follow.
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)


SCENARIOS = ["fsdp2", "fsdp2_dynamic"]


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> dict[str, tuple[list[dict], dict]]:
    out = tmp_path_factory.mktemp("fsdp2")
    dumps = launch("torchrun", out, SCENARIOS)
    return {s: (dumps[s], reference(s, out)) for s in SCENARIOS}


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_two_processes_shard_and_match_one_process(fsdp2, scenario):
    (rank0, rank1), ref = fsdp2[scenario]
    assert rank0["wrapped"].startswith("FSDP") and rank0["param_types"] == ["DTensor"]
    assert ref["wrapped"] == "LlamaForCausalLM"
    # The plan's groups reached the optimizer over the sharded parameters; a plan without groups
    # of its own (LISA alone) gets the Trainer's optimizer, with its two unnamed groups.
    expected = ["default", "default.no_decay", "head"] if scenario == "fsdp2" else [None, None]
    assert [g for g, _ in rank0["groups"]] == expected
    assert rank0["groups"] == ref["groups"]
    check_matches_reference(rank0, rank1, ref)


@pytest.mark.multiprocess
def test_fsdp2_frozen_parameters_stay_and_trainable_ones_move(fsdp2):
    (rank0, _), _ = fsdp2["fsdp2"]
    moved = {n for n in rank0["final"] if not torch.equal(rank0["final"][n], rank0["initial"][n])}
    expected = {n for n in rank0["final"] if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.",
                                                           "lm_head."))}
    assert moved == expected


# -- FSDP1: use_orig_params ---------------------------------------------------------------


def test_fsdp1_without_use_orig_params_is_refused_for_a_freezing_plan(tmp_path):
    out = tmp_path / "out"
    args = make_training_args(out, **FSDP1_NO_ORIG)
    with pytest.raises(InvalidArgumentError) as info:
        StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=TokenDataset(n=8),
                        strategy_args=strategy(trainable_layers="-1:"))
    message = str(info.value)
    assert message.startswith("fsdp_config.use_orig_params=False is not valid: expected true with FSDP1")
    assert "FlatParameter" in message and "FSDP2" in message
    assert not out.exists()


def test_fsdp1_without_use_orig_params_is_refused_by_the_callback_too(tmp_path):
    # accelerate's FSDP1 plugin needs a GPU to be built, so a CPU Trainer with these
    # arguments cannot exist: the callback's hook is called as the Trainer would.
    args = make_training_args(tmp_path, **FSDP1_NO_ORIG)
    callback = StrategyCallback(strategy(lisa_layers=1))
    with pytest.raises(InvalidArgumentError, match="fsdp_config.use_orig_params"):
        callback.on_init_end(args, TrainerState(), TrainerControl(), model=tiny_model("llama"))


@pytest.mark.parametrize("options", [dict(head_lr=5e-3), dict()], ids=["layerwise_lr", "full"])
def test_fsdp1_without_use_orig_params_is_fine_when_everything_trains(tmp_path, options):
    args = make_training_args(tmp_path, **FSDP1_NO_ORIG)
    plan = build_plan(tiny_model("llama"), strategy(**options), args)
    check_fsdp_arguments(plan, args, can_set=False)


@pytest.mark.parametrize("config", [{"version": 1}, {"version": 2}, {"version": 2, "use_orig_params": False}])
def test_fsdp1_default_and_fsdp2_pass(tmp_path, config):
    args = make_training_args(tmp_path, fsdp=True, fsdp_config=dict(config))
    plan = build_plan(tiny_model("llama"), strategy(trainable_layers="-1:"), args)
    check_fsdp_arguments(plan, args, can_set=False)


@pytest.mark.parametrize("value, outcome", [(None, "set"), ("false", "refused"), ("true", "kept")])
def test_fsdp1_from_accelerate_launch_environment(tmp_path, monkeypatch, value, outcome):
    # What `accelerate launch --use_fsdp --fsdp_version 1 [--fsdp_use_orig_params ...]` exports.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", value or "")  # restored (or removed) after the test
    if value is None:
        monkeypatch.delenv("FSDP_USE_ORIG_PARAMS")
    plan = build_plan(tiny_model("llama"), strategy(lisa_layers=1))
    if outcome == "refused":
        with pytest.raises(InvalidArgumentError, match=r"FSDP_USE_ORIG_PARAMS \(accelerate launch"):
            check_fsdp_arguments(plan, make_training_args(tmp_path), can_set=True)
        return
    if value is None:
        # Too late to set it (a callback inside a built Trainer): refused, naming the default.
        with pytest.raises(InvalidArgumentError, match=r"'unset \(false\)'"):
            check_fsdp_arguments(plan, make_training_args(tmp_path), can_set=False)
    fixes = check_fsdp_arguments(plan, make_training_args(tmp_path), can_set=True)
    # Unset: the run sets use_orig_params on its own accelerator's FSDP plugin, never in os.environ.
    assert fixes.fsdp_use_orig_params is (value is None)
    assert os.environ.get("FSDP_USE_ORIG_PARAMS") == value
    plugin = types.SimpleNamespace(use_orig_params=False)
    fixes.apply_to(types.SimpleNamespace(ddp_handler=None, state=types.SimpleNamespace(fsdp_plugin=plugin)))
    assert plugin.use_orig_params is (value is None)
    # StrategyTrainer builds its accelerator (which, on one CPU process, ignores FSDP) and leaves the environment.
    StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path), strategy_args=strategy(lisa_layers=1))
    assert os.environ.get("FSDP_USE_ORIG_PARAMS") == value


def test_gpu_check_script_skips_cleanly_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_fsdp_check.py itself")
    module = load_benchmark("gpu_fsdp_check")
    assert module.main([]) == 0
    assert capsys.readouterr().out.startswith("SKIPPED: no CUDA device")
