"""``estimate_training_memory`` against real training steps, and ``plan --json`` / ``--fit``.

The real step is measured with the same live-storage counter over real tensors, during a steady-state
optimizer step of ``StrategyTrainer`` (``benchmarks/memory_estimate.py``'s ``MeasuringTrainer``).
The estimate runs the model's code on fake tensors; the two agree to the byte, but for the few
scalars the Trainer keeps (the loss it logs: 4 bytes per micro-batch).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from helpers import load_benchmark
from transformers import LlamaConfig, LlamaForCausalLM

from hf_llama_strategies import StrategyArguments, build_plan, cli, estimate_training_memory
from hf_llama_strategies.core.plugins import default_plugin_manager
from hf_llama_strategies.errors import InvalidArgumentError
from hf_llama_strategies.memory.dry_run import heaviest_step
from hf_llama_strategies.memory.fit import parse_size
from hf_llama_strategies.memory.static import estimate_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The Trainer's own scalars (the detached loss of each micro-batch) that a dry run has no reason to make.
TRAINER_SCALARS = 16


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("memory_estimate")


GRID = [
    "full", "full_ckpt", "last2", "last2_ckpt", "last2_ckpt_reentrant", "head_only", "full_long", "lisa2",
    "lisa2_keep_state", "gradual", "bf16_last2", "bf16_full_ckpt", "accum2", "sgd_last2",
]


@pytest.fixture(scope="module")
def measured(bench):
    """Peak live tensor bytes of a real steady-state step, by configuration (each measured once)."""
    cache = {}

    def measure(name):
        if name not in cache:
            case = next(c for c in bench.GRID if c.name == name)
            cache[name] = bench.measure_real_step(case, bench.SMOKE_SHAPE)["peak_bytes"]
        return cache[name]

    return measure


@pytest.mark.parametrize("name", GRID)
def test_estimate_equals_the_live_tensor_peak_of_a_real_step(bench, measured, name):
    case = next(c for c in bench.GRID if c.name == name)
    estimate = bench.estimate_case(case, bench.SMOKE_SHAPE)
    real = measured(name)
    assert estimate.simulated, estimate.fallback_reason
    assert 0 <= real - estimate.peak_bytes <= TRAINER_SCALARS, (name, estimate.peak_bytes, real)


@pytest.mark.parametrize(
    "name, ignored",
    [
        ("full_ckpt", dict(checkpointing=False)),
        ("last2_ckpt", dict(checkpointing=False)),
        ("last2_ckpt_reentrant", dict(reentrant=False)),
        ("bf16_last2", dict(bf16=False, strategy={"trainable_layers": "-2:"})),
        ("accum2", dict(accumulation=1)),
        ("lisa2", dict(strategy={"lisa_layers": 2, "lisa_interval_steps": 2, "lisa_drop_optimizer_state": False})),
        ("sgd_last2", dict(optim="adamw_torch")),
        ("last2", dict(strategy={})),
    ],
)
def test_an_option_the_estimate_ignored_gives_another_number(bench, measured, name, ignored):
    case = next(c for c in bench.GRID if c.name == name)
    real = measured(name)
    wrong = bench.estimate_case(dataclasses.replace(case, **ignored), bench.SMOKE_SHAPE).peak_bytes
    assert abs(real - wrong) > 1024, (name, ignored, real, wrong)


def tiny_llama(meta: bool = False, **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    return LlamaForCausalLM(config)


def args(tmp_path, **overrides):
    from helpers import make_training_args

    return make_training_args(tmp_path, **overrides)


def test_real_and_meta_models_give_the_same_estimate_and_the_model_is_untouched(tmp_path):
    real = tiny_llama()
    before = {n: (p.detach().clone(), p.requires_grad, p.dtype) for n, p in real.named_parameters()}
    strategy = StrategyArguments(trainable_layers="-1:", print_plan=False)
    training = args(tmp_path, per_device_train_batch_size=2)
    a = estimate_training_memory(real, strategy, training, seq_len=16)
    b = estimate_training_memory(tiny_llama(meta=True), strategy, training, seq_len=16)
    assert a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
    for name, param in real.named_parameters():
        value, requires_grad, dtype = before[name]
        assert torch.equal(param, value) and param.requires_grad == requires_grad and param.dtype == dtype
        assert param.grad is None
    # The figures add up: the blocks hold every weight, the frozen ones no gradient or state.
    assert sum(r.weights_bytes for r in a.blocks) == a.weights_bytes
    assert sum(r.optimizer_state_bytes for r in a.blocks) == a.optimizer_state_bytes > 0
    frozen = [r for r in a.blocks if r.block in ("embeddings", "layers.0", "layers.1")]
    assert frozen and all(r.gradients_bytes == r.optimizer_state_bytes == 0 for r in frozen)
    assert a.peak_bytes >= a.weights_bytes + a.optimizer_state_bytes + a.activations_bytes


def test_defaults_come_from_the_training_arguments(tmp_path):
    model = tiny_llama(meta=True)
    estimate = estimate_training_memory(model, None, args(tmp_path, per_device_train_batch_size=3,
                                                          gradient_accumulation_steps=2))
    assert (estimate.batch_size, estimate.seq_len, estimate.gradient_accumulation_steps) == (3, 128, 2)
    assert estimate.optimizer == "adamw_torch_fused"
    assert estimate.activation_checkpointing is False and estimate.autocast is None
    bigger = estimate_training_memory(model, None, args(tmp_path, per_device_train_batch_size=3,
                                                        gradient_accumulation_steps=2), batch_size=6)
    assert bigger.batch_size == 6 and bigger.peak_bytes > estimate.peak_bytes


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("batch_size", 2.5), ("seq_len", -1),
                                           ("seq_len", "128"), ("world_size", 0)])
def test_bad_batch_shape_is_refused_with_the_option_named(tmp_path, option, value):
    with pytest.raises(InvalidArgumentError, match=f"^{option}={value!r} is not valid: expected a positive integer"):
        estimate_training_memory(tiny_llama(meta=True), None, args(tmp_path), **{option: value})


class DataDependentLlama(LlamaForCausalLM):
    """A model whose forward reads a value (as custom remote code may): fake tensors have none."""

    def forward(self, input_ids=None, **kwargs):
        if int(input_ids.max()) < 0:
            raise AssertionError("never")
        return super().forward(input_ids=input_ids, **kwargs)


def test_a_model_that_cannot_run_on_fake_tensors_gets_the_static_estimate_and_the_reason(tmp_path):
    model = DataDependentLlama(tiny_llama(meta=True).config)
    strategy = StrategyArguments(trainable_layers="-1:", print_plan=False)
    training = args(tmp_path, optim="adamw_torch")
    estimate = estimate_training_memory(model, strategy, training, seq_len=16)
    static = estimate_memory(build_plan(model, strategy, training), "adamw_torch")
    assert not estimate.simulated and estimate.activations_bytes is None
    assert estimate.peak_bytes == static.total
    assert "could not run on fake tensors" in estimate.fallback_reason
    assert "DataDependent" in estimate.fallback_reason
    table = estimate.table()
    assert "not simulated: the step could not run on fake tensors" in table


def test_dynamic_plans_are_estimated_at_their_largest_active_set(tmp_path):
    model = tiny_llama(meta=True)
    gradual = build_plan(model, StrategyArguments(unfreeze_schedule="gradual", unfreeze_interval_steps=5))
    assert heaviest_step(gradual, default_plugin_manager()) == 15  # 3 layers, one more every 5 steps: all from step 15
    lisa = StrategyArguments(lisa_layers=1, lisa_interval_steps=4, print_plan=False)
    estimate = estimate_training_memory(model, lisa, args(tmp_path), seq_len=16)
    full = estimate_training_memory(model, None, args(tmp_path), seq_len=16)
    one_layer = next(r for r in full.blocks if r.block == "layers.0").optimizer_state_bytes
    # Two of three layers' optimizer state dropped (lisa_drop_optimizer_state).
    assert full.optimizer_state_bytes - estimate.optimizer_state_bytes == 2 * one_layer
    assert estimate.step % 4 == 0 and "largest active set" in estimate.notes[0]


def test_sharded_and_replicated_ranks(tmp_path):
    model = tiny_llama(meta=True)
    single = estimate_training_memory(model, None, args(tmp_path), seq_len=16)
    ddp = estimate_training_memory(model, None, args(tmp_path), seq_len=16, world_size=4)
    assert ddp.distributed == "DDP" and ddp.peak_bytes == single.peak_bytes + single.gradients_bytes
    fsdp_args = args(tmp_path)
    fsdp_args.fsdp, fsdp_args.fsdp_config = True, {"reshard_after_forward": True}
    fsdp = estimate_training_memory(model, None, fsdp_args, seq_len=16, world_size=4)
    assert fsdp.distributed == "FSDP full shard" and fsdp.single_device_peak_bytes == single.peak_bytes
    assert fsdp.weights_bytes == -(-single.weights_bytes // 4)
    assert fsdp.optimizer_state_bytes == -(-single.optimizer_state_bytes // 4)
    assert fsdp.peak_bytes < single.peak_bytes
    zero2 = args(tmp_path)
    zero2.deepspeed = {"zero_optimization": {"stage": 2}}
    z2 = estimate_training_memory(model, None, zero2, seq_len=16, world_size=4)
    assert z2.distributed == "DeepSpeed ZeRO-2" and z2.weights_bytes == single.weights_bytes
    assert fsdp.peak_bytes < z2.peak_bytes < single.peak_bytes


# -- the command line ---------------------------------------------------------------------------------


@pytest.fixture
def plan_yaml(tmp_path):
    config_dir = tmp_path / "tiny-llama"
    tiny_llama(meta=False).config.save_pretrained(config_dir)
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "model_config": str(config_dir), "trainable_layers": "-1:", "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_seq_length": 32, "optim": "adamw_torch",
        "output_dir": str(tmp_path / "o"),
    }), encoding="utf-8")
    return str(path)


def test_plan_shows_the_peak_beside_the_table(plan_yaml, capsys):
    assert cli.main(["plan", plan_yaml]) == 0
    out = capsys.readouterr().out
    assert "memory estimate (without activations)" in out
    assert "training memory per device, one optimizer step simulated on fake tensors (batch 4 x 32" in out
    assert "  peak " in out and "not counted (add a margin on a GPU): the CUDA context" in out


def test_plan_json_is_one_object_with_the_estimate(plan_yaml, capsys):
    assert cli.main(["plan", plan_yaml, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"plan", "hardware", "static_memory", "memory", "fit"} and data["fit"] is None
    # The hardware planned for: this machine's, whatever it is (no --device given).
    assert data["hardware"]["device_type"] and data["hardware"]["description"]
    memory = data["memory"]
    for key in ("peak_bytes", "weights_bytes", "gradients_bytes", "optimizer_state_bytes", "activations_bytes",
                "peak_phase", "blocks", "not_seen"):
        assert key in memory, key
    model_args, data_args, training, strategy, _ = cli.parse_config(cli.load_config_file(plan_yaml))
    direct = estimate_training_memory(tiny_llama(meta=True), strategy, training, seq_len=32)
    assert memory["peak_bytes"] == direct.peak_bytes and memory["simulated"] is True
    assert data["plan"]["num_layers"] == 3 and data["static_memory"]["optimizer"] == "adamw_torch"
    assert [b["block"] for b in memory["blocks"]] == ["embeddings", "layers.0", "layers.1", "layers.2", "norm", "head"]


def test_fit_finds_settings_that_fit_and_the_pasted_lines_give_that_peak(plan_yaml, capsys):
    import yaml

    base = cli.load_config_file(plan_yaml)
    _, _, training, strategy, _ = cli.parse_config(base)
    configured = estimate_training_memory(tiny_llama(meta=True), strategy, training, seq_len=32).peak_bytes
    budget = configured - 200 * 1024  # the configured batch does not fit
    assert cli.main(["plan", plan_yaml, "--json", "--fit", f"{budget}B"]) == 0
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert fit["current"]["peak_bytes"] == configured > budget
    assert fit["candidates"], fit
    work = [c["flops_per_step"] for c in fit["candidates"]]
    assert work == sorted(work)  # fastest first
    for candidate in fit["candidates"]:
        assert candidate["peak_bytes"] <= budget
        assert candidate["per_device_train_batch_size"] * candidate["gradient_accumulation_steps"] == 4
        pasted = dict(base, **yaml.safe_load("\n".join(candidate["yaml"])))
        _, _, t, s, _ = cli.parse_config(pasted)
        assert estimate_training_memory(tiny_llama(meta=True), s, t, seq_len=32).peak_bytes == candidate["peak_bytes"]
    assert cli.main(["plan", plan_yaml, "--fit", f"{budget}B"]) == 0
    out = capsys.readouterr().out
    assert "candidates that fit, fastest first" in out and "paste into the config (candidate 1):" in out
    assert "    per_device_train_batch_size: " in out and "does not fit" in out


def test_fit_says_what_comes_closest_when_nothing_fits(plan_yaml, capsys):
    assert cli.main(["plan", plan_yaml, "--fit", "256KiB", "--fit_optimizers", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits: the closest is batch 1 x 4 accumulated" in out and "sgd" in out
    assert " over 256.00 KiB" in out


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--fit", "80 gigs"], "--fit='80 gigs' is not valid: expected a positive memory size"),
        (["--fit", "0GiB"], "--fit='0GiB' is not valid"),
        (["--fit", "80"], "--fit='80' is not valid: expected a memory size with its unit"),
        (["--fit"], "--fit needs a memory size"),
        (["--world_size", "0"], "--world_size='0' is not valid: expected a positive integer"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0 is not valid: expected "),
        (["--max_seq_length", "-4"], "max_seq_length=-4 is not valid: expected "),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0 is not valid"),
        (["--fit_optimizers", "sgd"], "--fit_optimizers needs --fit"),
    ],
)
def test_bad_plan_input_exits_2_with_one_line(plan_yaml, capsys, extra, fragment):
    assert cli.main(["plan", plan_yaml, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hf-llama-strategies: error: ") and fragment in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30 == parse_size("80G") == parse_size("80 gib")
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1.5MiB") == 1536 * 1024 and parse_size("4096B") == 4096


@pytest.mark.parametrize("value", ["80", 80, "0.5"])
def test_parse_size_refuses_a_bare_number_saying_a_unit_is_needed(value):
    # `--fit 80` was taken as 80 bytes: nothing fits, and exit 0 said so.
    with pytest.raises(InvalidArgumentError, match=r"with its unit.*write .*GiB \(or B for bytes\)"):
        parse_size(value)


def test_benchmark_smoke_mode_runs_and_matches(bench, tmp_path):
    out = tmp_path / "memory_estimate.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["grid"] == report["grid"]
    assert [r["case"] for r in report["grid"]] == [c.name for c in bench.SMOKE_GRID]
    for row in report["grid"]:
        assert row["simulated"] and abs(row["ratio"] - 1) < 1e-4, row


def test_gpu_memory_check_skips_without_cuda_and_has_a_cpu_smoke_mode(capsys):
    module = load_benchmark("gpu_memory_check")
    if not torch.cuda.is_available():
        assert module.main(["--out", ""]) == {"skipped": True}
        assert "skipped, no CUDA device" in capsys.readouterr().out
    report = module.main(["--smoke", "--out", ""])
    assert report["smoke"] and [r["case"] for r in report["grid"]] == ["full", "last2_ckpt"]
    assert all(abs(r["ratio"] - 1) < 1e-4 for r in report["grid"])


def test_frozen_prefix_cache_gets_the_static_estimate_and_nothing_is_written(tmp_path):
    # The cache's hook fingerprints the prefix's real weights, which fake tensors do not have.
    directory = tmp_path / "cache"
    strategy = StrategyArguments(trainable_layers="-1:", frozen_prefix_cache="disk",
                                 frozen_prefix_cache_dir=str(directory), print_plan=False)
    estimate = estimate_training_memory(tiny_llama(meta=True), strategy, args(tmp_path / "out"), seq_len=16)
    assert not estimate.simulated and "could not run on fake tensors" in estimate.fallback_reason
    assert not directory.exists() and not (tmp_path / "out").exists()
