"""``frozen_prefix_cache: disk``: one folder per fingerprint, shards written atomically and checked when read.

A run never deletes a cache folder; a shard is written under a temporary name and renamed into
place, so a killed run leaves whole shards or none, and runs sharing the folder need no lock (a
shard's name is a hash of its keys, its contents those keys' states: two writers write the
same). Each shard's metadata holds the fingerprint it belongs to and a SHA-256 of its entries
(keys, dtypes, shapes, bytes), verified when it is read: a shard that is damaged (a flipped bit,
a broken header), truncated, empty or another fingerprint's is named in one warning, set aside
as ``<name>.damaged``, and its samples are computed again; it is never trained on. A disk that
fails a write (full, read-only) leaves the run with the cache in memory, said once.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import torch
from transformers.utils import logging

from ...core.faults import machine_fault

logger = logging.get_logger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
#: ``format`` in a shard's metadata: what tells a shard of this cache from any other safetensors file.
SHARD_FORMAT = "hf_llama_strategies.frozen_prefix_cache"
DAMAGED_SUFFIX = ".damaged"


def entries_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of entries (key, dtype, shape, bytes), in key order: what a shard's metadata records."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
        self.digest = digest
        self.meta = meta
        #: Shards set aside as damaged by this store (their samples are computed again).
        self.damaged: list[str] = []
        self._write_failed = False

    def read(self) -> Iterator[tuple[bytes, torch.Tensor]]:
        """Every entry of every whole shard, as ``(key, hidden states)``; damaged shards are named and skipped."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(self.directory, name)
            entries = self._read_shard(path)
            if entries is not None:
                yield from entries.items()

    def _read_shard(self, path: str) -> Optional[dict[bytes, torch.Tensor]]:
        try:
            problem, entries = _check_shard(path, self.digest)
        except Exception as exc:  # a damaged file can fail a reader in any way
            problem, entries = f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})", None
        if problem is None:
            return entries
        aside = path + DAMAGED_SUFFIX
        try:
            os.replace(path, aside)
        except OSError:
            aside = path  # another run set it aside first, or the folder is read-only: skipped either way
        self.damaged.append(aside)
        logger.warning(
            f"frozen_prefix_cache: shard {path} is not usable ({problem}); set aside as {os.path.basename(aside)}, "
            "its samples are computed again."
        )
        return None

    def write(self, entries: Mapping[bytes, torch.Tensor]) -> None:
        """Write ``entries`` as one shard (its name a hash of their keys: the same entries, the same file).

        A write the machine fails (disk full, read-only) is said once; the run keeps the entries in memory.
        """
        if self._write_failed:
            return
        try:
            self._write(entries)
        except Exception as exc:
            fault = machine_fault(exc, self.directory)
            if fault is None:
                raise
            self._write_failed = True
            logger.warning(
                f"frozen_prefix_cache: cannot write to {self.directory} ({fault[0]}); this run keeps its cache in "
                "memory only (the result is the same; a later run computes these samples again)."
            )

    def _write(self, entries: Mapping[bytes, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.directory, exist_ok=True)
        meta_path = os.path.join(self.directory, FINGERPRINT_FILE)
        if not os.path.exists(meta_path):
            _atomic_write(meta_path, lambda tmp: _write_json(tmp, self.meta))
        name = hashlib.sha256(b"".join(sorted(entries))).hexdigest()[:32]
        path = os.path.join(self.directory, f"shard-{name}.safetensors")
        if not os.path.exists(path):
            tensors = {key.hex(): value.contiguous() for key, value in entries.items()}
            metadata = {"format": SHARD_FORMAT, "fingerprint": self.digest, "sha256": entries_checksum(tensors)}
            _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _check_shard(path: str, digest: str) -> tuple[Optional[str], Optional[dict[bytes, torch.Tensor]]]:
    """``(problem, None)`` for a shard that must not be used, else ``(None, its entries)``."""
    from safetensors import safe_open

    size = os.path.getsize(path)
    if size < 8:
        return ("it is empty" if size == 0 else f"it is truncated ({size} bytes)"), None
    with safe_open(path, framework="pt") as shard:
        metadata = shard.metadata() or {}
        if metadata.get("format") != SHARD_FORMAT:
            return "it is not a frozen-prefix cache shard", None
        if metadata.get("fingerprint") != digest:
            return "it belongs to another fingerprint (another model, boundary or precision)", None
        tensors = {key: shard.get_tensor(key) for key in shard.keys()}
    if entries_checksum(tensors) != metadata.get("sha256"):
        return "its contents do not match their checksum (damaged)", None
    return None, {bytes.fromhex(key): value for key, value in tensors.items()}


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    # Unique per writer: runs on several hosts may share the folder (and a process id).
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
