"""The frozen-prefix cache under DDP: 2 CPU processes (gloo) launched with ``torchrun``.

One launch runs three scenarios of ``distributed_integration.py`` (the last layer trains,
8 samples, 6 steps of 2 x 2 rows: 3 epochs): uncached, ``frozen_prefix_cache: memory`` and
``frozen_prefix_cache: disk`` with one directory shared by both ranks. Under DDP there is no
pre-pass (it would cost each rank a whole epoch of the prefix per epoch of its shard): a rank
computes a sample the first time its sampler gives it one, and hits every later time (the
sampler reshuffles the shards each epoch; keys are content hashes).

The cached runs do the same arithmetic on the same shapes as the uncached one (the cache
holds the exact inputs of the trainable layer), so the 2-process results are compared
bit for bit, not within a tolerance. The shared disk directory, written by two processes at
once (same shard names: atomic ``os.replace`` of per-process temporary files), is then read
by a 1-process run that must compute nothing and equal its uncached twin.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed_integration import CACHE_DIR, DATA_SIZE, GLOBAL_BATCH, MAX_STEPS, launch, reference
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess  # every test reads what one torchrun launch dumped

DATA = DATA_SIZE["cache_disk"]


def rows_met(dump: dict) -> list[tuple]:
    return [tuple(row) for batch in dump["batches"] for row in batch]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_cache")
    return out, launch("torchrun", out, ["cache_off", "cache_memory", "cache_disk"])


@pytest.mark.parametrize("scenario", ["cache_memory", "cache_disk"])
def test_cached_ddp_run_equals_the_uncached_ddp_run_bit_for_bit(launched, scenario):
    _, dumps = launched
    off0, off1 = dumps["cache_off"]
    rank0, rank1 = dumps[scenario]
    assert rank0["wrapped"] == "DistributedDataParallel" and rank0["world_size"] == 2
    assert off0["cache"] is None
    for a, b in ((rank0, off0), (rank1, off1)):
        assert a["batches"] == b["batches"]  # the cache leaves the data order alone
        assert a["losses"] == b["losses"] and len(a["losses"]) == MAX_STEPS
    assert rank0["batches"] != rank1["batches"]
    moved = 0
    for name, final in rank0["final"].items():
        assert torch.equal(final, rank1["final"][name]), f"{name} differs between ranks"
        assert torch.equal(final, off0["final"][name]), f"{name} differs from the uncached run"
        moved += not torch.equal(final, rank0["initial"][name])
        if ".layers.3." not in name and "lm_head" not in name and not name.endswith("model.norm.weight"):
            assert torch.equal(final, rank0["initial"][name]), f"{name} is frozen and must not move"
    assert moved > 0


@pytest.mark.parametrize("scenario", ["cache_memory", "cache_disk"])
def test_each_rank_computes_a_sample_once_and_hits_it_afterwards(launched, scenario):
    _, dumps = launched
    for dump in dumps[scenario]:
        rows = rows_met(dump)
        assert len(rows) == MAX_STEPS * GLOBAL_BATCH // 2
        distinct = len(set(rows))
        assert distinct < len(rows)  # the shards come back: there is something to hit
        assert dump["cache"] == {"hits": len(rows) - distinct, "misses": distinct, "prepass_samples": 0,
                                 "loaded_entries": 0, "entries": distinct}


def test_a_disk_cache_written_by_two_ranks_at_once_is_whole_and_reused(launched):
    out, dumps = launched
    root = out / CACHE_DIR
    (fingerprint_dir,) = list(root.iterdir())
    names = sorted(os.listdir(fingerprint_dir))
    assert not [n for n in names if n.endswith(".tmp")]
    shards = [n for n in names if n.endswith(".safetensors")]
    assert "fingerprint.json" in names and shards
    keys = set()
    for shard in shards:
        entries = load_file(fingerprint_dir / shard)
        assert all(v.shape == (16, 64) for v in entries.values())  # seq_len x hidden of the tiny model
        keys |= set(entries)
    written = len(set(rows_met(dumps["cache_disk"][0])) | set(rows_met(dumps["cache_disk"][1])))
    assert len(keys) == written
    # One process reads what the two wrote (its pre-pass computes only the rest) and equals its
    # uncached twin bit for bit: a torn or mixed-up shard would fail to load or change the losses.
    cached = reference("cache_disk", out)
    uncached = reference("cache_off", out)
    assert cached["cache"]["loaded_entries"] == written
    assert cached["cache"]["misses"] == cached["cache"]["prepass_samples"] == DATA - written
    assert cached["cache"]["hits"] == MAX_STEPS * GLOBAL_BATCH
    assert cached["losses"] == uncached["losses"]
    for name, final in cached["final"].items():
        assert torch.equal(final, uncached["final"][name]), name
