"""Mixed precision: the decision table (fake hardware), refusals, dtypes in the plan, a bf16 CPU run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ProbeIs, TokenDataset, load_benchmark, losses, make_training_args
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

from hf_llama_strategies import (
    PLAN_FILE_NAME,
    HardwareProbe,
    InvalidArgumentError,
    StrategyArguments,
    StrategyCallback,
    StrategyPlan,
    StrategyTrainer,
    build_plan,
    hookimpl,
    resolve_training_arguments,
)
from hf_llama_strategies.context import RunContext
from hf_llama_strategies.core.decisions import decision_nbytes
from hf_llama_strategies.core.precision import decide_precision
from hf_llama_strategies.core.units import compact_bytes as human_bytes


def decision_of(training_args, strategy, model=None, probe=None, fixed=False):
    """The precision decision a run with these arguments makes (its context's)."""
    return RunContext.create(strategy, training_args, model=model, probe=probe, fixed=fixed).precision


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU = HardwareProbe("cpu", "test CPU", bf16_supported=True)
A100 = HardwareProbe("cuda", "NVIDIA A100", bf16_supported=True, tf32_supported=True, compute_capability=(8, 0))
T4 = HardwareProbe("cuda", "Tesla T4", bf16_supported=False, compute_capability=(7, 5))
HARDWARE = {"cpu": CPU, "a100": A100, "t4": T4}
F32, BF16, F16 = "torch.float32", "torch.bfloat16", "torch.float16"
SHORT = {"fp32": F32, "bf16": BF16, "fp16": F16}
LAST = ("model.layers.2.", "model.norm.", "lm_head.")  # what trainable_layers="-1:" trains


def tensor_bytes(model: torch.nn.Module, names) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in names)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(path)
    return str(path)


def load(path: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").train()


# -- the decision table ----------------------------------------------------------------------

# (hardware, precision, model dtype) -> autocast mode, or the refused option and a message fragment.
TABLE = {
    ("cpu", "auto", "fp32"): "fp32",
    ("cpu", "auto", "bf16"): "bf16",
    ("cpu", "auto", "fp16"): "fp32",
    ("cpu", "bf16", "fp32"): "bf16",
    ("cpu", "bf16", "bf16"): "bf16",
    ("cpu", "bf16", "fp16"): "bf16",
    ("cpu", "fp16", "fp32"): ("precision", "bf16 or fp32 on a CPU"),
    ("cpu", "fp16", "bf16"): ("precision", "bf16 or fp32 on a CPU"),
    ("cpu", "fp16", "fp16"): ("precision", "bf16 or fp32 on a CPU"),
    ("cpu", "fp32", "fp32"): "fp32",
    ("cpu", "fp32", "bf16"): "fp32",
    ("cpu", "fp32", "fp16"): "fp32",
    ("a100", "auto", "fp32"): "bf16",
    ("a100", "auto", "bf16"): "bf16",
    ("a100", "auto", "fp16"): "bf16",
    ("a100", "bf16", "fp16"): "bf16",
    ("a100", "fp16", "fp16"): "fp16",
    ("a100", "fp16", "bf16"): "fp16",
    ("a100", "fp32", "bf16"): "fp32",
    ("t4", "auto", "fp32"): "fp16",
    ("t4", "auto", "bf16"): "fp16",
    ("t4", "auto", "fp16"): "fp16",
    ("t4", "bf16", "fp32"): ("precision", "Tesla T4 (cuda, compute capability 7.5), which has no native bf16"),
    ("t4", "bf16", "bf16"): ("precision", "Tesla T4 (cuda, compute capability 7.5), which has no native bf16"),
    ("t4", "fp16", "fp16"): "fp16",
    ("t4", "fp16", "bf16"): "fp16",
    ("t4", "fp32", "fp16"): "fp32",
}


@pytest.mark.parametrize("hardware, precision, loaded", sorted(TABLE))
def test_decision_table(tmp_path, hardware, precision, loaded):
    expected = TABLE[hardware, precision, loaded]
    probe = HARDWARE[hardware]
    strategy = StrategyArguments(precision=precision, trainable_layers="-1:")
    model = tiny_model("llama").to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[loaded]))
    args = make_training_args(tmp_path)
    if isinstance(expected, tuple):
        option, fragment = expected
        with pytest.raises(InvalidArgumentError) as info:
            resolve_training_arguments(args, strategy, model=model, probe=probe)
        assert info.value.option == option
        assert str(info.value).startswith(f"{option}={precision!r} is not valid")
        assert fragment in str(info.value)
        return

    resolved = resolve_training_arguments(args, strategy, model=model, probe=probe)
    assert (resolved.fp16, resolved.bf16) == (expected == "fp16", expected == "bf16")
    assert resolved.mixed_precision == ("no" if expected == "fp32" else expected)
    assert (args.fp16, args.bf16) == (False, False), "the input must not be modified"

    # The plan asks the hardware of the hfls_hardware_probe hook, as resolve_training_arguments did.
    plan = build_plan(model, strategy, resolved, plugins=[ProbeIs(probe)])
    setting = plan.settings["precision"]
    assert setting["mode"] == expected and setting["device"] == probe.describe()
    assert setting["reason"].startswith("auto: " if precision == "auto" else f"precision={precision}")
    frozen_expected = F32 if expected == "fp32" else SHORT[loaded]
    for d in plan:
        want = F32 if d.trainable else frozen_expected
        assert d.dtype == want, (d.name, d.trainable, d.dtype)
    assert {d.trainable for d in plan} == {True, False}


def test_auto_reasons_say_why():
    reasons = {
        name: decide_precision(StrategyArguments(precision="auto"), probe=probe).reason
        for name, probe in HARDWARE.items()
    }
    assert reasons["a100"] == "auto: NVIDIA A100 (cuda, compute capability 8.0) supports bf16"
    assert reasons["t4"].startswith("auto: Tesla T4 (cuda, compute capability 7.5) has no native bf16, so fp16")
    assert reasons["cpu"].startswith("auto: CPU, where autocast pays only with AMX")
    mps = HardwareProbe("mps", "mps", bf16_supported=False)
    other = decide_precision(StrategyArguments(precision="auto"), probe=mps)
    assert other.mode == "fp32"


def test_explicit_flags_win_under_auto(tmp_path):
    args = make_training_args(tmp_path, bf16=True)
    resolved = resolve_training_arguments(args, StrategyArguments(precision="auto"), probe=A100)
    assert resolved.bf16 and not resolved.fp16
    assert decision_of(resolved, StrategyArguments(precision="auto"), probe=A100).reason == (
        "auto: TrainingArguments.bf16=true"
    )
    fp16 = resolve_training_arguments(
        make_training_args(tmp_path, fp16=True), StrategyArguments(precision="auto"), probe=A100
    )
    assert fp16.fp16 and not fp16.bf16


def test_resolving_twice_gives_the_same_decision(tmp_path, saved_llama):
    model = load(saved_llama, torch.bfloat16)
    strategy = StrategyArguments(trainable_layers="-1:", precision="auto")
    once = resolve_training_arguments(make_training_args(tmp_path), strategy, model=model, probe=CPU)
    twice = resolve_training_arguments(once, strategy, probe=CPU)
    # No decision rides on the arguments: the second resolution reads the flags the first set.
    assert decision_of(once, strategy, probe=CPU) == decision_of(twice, strategy, probe=CPU) is not None
    assert decision_of(make_training_args(tmp_path), strategy, model=model, probe=CPU).reason.startswith(
        "auto: CPU, and the model was loaded in bfloat16"
    )
    assert twice.bf16 and twice.use_cpu and (once.bf16, once.fp16, once.use_cpu) == (twice.bf16, twice.fp16, True)


def test_use_cpu_is_set_for_bf16_on_a_cpu(tmp_path):
    args = make_training_args(tmp_path, use_cpu=False)
    if args.device.type != "cpu":
        pytest.skip("needs a machine without an accelerator")
    resolved = resolve_training_arguments(args, StrategyArguments(precision="bf16"), probe=CPU)
    assert resolved.use_cpu and resolved.bf16 and resolved.mixed_precision == "bf16"
    assert "use_cpu set to true" in decision_of(args, StrategyArguments(precision="bf16"), probe=CPU).notes[0]


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probe, strategy, training, option, fragments",
    [
        (CPU, dict(precision="auto"), dict(fp16=True), "fp16",
         ["fp16=True is not valid", "bf16 or fp32 on a CPU", "fp32 without a word"]),
        (T4, dict(precision="auto"), dict(bf16=True), "bf16", ["bf16=True is not valid", "Tesla T4", "no native bf16"]),
        (A100, dict(precision="bf16"), dict(fp16=True), "precision",
         ["precision='bf16' is not valid", "'fp16' or 'auto' when TrainingArguments.fp16=true"]),
        (A100, dict(precision="fp32"), dict(bf16=True), "precision",
         ["'bf16' or 'auto' when TrainingArguments.bf16=true"]),
        (A100, dict(pure_bf16=True), dict(fp16=True), "pure_bf16",
         ["pure_bf16=True is not valid", "false when TrainingArguments.fp16=true"]),
        (T4, dict(pure_bf16=True), {}, "pure_bf16", ["pure_bf16=True is not valid", "no native bf16"]),
        (CPU, dict(frozen_dtype="bf16"), {}, "frozen_dtype",
         ["frozen_dtype='bf16' is not valid", "'fp32' or unset when training in fp32 (auto: CPU",
          "fails on mixed dtypes"]),
        (T4, dict(frozen_dtype="bf16"), {}, "frozen_dtype", ["'fp16', 'fp32' or unset under fp16 autocast"]),
    ],
)
def test_refusals_name_the_option_the_value_and_what_is_valid(tmp_path, probe, strategy, training, option, fragments):
    args = make_training_args(tmp_path, **training)
    with pytest.raises(InvalidArgumentError) as info:
        resolve_training_arguments(args, StrategyArguments(**strategy), probe=probe)
    assert info.value.option == option
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "deepspeed, strategy, option, fragment",
    [
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}, dict(pure_bf16=True), "pure_bf16",
         "false with DeepSpeed ZeRO-3"),
        ({"fp16": {"enabled": True}}, dict(precision="bf16"), "precision",
         "'fp16' or 'auto' when the DeepSpeed config sets fp16.enabled=true"),
        ({"fp16": {"enabled": True}}, dict(pure_bf16=True), "pure_bf16",
         "false when the DeepSpeed config sets fp16.enabled=true"),
    ],
)
def test_deepspeed_configs_are_read_without_deepspeed(tmp_path, deepspeed, strategy, option, fragment):
    # deepspeed is not installed: TrainingArguments cannot process the config, so set it after
    # construction; the refusal must come before anything re-runs __post_init__.
    for config in (deepspeed, str(tmp_path / "ds.json")):
        (tmp_path / "ds.json").write_text(json.dumps(deepspeed))
        args = make_training_args(tmp_path)
        args.deepspeed = config
        with pytest.raises(InvalidArgumentError) as info:
            resolve_training_arguments(args, StrategyArguments(**strategy), probe=A100)
        assert info.value.option == option and fragment in str(info.value)


def test_deepspeed_flag_against_trainer_flag_and_auto_follows_deepspeed(tmp_path):
    args = make_training_args(tmp_path, bf16=True)
    args.deepspeed = {"fp16": {"enabled": True}}
    with pytest.raises(InvalidArgumentError, match="'bf16' enabled, or 'auto', when TrainingArguments.bf16=true"):
        decide_precision(StrategyArguments(precision="auto"), args, probe=A100)
    args = make_training_args(tmp_path)
    args.deepspeed = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    decision = decide_precision(StrategyArguments(pure_bf16=True), args, probe=A100)
    assert decision.mode == "bf16" and decision.bf16
    assert any("DeepSpeed manages parameter dtypes" in n for n in decision.notes)
    args.deepspeed = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
    assert decide_precision(StrategyArguments(precision="auto"), args, probe=T4).mode == "fp16"


def test_tf32_is_training_arguments_key_checked_against_the_hardware(tmp_path):
    parser = HfArgumentParser((TrainingArguments, StrategyArguments))
    training, strategy = parser.parse_dict(
        {"output_dir": str(tmp_path), "use_cpu": True, "tf32": False, "precision": "BF16", "frozen_dtype": "bfloat16"}
    )
    assert training.tf32 is False and strategy.precision == "bf16" and strategy.frozen_dtype == "bf16"
    args = make_training_args(tmp_path)
    args.tf32 = True  # TrainingArguments itself refuses tf32=True on this CPU machine at construction
    with pytest.raises(InvalidArgumentError) as info:
        resolve_training_arguments(args, StrategyArguments(precision="auto"), probe=T4)
    assert info.value.option == "tf32" and "Ampere" in str(info.value)
    assert decide_precision(StrategyArguments(precision="auto"), args, probe=A100).tf32 is True


@pytest.mark.parametrize(
    "kwargs, option, fragment",
    [
        (dict(precision="fp8"), "precision", "'auto', 'bf16', 'fp16' or 'fp32'"),
        (dict(frozen_dtype="int8"), "frozen_dtype", "'bf16', 'fp16', 'fp32' or unset"),
        (dict(pure_bf16="yes"), "pure_bf16", "true or false"),
        (dict(pure_bf16=True, precision="fp16"), "pure_bf16", "false with precision=fp16"),
        (dict(pure_bf16=True, precision="fp32"), "pure_bf16", "false with precision=fp32"),
        (dict(pure_bf16=True, frozen_dtype="fp32"), "frozen_dtype", "'bf16' or unset with pure_bf16"),
        (dict(precision="bf16", frozen_dtype="fp16"), "frozen_dtype", "'bf16', 'fp32' or unset under bf16 autocast"),
        (dict(precision="fp32", frozen_dtype="bf16"), "frozen_dtype", "'fp32' or unset when training in fp32"),
    ],
)
def test_bad_precision_options_fail_at_construction(kwargs, option, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        StrategyArguments(**kwargs)
    assert info.value.option == option and fragment in str(info.value)


class FakeT4:
    @hookimpl
    def hfls_hardware_probe(self, training_args):
        return T4


def test_probe_hook_reaches_strategy_trainer_and_refuses_before_writing(tmp_path, lm_dataset):
    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match="Tesla T4"):
        StrategyTrainer(
            model=tiny_model("llama"), args=make_training_args(out), train_dataset=lm_dataset,
            strategy_args=StrategyArguments(precision="bf16"), strategy_plugins=[FakeT4()],
        )
    assert not out.exists()


def test_real_probe_on_this_machine():
    probe = HardwareProbe.detect()
    assert probe.cuda_available == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert probe.device_type == "cpu" and probe.bf16_supported and not probe.tf32_supported


# -- dtypes applied ---------------------------------------------------------------------------


def test_bf16_amp_run_of_a_bf16_loaded_llama(tmp_path, saved_llama, capsys):
    """The issue's CPU criterion, and bit for bit what the same setup does by hand in a plain Trainer."""
    data = TokenDataset(n=8, seed=3)
    strategy = StrategyArguments(trainable_layers="-1:", precision="auto")  # CPU + bf16 model -> bf16 autocast
    ours = load(saved_llama, torch.bfloat16)
    frozen = [n for n, _ in ours.named_parameters() if not n.startswith(LAST)]
    fp32_frozen_bytes = tensor_bytes(load(saved_llama, torch.float32), frozen)
    args = make_training_args(tmp_path / "ours", max_steps=12, learning_rate=5e-3)
    trainer = StrategyTrainer(model=ours, args=args, train_dataset=data, strategy_args=strategy)
    # The arguments the user holds say what runs: resolved in place.
    assert trainer.args is args and args.bf16 and trainer.accelerator.native_amp
    trainer.train()

    params = dict(ours.named_parameters())
    assert {n: p.dtype for n, p in params.items() if n.startswith(LAST)} == {
        n: torch.float32 for n in params if n.startswith(LAST)
    }
    assert {params[n].dtype for n in frozen} == {torch.bfloat16}
    assert tensor_bytes(ours, frozen) * 2 == fp32_frozen_bytes
    assert {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]} == {torch.float32}
    run = losses(trainer)
    assert len(run) == 12 and all(math.isfinite(x) for x in run)
    assert run[-1] < run[0] - 0.5 and sum(run[-3:]) < sum(run[:3])

    # The same by hand: bf16 load, freeze, upcast the trainable parameters, bf16=True.
    theirs = load(saved_llama, torch.bfloat16)
    for name, param in theirs.named_parameters():
        param.requires_grad_(name.startswith(LAST))
        if name.startswith(LAST):
            param.data = param.data.float()
    plain = Trainer(
        model=theirs, args=make_training_args(tmp_path / "plain", max_steps=12, learning_rate=5e-3, bf16=True),
        train_dataset=data,
    )
    plain.train()
    assert losses(plain) == run
    assert all(torch.equal(p, dict(theirs.named_parameters())[n]) for n, p in params.items())

    # Plan: dtype and memory per block, the decision, measured bytes in the JSON.
    table = capsys.readouterr().out
    assert "memory" in table.splitlines()[1]
    assert "precision: bf16 autocast, trainable float32, frozen as loaded" in table
    saved = json.loads((tmp_path / "ours" / PLAN_FILE_NAME).read_text())
    assert saved["settings"]["precision"]["mode"] == "bf16"
    by_name = {p["name"]: p for p in saved["parameters"]}
    assert sum(by_name[n]["nbytes"] for n in frozen) == tensor_bytes(ours, frozen)
    assert by_name["lm_head.weight"]["dtype"] == F32
    assert by_name["lm_head.weight"]["dtype_reason"] == "bf16 autocast: trainable parameters keep fp32 master weights"
    assert by_name["model.layers.0.mlp.up_proj.weight"]["dtype"] == BF16


def test_frozen_dtype_casts_frozen_parameters_of_an_fp32_model(tmp_path):
    model = tiny_model("llama")
    strategy = StrategyArguments(trainable_layers="-1:", precision="bf16", frozen_dtype="bf16")
    resolved = resolve_training_arguments(make_training_args(tmp_path), strategy, model=model, probe=CPU)
    frozen = [n for n, _ in model.named_parameters() if not n.startswith(LAST)]
    before = tensor_bytes(model, frozen)
    plan = build_plan(model, strategy, resolved)
    plan.apply(model)
    assert tensor_bytes(model, frozen) * 2 == before
    assert {p.dtype for n, p in model.named_parameters() if n.startswith(LAST)} == {torch.float32}
    assert plan["model.embed_tokens.weight"].dtype_reason == "frozen_dtype=bf16"
    # The table's memory is the tensors': total row == sum of measured bytes.
    total = tensor_bytes(model, [n for n, _ in model.named_parameters()])
    assert sum(decision_nbytes(d) for d in plan) == total
    total_row = next(line for line in plan.table().splitlines() if line.startswith("total"))
    assert total_row.split()[-1] == human_bytes(total)


def test_pure_bf16_trains_bf16_weights_on_cpu(tmp_path, saved_llama):
    model = load(saved_llama, torch.float32)
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path, max_steps=4), train_dataset=TokenDataset(n=8),
        strategy_args=StrategyArguments(pure_bf16=True, trainable_layers="-1:", print_plan=False),
    )
    trainer.train()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for g in trainer.optimizer.param_groups for p in g["params"]} == {torch.bfloat16}
    assert trainer.args.bf16 and all(math.isfinite(x) for x in losses(trainer))
    assert trainer.strategy_plan.settings["precision"]["reason"].startswith("pure_bf16")


def test_fp32_training_of_a_half_model_casts_everything_and_says_so(tmp_path, saved_llama):
    model = load(saved_llama, torch.bfloat16)
    strategy = StrategyArguments(precision="fp32", trainable_layers="-1:")
    resolved = resolve_training_arguments(make_training_args(tmp_path), strategy, model=model, probe=CPU)
    plan = build_plan(model, strategy, resolved)
    plan.apply(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert any("loaded in bfloat16 are cast to float32" in n for n in plan.notes)


def test_casting_keeps_ties_and_leaves_buffers_alone():
    model = tiny_model("gemma").to(torch.bfloat16)
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is embeddings
    buffers = {n: (b, b.dtype) for n, b in model.named_buffers()}
    strategy = StrategyArguments(trainable_layers="-1:", train_head=True, precision="bf16")
    plan = build_plan(model, strategy, resolve_training_arguments(make_training_args("unused"), strategy, probe=CPU))
    plan.apply(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight is head
    assert head.dtype == torch.float32 and head.requires_grad
    assert {n: (b, b.dtype) for n, b in model.named_buffers()} == buffers
    # Applying again changes nothing: same storage for every parameter.
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    plan.apply(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


def test_measured_bytes_are_dropped_when_a_dtype_is_replanned():
    model = tiny_model("llama")
    plan = build_plan(model, StrategyArguments(precision="auto"))
    plan.apply(model)
    assert plan["lm_head.weight"].nbytes == model.lm_head.weight.numel() * 4
    plan.set(["lm_head.weight"], "test", dtype=BF16)
    assert plan["lm_head.weight"].nbytes is None and plan["lm_head.weight"].dtype_reason == "test"
    assert decision_nbytes(plan["lm_head.weight"]) == model.lm_head.weight.numel() * 2
    assert plan["lm_head.weight"].reason == "default: full fine-tuning"


def test_plan_round_trip_keeps_settings_and_measured_bytes(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    strategy = StrategyArguments(trainable_layers="-1:", precision="bf16")
    plan = build_plan(model, strategy, resolve_training_arguments(make_training_args(tmp_path), strategy, probe=CPU))
    plan.apply(model)
    plan.save(str(tmp_path))
    again = StrategyPlan.load(str(tmp_path))
    assert again.to_dict() == plan.to_dict()
    assert again.settings["precision"]["mode"] == "bf16"
    assert again.table() == plan.table()


# -- StrategyCallback on a plain Trainer ------------------------------------------------------


def test_callback_refuses_precision_the_trainer_arguments_do_not_say(tmp_path, lm_dataset):
    with pytest.raises(InvalidArgumentError) as info:
        Trainer(
            model=tiny_model("llama"), args=make_training_args(tmp_path), train_dataset=lm_dataset,
            callbacks=[StrategyCallback(StrategyArguments(precision="bf16"))],
        )
    message = str(info.value)
    assert info.value.option == "precision" and "resolve_training_arguments" in message
    assert "(fp16=False, bf16=False)" in message


@pytest.mark.parametrize("recipe", ["resolved_arguments", "run_context"])
def test_callback_equals_strategy_trainer_with_resolved_arguments(tmp_path, saved_llama, recipe):
    data = TokenDataset(n=8, seed=3)
    strategy = StrategyArguments(trainable_layers="-1:", precision="auto", print_plan=False)
    a = load(saved_llama, torch.bfloat16)
    trainer = StrategyTrainer(model=a, args=make_training_args(tmp_path / "a"), train_dataset=data,
                              strategy_args=strategy)
    trainer.train()
    b = load(saved_llama, torch.bfloat16)
    if recipe == "resolved_arguments":
        args = resolve_training_arguments(make_training_args(tmp_path / "b"), strategy, model=b)
        callback = StrategyCallback(strategy)
    else:
        context = RunContext.create(strategy, make_training_args(tmp_path / "b"), model=b)
        args = context.resolve_training_arguments()
        callback = StrategyCallback(strategy, context=context)
    plain = Trainer(model=b, args=args, train_dataset=data, callbacks=[callback])
    plain.train()
    assert losses(plain) == losses(trainer)
    assert {n: p.dtype for n, p in a.named_parameters()} == {n: p.dtype for n, p in b.named_parameters()}
    ours, theirs = callback.plan.settings["precision"], trainer.strategy_plan.settings["precision"]
    if recipe == "run_context":
        assert ours == theirs  # the very decision StrategyTrainer recorded
        return
    # Given only the resolved arguments the callback decides from their flags (no decision rides
    # on the arguments): the same run, worded from the flags.
    decides = ("mode", "fp16", "bf16", "pure_bf16", "frozen_dtype", "device", "model_dtype", "zero3", "tf32")
    assert {k: ours[k] for k in decides} == {k: theirs[k] for k in decides}
    assert ours["reason"] == "auto: TrainingArguments.bf16=true"


def test_callback_auto_follows_the_trainer_flags(tmp_path, saved_llama, lm_dataset):
    model = load(saved_llama, torch.bfloat16)
    callback = StrategyCallback(StrategyArguments(trainable_layers="-1:", precision="auto"))
    Trainer(model=model, args=make_training_args(tmp_path), train_dataset=lm_dataset, callbacks=[callback])
    setting = callback.plan.settings["precision"]
    assert setting["mode"] == "fp32" and setting["reason"].startswith("auto with StrategyCallback")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# -- the GPU check script ---------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_script_skips_cleanly_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_precision_check.py")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIPPED: no CUDA device")


def test_gpu_check_script_cpu_smoke_run(capsys):
    module = load_benchmark("gpu_precision_check")
    assert module.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: CPU (smoke run)")
    assert "bf16/fp32 ratio" in out


def test_resolved_arguments_are_a_dataclass_copy(tmp_path):
    args = make_training_args(tmp_path)
    resolved = resolve_training_arguments(args, StrategyArguments(precision="bf16"), probe=CPU)
    assert resolved is not args and dataclasses.is_dataclass(resolved)
    assert {k: v for k, v in resolved.to_dict().items() if k not in ("bf16",)} == {
        k: v for k, v in args.to_dict().items() if k not in ("bf16",)
    }
