"""DDP through ``torchrun`` and ``accelerate launch``: 2 CPU processes (gloo) against 1.

Each launcher runs ``distributed_integration.py`` once with four scenarios: a static plan
(last two layers), layer-wise LR (decay + head rate), a dynamic plan (LISA) and an
unmodified ``Trainer`` with ``StrategyCallback``. Every scenario also runs here in one
process with the same global batch (2 processes x 2 rows against 1 process x 4 rows).

Tolerance. Both runs see the same rows at every step (checked exactly) and do the same
arithmetic except for the order of floating-point sums: DDP adds two half-batch gradients
in an all-reduce where one process reduces over the whole batch. Those differences start
at fp32 rounding (~1e-7 relative) and Adam's normalisation can enlarge them for gradients
near zero. Measured over 6 steps: losses within 2e-7 (relative), parameters within 3.3e-5
(absolute; LISA's fresh optimizer state after each draw is the largest). The tests allow
1e-6 relative on losses and 1e-4 absolute on parameters, a tenth of one Adam step at
``learning_rate=1e-3``: a parameter that took a different step, or did not move, fails.
Frozen parameters must be bit-identical to their initial values and ranks bit-identical
to each other. A control shows a 1-process run at a 2% different learning rate falls
outside the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from distributed_integration import LOSS_RTOL, PARAM_ATOL, check_matches_reference, launch, reference

SCENARIOS = ["static", "layerwise", "dynamic", "callback"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("ddp_reference")
    return {s: reference(s, out) for s in SCENARIOS}


@pytest.fixture(scope="module", params=["torchrun", "accelerate"])
def launched(request, tmp_path_factory) -> tuple[str, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp(f"ddp_{request.param}")
    return request.param, launch(request.param, out, SCENARIOS)


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_match_one_process_with_the_same_global_batch(launched, references, scenario):
    launcher, dumps = launched
    rank0, rank1 = dumps[scenario]
    assert rank0["wrapped"] == "DistributedDataParallel"
    assert rank0["launched_by_accelerate"] is (launcher == "accelerate")
    check_matches_reference(rank0, rank1, references[scenario])
    assert rank0["groups"] == references[scenario]["groups"]


def test_each_scenario_trains_what_its_plan_says(references):
    def trained_blocks(dump):
        return sorted({n.split(".")[2] if ".layers." in n else n.split(".")[-2]
                       for n in dump["final"] if not torch.equal(dump["final"][n], dump["initial"][n])})

    assert trained_blocks(references["static"]) == ["2", "3", "lm_head", "norm"]
    assert trained_blocks(references["callback"]) == ["2", "3", "lm_head", "norm"]
    assert len(trained_blocks(references["layerwise"])) == 7  # everything: embeddings, 4 layers, norm, head
    group_names = [name for name, _ in references["layerwise"]["groups"]]
    assert group_names[:2] == ["embeddings", "layers.0"] and group_names[-1] == "head"
    # LISA: one layer at a time, three draws in six steps; never all four layers.
    assert 1 <= len([b for b in trained_blocks(references["dynamic"]) if b.isdigit()]) <= 3


@pytest.mark.multiprocess
def test_control_a_different_learning_rate_falls_outside_the_tolerance(launched, tmp_path):
    _, dumps = launched
    rank0, _ = dumps["static"]
    off = reference("static", tmp_path, learning_rate=1.02e-3)
    assert off["batches"] == [a + b for a, b in zip(rank0["batches"], dumps["static"][1]["batches"])]
    assert rank0["losses"] != pytest.approx(off["losses"], rel=LOSS_RTOL, abs=0)
    worst = max((rank0["final"][n] - off["final"][n]).abs().max().item() for n in off["final"])
    assert worst > PARAM_ATOL
