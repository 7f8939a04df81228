"""``benchmarks/compare.py`` runs (smoke mode: a tiny model, one round), and its exact figures hold.

Timings are the benchmark's business; that every candidate equals its ``train`` run, and that a deep copy
is the loaded model byte for byte, are exact and checked here.
"""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.mark.slow
def test_smoke_run(tmp_path):
    bench = load_benchmark("compare")
    out = tmp_path / "compare.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["fresh_state"]["deepcopy_equals_load_byte_for_byte"] is True
    (only,) = report["rounds"]
    names = [c["name"] for c in only["candidates"]]
    # 3 layers: the last 25% is the last layer, the last 50% the last 2 (left out: the same run twice).
    assert names == ["head only", "last 2", "last 25%", "full"]
    for row in only["candidates"]:
        assert row["losses_equal"] and row["eval_losses_equal"], row["name"]
    assert [c["shared_prefix"] for c in only["candidates"]] == [True, True, True, False]
    assert only["shared_runs"] == [1, 2, 3] and only["shared_boundary"] == "the input of layers.1"
