"""Checkpoints that are complete or absent: written through a staging folder, read back with a check.

transformers' ``Trainer._save_checkpoint`` writes ``checkpoint-N`` file by file in place: a
run killed while it saves leaves a half-written directory that ``get_last_checkpoint`` picks
on resume. :func:`save_checkpoint_staged` lets the Trainer write the very same files into a
hidden sibling (``.tmp-checkpoint-N``) and renames it into place once everything (the plan
included) is on disk. :func:`checkpoint_problem` tells a complete checkpoint from a partial or
damaged one by reading only headers; :func:`latest_complete_checkpoint` picks the newest
complete one and names the ones it skips (the resume resolver, :mod:`.resume`, uses both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from typing import Any, Callable, Optional

from transformers.utils import logging

from ..core.faults import writing
from ..core.plan import PLAN_FILE_NAME, StrategyPlan

logger = logging.get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
STAGING_PREFIX = ".tmp-"
#: Prefix an incomplete checkpoint gets when a resumed run saves the same step again (kept, never deleted).
INCOMPLETE_PREFIX = "incomplete-"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
_SCHEDULER_FILE = "scheduler.pt"
#: What transformers' ``enable_jit_checkpoint`` writes into ``checkpoint-N`` before saving it, removes after.
JIT_SENTINEL = "checkpoint-is-incomplete.txt"


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a ``checkpoint-N`` directory name, else ``None``."""
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(folder: str) -> list[str]:
    """The ``checkpoint-N`` directories of ``folder``, oldest step first."""
    if not os.path.isdir(folder):
        return []
    found = [os.path.join(folder, n) for n in os.listdir(folder) if CHECKPOINT_RE.match(n)]
    return sorted((p for p in found if os.path.isdir(p)), key=lambda p: checkpoint_step(p) or 0)


def _safetensors_problem(path: str) -> Optional[str]:
    """Whether a ``.safetensors`` file is whole: its header parses and its size is what the header says."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "is truncated (no header)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "is truncated (header longer than the file)"
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            return "has a damaged header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) != size:
        return f"is truncated ({size} bytes, the header describes {8 + length + max(ends, default=0)})"
    return None


def _torch_file_problem(path: str) -> Optional[str]:
    """Whether a ``torch.save`` archive is whole (its zip directory, written last, is readable)."""
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return "is truncated or not a torch.save file"


def _file_problem(path: str) -> Optional[str]:
    if path.endswith(".safetensors"):
        return _safetensors_problem(path)
    if path.endswith((".pt", ".pth", ".bin")):
        return _torch_file_problem(path)
    return None


def weights_problem(path: str, allow_other_layouts: bool = True) -> Optional[str]:
    """What makes the model weights of folder ``path`` unusable (missing, truncated, damaged), or ``None``.

    Args:
        path: a checkpoint or model folder.
        allow_other_layouts: FSDP's and DeepSpeed's own weight folders count as weights.
    """
    names = set(os.listdir(path))
    for index in _INDEX_FILES:
        if index in names:
            try:
                with open(os.path.join(path, index), encoding="utf-8") as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                return f"{index} is damaged"
            for shard in shards:
                if shard not in names:
                    return f"weight shard {shard} (listed in {index}) is missing"
                problem = _file_problem(os.path.join(path, shard))
                if problem:
                    return f"{shard} {problem}"
            return None
    present = [n for n in _WEIGHT_FILES if n in names]
    if not present:
        # FSDP and DeepSpeed keep weights in folders of their own: their layout is theirs to check.
        own_layout = ("pytorch_model_fsdp", "global_step")
        own = [n for n in names if n.startswith(own_layout) and os.path.isdir(os.path.join(path, n))]
        if allow_other_layouts and own:
            return None
        return f"no model weights ({' or '.join(_WEIGHT_FILES[:2])})"
    for name in present:
        problem = _file_problem(os.path.join(path, name))
        if problem:
            return f"{name} {problem}"
    return None


def checkpoint_problem(path: str, require_optimizer: bool = True) -> Optional[str]:
    """What makes ``path`` unusable to resume from exactly, or ``None`` for a complete checkpoint.

    Checks, reading headers only: ``trainer_state.json`` parses and holds ``global_step``;
    the model weights are present and whole; the optimizer and scheduler state are present
    and whole (``require_optimizer``); ``strategy_plan.json``, where present, parses.
    """
    if not os.path.isdir(path):
        return "no such directory"
    if os.path.exists(os.path.join(path, JIT_SENTINEL)):
        return f"{JIT_SENTINEL} (its enable_jit_checkpoint save was interrupted)"
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_path):
        return f"no {TRAINER_STATE} (its save was interrupted)"
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (ValueError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is not valid JSON"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} holds no global_step"
    step = state["global_step"]
    named = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    # The Trainer names a checkpoint after its global_step: another one is a state file edited
    # or copied from elsewhere, and the run would resume at the wrong step.
    if step < 0 or (named is not None and int(named.group(1)) != step):
        return f"{TRAINER_STATE} holds global_step={step}, not the step the folder is named after"
    for key, kind in (("log_history", list), ("best_metric", (int, float, type(None)))):
        if key in state and not isinstance(state[key], kind) or isinstance(state.get(key), bool):
            return f"{TRAINER_STATE} holds {key}={state[key]!r}, not a {getattr(kind, '__name__', 'number')}"
    problem = weights_problem(path)
    if problem:
        return problem
    names = set(os.listdir(path))
    if require_optimizer and not any(n.startswith("global_step") for n in names):
        optimizer = next((n for n in _OPTIMIZER_FILES if n in names), None)
        has_sharded = any(n.startswith("optimizer_") and os.path.isdir(os.path.join(path, n)) for n in names)
        if optimizer is None and not has_sharded:
            return "no optimizer state (optimizer.pt): it cannot resume exactly"
        if _SCHEDULER_FILE not in names:
            return f"no scheduler state ({_SCHEDULER_FILE}): it cannot resume exactly"
        for name in filter(None, (optimizer, _SCHEDULER_FILE)):
            problem = _file_problem(os.path.join(path, name))
            if problem:
                return f"{name} {problem}"
    for name in sorted(n for n in names if n.startswith("rng_state") and n.endswith(".pth")):
        problem = _file_problem(os.path.join(path, name))
        if problem:
            return f"{name} {problem}"
    if PLAN_FILE_NAME in names:
        try:
            StrategyPlan.load(os.path.join(path, PLAN_FILE_NAME))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{PLAN_FILE_NAME} is damaged"
    return None


def latest_complete_checkpoint(
    folder: str, require_optimizer: bool = True
) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The newest complete ``checkpoint-N`` of ``folder``, and ``(path, problem)`` of each newer one skipped."""
    skipped: list[tuple[str, str]] = []
    for path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path, require_optimizer)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


# -- writing --------------------------------------------------------------------------------


def _fsync_tree(path: str) -> None:
    """Flush what the Trainer wrote, so a rename never publishes files still in the page cache only."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def can_stage(args: Any, trial: Any) -> bool:
    """Whether a checkpoint can be staged: no hyperparameter trial, no Hub push, one folder per save.

    Under DDP/FSDP/DeepSpeed every process writes into the one staging folder, the main process
    creates it and publishes it, with a barrier before and after. ``save_on_each_node`` (one
    copy per node, each written by its node's processes) is written in place, as transformers
    does: a partial one is still recognised and skipped on resume.
    """
    several = getattr(args, "world_size", 1) > 1
    return trial is None and not getattr(args, "push_to_hub", False) and not (
        several and getattr(args, "save_on_each_node", False)
    )


def rotate_by_step(run_dir: str, save_total_limit: Optional[int], best_model_checkpoint: Optional[str]) -> None:
    """Delete the oldest ``checkpoint-N`` beyond ``save_total_limit``, ordered by N (never by file time).

    Keeps the newest and the best one, as the Trainer does. The Trainer orders by modification
    time: a clock set back makes the checkpoint just written the "oldest", and it is deleted.
    """
    from transformers.trainer_utils import rotate_checkpoints

    rotate_checkpoints(
        output_dir=run_dir, save_total_limit=save_total_limit, best_model_checkpoint=best_model_checkpoint,
        use_mtime=False,
    )


def _barrier(trainer: Any) -> None:
    if getattr(trainer.args, "world_size", 1) > 1:
        trainer.accelerator.wait_for_everyone()


def _is_jit_marker_of(final: str, step: int) -> bool:
    """``final`` is what transformers' ``enable_jit_checkpoint`` made for this very save (its sentinel)."""
    sentinel = os.path.join(final, JIT_SENTINEL)
    if not os.path.isfile(sentinel):
        return False
    try:
        with open(sentinel, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return False
    return f"step {step} " in text


def _publish(run_dir: str, name: str, staged: str, step: int) -> str:
    """Rename ``staged`` to ``run_dir/name``; an incomplete folder of that name is kept aside, a whole one replaced."""
    final = os.path.join(run_dir, name)
    if os.path.isdir(final):
        jit = _is_jit_marker_of(final, step)
        complete = jit or checkpoint_problem(final, require_optimizer=False) is None
        aside = os.path.join(run_dir, (STAGING_PREFIX + "old-" if complete else INCOMPLETE_PREFIX) + name)
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.rename(final, aside)
        if complete:
            shutil.rmtree(aside)
        else:
            logger.warning(f"{final} was incomplete (an interrupted save); kept as {aside}.")
    os.rename(staged, final)
    return final


def save_checkpoint_staged(
    trainer: Any,
    write: Callable[[], None],
    finish: Callable[[str], None] = lambda path: None,
) -> str:
    """Run the Trainer's checkpoint save into a hidden sibling, then rename it to ``checkpoint-N``.

    Args:
        trainer: the Trainer; its ``_get_output_dir`` is pointed at the staging folder while
            ``write`` runs (``Trainer._save_checkpoint`` derives every path from it).
        write: the Trainer's own ``_save_checkpoint`` (bound, no arguments).
        finish: writes more files into the staged checkpoint before it is published (the plan).

    Returns:
        The path of the published checkpoint. The files are the ones the Trainer writes;
        the best-model path in ``trainer_state.json`` is the final one; older checkpoints are
        rotated (by step number) after the new one is in place. Under several processes every
        process writes into the staging folder and the main one publishes it.

    Raises:
        StorageError: the machine failed the save (disk full, ...): the staging folder is
            removed, every earlier checkpoint is as it was.
    """
    run_dir = trainer.args.output_dir
    step = trainer.state.global_step
    name = f"checkpoint-{step}"
    staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
    main = trainer.args.should_save
    try:
        with writing(f"saving {name}", staging_root):
            if main:
                if os.path.isdir(staging_root):
                    # Left by a run killed while it staged this step: never published, never complete.
                    shutil.rmtree(staging_root)
                os.makedirs(staging_root)
            _barrier(trainer)
            _write_staged(trainer, write, staging_root)
            _barrier(trainer)
            final = os.path.join(run_dir, name)
            if main:
                staged = os.path.join(staging_root, name)
                finish(staged)
                _fsync_tree(staged)
                final = _publish(run_dir, name, staged, step)
                os.rmdir(staging_root)
    except BaseException:
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
        raise
    if main:
        rotate_by_step(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
    _barrier(trainer)
    return final


def _write_staged(trainer: Any, write: Callable[[], None], staging_root: str) -> None:
    """``write`` with the Trainer's output folder pointed at ``staging_root``; paths in its state made final."""
    run_dir = trainer.args.output_dir
    # Trainer._save_checkpoint asks _get_output_dir for its folder; an instance attribute
    # shadows the method for this call only (the rotation it runs there sees one checkpoint).
    trainer._get_output_dir = lambda trial=None: staging_root
    try:
        write()
    finally:
        del trainer._get_output_dir
    state = trainer.state
    if state.best_model_checkpoint and os.path.dirname(os.path.normpath(state.best_model_checkpoint)) == staging_root:
        state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(state.best_model_checkpoint))
    staged_state = os.path.join(staging_root, f"checkpoint-{state.global_step}", TRAINER_STATE)
    if trainer.args.should_save and os.path.isfile(staged_state):
        state.save_to_json(staged_state)


# -- resuming -------------------------------------------------------------------------------
