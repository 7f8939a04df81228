"""``benchmarks/vs_llamafactory_real.py``: the smoke run (tiny model, our CLI only), the skip, the schedule, the ratios.

Timings are the benchmark's business and are not checked; what is checked is exact: which runs
happen in which order, that the ratios are the quotients of the measures, the skip message.
"""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("vs_llamafactory_real")


def test_without_llamafactory_the_race_is_skipped_with_a_message(bench, tmp_path, capsys):
    report = bench.main(["--lf-venv", str(tmp_path / "absent"), "--lf-data", str(tmp_path), "--out", ""])
    assert report == {"skipped": f"no LLaMA-Factory venv at --lf-venv {str(tmp_path / 'absent')!r} "
                                 "(its bin/llamafactory-cli)"}
    assert capsys.readouterr().out == f"vs_llamafactory_real: skipped: {report['skipped']}\n"


def test_without_its_data_the_race_is_skipped_naming_the_files(bench, tmp_path, capsys):
    venv = tmp_path / "lf"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "llamafactory-cli").write_text("")
    report = bench.main(["--lf-venv", str(venv), "--lf-data", str(tmp_path), "--out", ""])
    assert report["skipped"].endswith("lacks identity.json, alpaca_en_demo.json (LLaMA-Factory's data/)")


def test_an_unknown_race_is_refused_naming_the_valid_ones(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--races", "freeze2,fast"])
    assert exit_info.value.code == 2
    assert "--races: unknown ['fast']; valid: freeze2, freeze2_cache" in capsys.readouterr().err


def test_runs_alternate_between_the_clis_and_every_other_round_reverses(bench):
    first = bench.schedule(["freeze2", "freeze2_cache", "full"], 0)
    assert first == ["ours_freeze2", "lf_freeze2", "ours_freeze2_cache", "lf_full", "ours_full"]
    assert bench.schedule(["freeze2", "freeze2_cache", "full"], 1) == first[::-1]
    # A run two races share runs once a round.
    assert bench.schedule(["freeze2", "cache_vs_off"], 0) == ["ours_freeze2", "lf_freeze2", "ours_freeze2_cache"]


def test_the_ratios_are_ours_over_theirs_round_by_round(bench):
    def result(run, round_index, wall, cpu, rss, losses):
        return bench.Result(run, round_index, wall, cpu, cpu - 1, 1.0, rss, losses=losses)

    # Values whose quotients and medians are exact in binary floating point.
    results = [result("ours_freeze2", 0, 5.0, 6.0, 300.0, [2.0, 1.5]),
               result("lf_freeze2", 0, 10.0, 8.0, 200.0, [2.0, 1.5]),
               result("ours_freeze2", 1, 6.0, 3.0, 250.0, [2.0, 1.5]),
               result("lf_freeze2", 1, 8.0, 4.0, 200.0, [2.0, 1.25])]
    [row] = bench.summarise(results, ["freeze2"])
    assert row["wall_ratio"] == [0.5, 0.75] and row["cpu_ratio"] == [0.75, 0.75] and row["rss_ratio"] == [1.5, 1.25]
    assert row["median"] == {"wall_s": 0.625, "cpu_s": 0.75, "peak_rss_mib": 1.375}
    # The last round's losses are compared: 1.5 against 1.25 is 0.2 relative.
    assert row["losses"] == {"steps": 2, "max_relative_difference": 0.2}


@pytest.mark.slow
def test_smoke_run_trains_with_and_without_the_cache(bench, tmp_path):
    out = tmp_path / "vs_llamafactory_real.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["run"] for r in report["runs"]] == ["ours_freeze2_cache", "ours_freeze2"]
    [row] = report["races"]
    assert row["race"] == "cache_vs_off" and row["rounds"] == 1
    # 16 samples, batch 4, accumulation 2, 2 epochs: 4 optimizer steps, a loss logged at each.
    assert row["losses"]["steps"] == 4
    for run in report["runs"]:
        assert run["cpu_s"] > 0 and run["peak_rss_mib"] > 0
