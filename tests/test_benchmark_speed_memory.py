"""``benchmarks/speed_memory.py`` runs (smoke mode: a tiny model, one round), and its exact figures hold.

Timings are not checked here (they are the benchmark's business); bytes are exact and are.
"""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("speed_memory")


def test_smoke_run_writes_exact_memory_figures(bench, tmp_path):
    out = tmp_path / "speed_memory.json"
    variants = "plain_full,ours_lf_ckpt,plain_lf_ckpt,ours_l2nh_ckpt_r"
    report = bench.main(["--smoke", "--threads", "1", "--variants", variants, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["variants"]
    assert sorted(rows) == sorted(variants.split(","))
    for name, row in rows.items():
        # AdamW keeps two fp32 moments per trainable parameter and nothing for frozen ones.
        assert row["adamw_moment_bytes"] == 8 * row["trainable_params"], name
        assert row["optimizer_params"] == row["trainable_params"], name
        assert row["grad_bytes"] == 4 * row["trainable_params"], name
        assert row["frozen_params_with_grad"] == [], name
    assert rows["ours_lf_ckpt"]["trainable_params"] < rows["plain_full"]["trainable_params"]
    # The frozen prefix keeps no activations on our path; transformers' keeps its checkpoint inputs.
    assert rows["ours_lf_ckpt"]["saved_activation_bytes"] < rows["plain_lf_ckpt"]["saved_activation_bytes"]
    # Counted work: skipping the frozen prefix saves its recomputation and its backward.
    assert rows["ours_lf_ckpt"]["flops_per_step"] < rows["plain_lf_ckpt"]["flops_per_step"]
    labels = [c["label"] for c in report["comparisons"]]
    assert labels == ["ours / transformers' default, last 2 layers only, checkpointing"]
    assert report["meta"]["machine"]["torch_threads"] == 1


def test_flop_floors(bench):
    shape = bench.ModelShape()
    assert bench.flop_floor(shape, "full", None) == 1.0
    modes = (None, "reentrant", "non_reentrant")
    floors = {(f, c): bench.flop_floor(shape, f, c) for f in ("lf", "l2nh") for c in modes}
    # Checkpointing recomputes every layer for full fine-tuning but only two here.
    assert floors["lf", "reentrant"] < floors["lf", "non_reentrant"] < floors["lf", None]
    # Training the head costs its weight gradient on top.
    assert floors["lf", None] < floors["l2nh", None]
    # Against a count written out for the default shape (multiply-accumulates per token).
    layer = 4 * 256 * 256 + 3 * 256 * 688 + 2 * 128 * 256
    head = 256 * 4096
    forward = 8 * layer + head
    lf = forward + head + 4 * layer - 3 * 256 * 256
    assert floors["lf", None] == pytest.approx(lf / (3 * forward), rel=1e-12)
    assert floors["lf", "reentrant"] == pytest.approx((lf + 2 * layer) / (3 * forward + 8 * layer), rel=1e-12)
    short = layer - 256 * 688  # a non-reentrant recomputation stops before down_proj
    assert floors["lf", "non_reentrant"] == pytest.approx((lf + 2 * short) / (3 * forward + 8 * short), rel=1e-12)


def test_strategy_trainer_does_the_same_work_as_plain_trainer(bench, tmp_path):
    report = bench.main(["--smoke", "--threads", "1", "--variants", "plain_full,ours_full", "--out", ""])
    plain, ours = report["variants"]["plain_full"], report["variants"]["ours_full"]
    assert ours["flops_per_step"] == plain["flops_per_step"] > 0
    assert ours["aten_calls_per_step"] == plain["aten_calls_per_step"] > 0
    # A handful of callback calls per step, against thousands in the step itself.
    assert plain["python_calls_per_step"] <= ours["python_calls_per_step"] <= plain["python_calls_per_step"] * 1.01
    (comparison,) = report["comparisons"]
    assert comparison["flops_ratio"] == 1.0
