"""``frozen_prefix_cache: disk``: one folder per fingerprint, shards of entries written atomically.

A run never deletes a cache folder; a shard is written under a temporary name and renamed into
place, so a killed run leaves whole shards or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

FINGERPRINT_FILE = "fingerprint.json"


class ShardStore:
    """The shards of one fingerprint's folder.

    Args:
        directory: the cache directory (``frozen_prefix_cache_dir``); the store uses its
            subfolder named after the fingerprint.
        digest: the fingerprint (hex).
        meta: the fingerprint's readable inputs, written beside the shards.
    """

    def __init__(self, directory: str, digest: str, meta: dict[str, Any]) -> None:
        self.directory = os.path.join(directory, digest[:40])
        self.meta = meta

    def read(self) -> Iterator[tuple[bytes, torch.Tensor]]:
        """Every entry of every shard, as ``(key, hidden states)``."""
        if not os.path.isdir(self.directory):
            return
        from safetensors.torch import load_file

        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".safetensors"):
                continue
            for key, value in load_file(os.path.join(self.directory, name)).items():
                yield bytes.fromhex(key), value

    def write(self, entries: Mapping[bytes, torch.Tensor]) -> None:
        """Write ``entries`` as one shard (its name a hash of their keys: the same entries, the same file)."""
        from safetensors.torch import save_file

        os.makedirs(self.directory, exist_ok=True)
        meta_path = os.path.join(self.directory, FINGERPRINT_FILE)
        if not os.path.exists(meta_path):
            _atomic_write(meta_path, lambda tmp: _write_json(tmp, self.meta))
        name = hashlib.sha256(b"".join(sorted(entries))).hexdigest()[:32]
        path = os.path.join(self.directory, f"shard-{name}.safetensors")
        if not os.path.exists(path):
            tensors = {key.hex(): value.contiguous() for key, value in entries.items()}
            _atomic_write(path, lambda tmp: save_file(tensors, tmp))


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
