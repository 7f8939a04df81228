"""``benchmarks/real_model.py`` runs (smoke mode: a tiny Llama, five records a file), and what it counts is exact.

Timings and answers are the benchmark's business; the split, the parameter counts, the steps and
the files it writes are checked here.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers import load_benchmark


@pytest.mark.slow
def test_smoke_run_writes_the_report_table_and_plot(tmp_path):
    bench = load_benchmark("real_model")
    out, table, plot = tmp_path / "r.json", tmp_path / "t.md", tmp_path / "p.png"
    report = bench.main(["--smoke", "--threads", "1", "--out", str(out), "--table", str(table), "--plot", str(plot),
                         "--only", "head,last2,last2_cache,full,lisa,gradual"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["variants"]
    assert list(rows) == ["head", "last2", "last2_cache", "full", "lisa", "gradual"]
    # Smoke model: 12 layers, hidden 32, intermediate 64, 4 heads of 8 (2 for k/v), vocabulary of the SFT demo.
    vocab = 138
    layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32
    assert rows["last2"]["trainable_params"] == rows["last2_cache"]["trainable_params"] == 2 * layer
    assert rows["head"]["trainable_params"] == vocab * 32  # the tied head is the embedding matrix
    assert rows["full"]["trainable_params"] == rows["lisa"]["trainable_params"] == 12 * layer + vocab * 32 + 32
    assert rows["gradual"]["trainable_params"] == 6 * layer + 32  # and the final norm, from step 0
    # 5 records a file, every fifth held out: 4 + 4 train (batch 4: 2 steps an epoch), 1 + 1 evaluate.
    assert {r["steps"] for r in rows.values()} == {2}
    for r in rows.values():
        assert len(r["curve"]) == 2  # eval_on_start, then after the one epoch
        assert r["paraphrases"] == 2 and r["general"] == 2
        assert r["estimated_peak_mib"] > 0 and r["train_s"] > 0
    assert rows["last2_cache"]["eval_loss_before"] == rows["last2"]["eval_loss_before"]
    text = table.read_text()
    assert text.count("\n") == 3 + len(rows) and "| base model (no training) |" in text
    assert plot.stat().st_size > 0 and os.path.basename(str(plot)).endswith(".png")
