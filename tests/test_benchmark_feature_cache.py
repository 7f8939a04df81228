"""``benchmarks/feature_cache.py`` runs (smoke mode: a tiny model, one round), and its exact figures hold.

Timings are the benchmark's business; the cache's counts and bytes are exact and are checked here.
"""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.mark.slow
def test_smoke_run(tmp_path):
    bench = load_benchmark("feature_cache")
    out = tmp_path / "feature_cache.json"
    report = bench.main(["--smoke", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["variants"]
    shape = bench.speed.SMOKE_SHAPE
    samples, epochs = 8, bench.EPOCHS
    # One fp32 row of hidden states per sample and token.
    expected_bytes = samples * shape.seq * shape.hidden * 4
    for name in ("head_memory", "last2_memory", "head_disk_cold"):
        assert rows[name]["cache_bytes"] == expected_bytes, name
        assert (rows[name]["misses"], rows[name]["hits"]) == (samples, samples * epochs), name
        assert rows[name]["prepass_samples"] == samples, name
    # The warm run reads every sample from disk and computes none.
    warm = rows["head_disk_warm"]
    assert (warm["loaded_entries"], warm["misses"], warm["hits"], warm["prepass_samples"]) == (samples, 0, 24, 0)
    assert rows["head_off"]["cache_bytes"] is None
    steps = {v["steps"] for v in rows.values()}
    assert steps == {samples // shape.batch * epochs}
    labels = [c["label"] for c in report["comparisons"]]
    assert labels[:3] == [c[0] for c in bench.COMPARISONS[:3]]
