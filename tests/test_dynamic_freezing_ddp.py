"""Dynamic freezing under DDP: two CPU processes (torchrun, gloo) end bit-identical.

One ``torchrun --nproc_per_node 2`` launch runs three scenarios of
``ddp_dynamic_freezing.py`` (LISA, gradual unfreezing, and a negative control where the
late layers were not registered with the DDP reducer) and this test reads the dumps.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.multiprocess  # every test reads what one torchrun launch dumped


def as_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {n: t.numpy().tobytes() for n, t in tensors.items()}


def layer_of(name: str) -> int:
    return int(name.split(".")[2])


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "ddp_dynamic_freezing.py"), str(out)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {
        scenario: [torch.load(out / f"{scenario}_rank{rank}.pt") for rank in (0, 1)]
        for scenario in ("lisa", "gradual", "unregistered")
    }


@pytest.mark.parametrize("scenario", ["lisa", "gradual"])
def test_ranks_end_bit_identical_and_late_layers_trained(dumps, scenario):
    rank0, rank1 = dumps[scenario]
    assert rank0["world_size"] == 2 and rank0["wrapped"] == "DistributedDataParallel"
    assert rank0["find_unused"] is True
    # Each rank trained on its own shard: equal parameters come from the all-reduce.
    assert len(rank0["input_sums"]) == 6
    assert rank0["input_sums"] != rank1["input_sums"]
    assert rank0["active_layers"] == rank1["active_layers"]
    assert as_bytes(rank0["final"]) == as_bytes(rank1["final"])

    # Layers that did not train at step 0 but did later, and layers that never trained.
    active = rank0["active_layers"]
    late = set().union(*active) - set(active[0])
    assert late, active
    never = set(range(4)) - set().union(*active)
    for name, final in rank0["final"].items():
        if ".layers." not in name:
            continue
        changed = not torch.equal(final, rank0["initial"][name])
        if layer_of(name) in late:
            assert changed, f"{name} was activated mid-run and must have trained"
        if layer_of(name) in never:
            assert not changed, f"{name} never trained and must be byte-equal"


def test_gradual_schedule_under_ddp(dumps):
    rank0, _ = dumps["gradual"]
    assert rank0["active_layers"] == [[], [], [2, 3], [2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_negative_control_layers_missing_from_the_reducer_diverge(dumps):
    # The check above can fail: layers frozen when DDP wrapped the model are never
    # all-reduced once they train, and the ranks drift apart.
    rank0, rank1 = dumps["unregistered"]
    assert rank0["active_layers"] == dumps["gradual"][0]["active_layers"]
    diverged = {
        layer_of(n) for n in rank0["final"] if ".layers." in n and not torch.equal(rank0["final"][n], rank1["final"][n])
    }
    assert diverged == {0, 1, 2, 3}
