"""One rule for an occupied ``output_dir``, one run at a time in it, and nothing lost when a run fails.

* A fresh run goes into an empty (or new) ``output_dir``. One that holds anything is refused in
  one line naming what works: ``resume_from_checkpoint: true`` (when it holds a complete
  checkpoint), ``overwrite_output_dir: true`` (the earlier contents are moved, in one rename, to a
  sibling folder named in one line, and the run starts fresh), or another ``output_dir``.
* A resumed run may not start behind a newer complete checkpoint (it would write over it).
* The run holds the folder's lock (:mod:`~hf_llama_strategies.training.run_lock`) from its first
  write to its end, and checks the folder again once it holds it.
* A run that fails (an error, a full disk, a signal) removes the final outputs it had begun to
  write; a fresh one that left no complete checkpoint removes everything it wrote. What was there
  before the run is never touched: a rerun, a resume or ``overwrite_output_dir`` then works.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Iterable, Optional

from ..errors import CliError
from ..training.checkpoints import CHECKPOINT_RE, checkpoint_problem, checkpoint_step, list_checkpoints
from ..training.resume import nothing_to_lose
from ..training.run_lock import LOCK_FILE_NAME, acquire_run_lock, move_run_lock, release_run_lock
from .config import ParsedConfig, RunArguments

#: Files (and patterns) a finished run leaves at the top of output_dir, beside its checkpoints.
_FINAL_OUTPUTS = (
    "trainer_state.json", "training_args.bin", "config.json", "generation_config.json",
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "all_results.json",
    "train_results.json", "eval_results.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
)


def _is_final_output(name: str) -> bool:
    return name in _FINAL_OUTPUTS or (name.startswith(("model-", "pytorch_model-")) and "-of-" in name)


def held_files(out: str) -> list[str]:
    """What ``out`` holds, sorted (its run lock aside; empty when missing)."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n != LOCK_FILE_NAME)


def _complete_checkpoints(out: str) -> list[str]:
    return [os.path.basename(p) for p in list_checkpoints(out) if checkpoint_problem(p) is None]


def aside_path(out: str) -> str:
    """Where ``overwrite_output_dir`` moves an earlier run: ``<output_dir>.earlier-<date>-<time>`` beside it."""
    base = f"{os.path.normpath(os.path.abspath(out))}.earlier-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def check_output_dir(training_args: Any, run_args: RunArguments, inputs: Iterable[str] = ()) -> Optional[str]:
    """Refuse a run that would overwrite or delete what ``output_dir`` holds; nothing is written here.

    Args:
        training_args: the run's ``TrainingArguments`` (``output_dir``, ``resume_from_checkpoint``).
        run_args: ``overwrite_output_dir`` and what resolving ``resume_from_checkpoint`` decided.
        inputs: the run's input paths (config, data, model): an ``output_dir`` holding one is never moved.

    Returns:
        Where ``overwrite_output_dir`` will move the earlier contents (``None``: nothing to move).

    Raises:
        CliError: naming what the folder holds and the options that work.
    """
    out = training_args.output_dir
    held = held_files(out) if out else []
    if not held or run_args.restart_interrupted:
        return None
    resume = training_args.resume_from_checkpoint
    if resume:
        _check_not_behind(out, resume)
        return None
    if not run_args.overwrite_output_dir:
        complete = _complete_checkpoints(out)
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        options = [f"resume it with --resume_from_checkpoint true (from {complete[-1]})"] if complete else []
        options.append("start afresh with --overwrite_output_dir true (the earlier contents are first moved to "
                       f"{os.path.basename(aside_path(out))} beside it; nothing is deleted)")
        options.append("choose another --output_dir")
        raise CliError(
            f"output_dir={out!r} already holds files ({shown}); nothing was written. "
            + ", ".join(options[:-1]) + ", or " + options[-1] + "."
        )
    _check_movable(out, inputs)
    return aside_path(out)


def _check_not_behind(out: str, resume: str) -> None:
    step = checkpoint_step(resume)
    if step is None:
        return
    newer = [
        os.path.basename(p) for p in list_checkpoints(out)
        if (checkpoint_step(p) or 0) > step and checkpoint_problem(p) is None
    ]
    if newer:
        raise CliError(
            f"resuming from {resume} would write over the newer checkpoints {', '.join(newer)} of "
            f"output_dir={out!r}; nothing was written. Resume from the newest (resume_from_checkpoint: true), or "
            "give another output_dir."
        )


def _contains(folder: str, path: str) -> bool:
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_movable(out: str, inputs: Iterable[str]) -> None:
    """``overwrite_output_dir`` moves only a folder of the run's own: not one holding the working directory, inputs."""
    special = {os.path.realpath(os.sep), os.path.realpath(os.path.expanduser("~"))}
    within = [p for p in [os.getcwd(), *inputs] if p and os.path.exists(p) and _contains(out, p)]
    if os.path.realpath(out) in special or within:
        what = "the working directory" if within and within[0] == os.getcwd() else (within[0] if within else out)
        raise CliError(
            f"overwrite_output_dir: true would move output_dir={out!r} aside, and it holds {what}; nothing was "
            "written. Give the run an output_dir of its own."
        )


def move_aside(out: str, aside: str, locked: bool) -> None:
    """Move ``out`` to ``aside`` in one rename; then a fresh ``out`` (locked again when it was)."""
    os.rename(out, aside)
    if locked:
        move_run_lock(out, aside)
        release_run_lock(aside)
        acquire_run_lock(out)
    else:
        os.makedirs(out)


def missing_dirs(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def remove_failed_outputs(out: str, before: set[str], fresh: bool) -> list[str]:
    """After a failed run: remove the final outputs it wrote, and all it wrote when fresh and nothing is resumable.

    Only entries that were not in ``out`` before the run (``before``) are touched.

    Returns:
        The names removed.
    """
    created = [n for n in held_files(out) if n not in before]
    removed = [n for n in created if _is_final_output(n)]
    resumable = any(CHECKPOINT_RE.match(n) and checkpoint_problem(os.path.join(out, n)) is None for n in created)
    if fresh and not resumable:
        removed = created
    for name in removed:
        _remove(os.path.join(out, name))
    return removed


class OutputDir:
    """``with OutputDir(parsed, inputs) as output:``: ``output_dir`` checked, created, locked and moved aside if asked.

    On the main process (the one that saves): the checks of :func:`check_output_dir` before
    anything is created, the lock, the same checks again under the lock (another run may have
    written meanwhile), then ``overwrite_output_dir``'s move. On leaving with an error:
    :func:`remove_failed_outputs`, the lock released, folders this run created and left empty
    removed. Under several processes the others wait for the main one at a barrier.

    Attributes:
        notes: what the user should hear (a dead run's lock taken over, the earlier run moved aside).
    """

    def __init__(self, parsed: ParsedConfig, inputs: Iterable[str] = ()) -> None:
        self.parsed = parsed
        # ``lock_output_dir``: the CLI holds the lock itself, for the whole run, so the trainer it builds
        # (which would lock only for its own lifetime) is told not to.
        self.lock, parsed.strategy.lock_output_dir = parsed.strategy.lock_output_dir, False
        self.inputs = list(inputs)
        self.out = parsed.training.output_dir
        self.notes: list[str] = []
        self.main = bool(parsed.training.should_save)
        self.created: list[str] = []
        self.before: set[str] = set()
        self.locked = False
        #: Where overwrite_output_dir moved the earlier contents (``None``: nowhere).
        self.aside: Optional[str] = None

    def __enter__(self) -> "OutputDir":
        training, run = self.parsed.training, self.parsed.run
        if self.main:
            check_output_dir(training, run, self.inputs)  # before anything is created
            self.created = missing_dirs(self.out)
            try:
                self._lock_and_check()
            except BaseException:
                self._leave()
                raise
        _barrier(training)
        return self

    def _lock_and_check(self) -> None:
        training, run = self.parsed.training, self.parsed.run
        if self.lock:
            note = acquire_run_lock(self.out)
            self.locked = True
            if note:
                self.notes.append(note)
        else:
            os.makedirs(self.out, exist_ok=True)
        aside = check_output_dir(training, run, self.inputs)
        if run.restart_interrupted and not nothing_to_lose(self.out):
            raise CliError(
                f"output_dir={self.out!r} changed while this run started (another run wrote "
                f"{', '.join(held_files(self.out)[:5])}); nothing was written. Run the command again."
            )
        if aside:
            move_aside(self.out, aside, self.locked)
            self.aside = aside
            self.notes.append(f"overwrite_output_dir: moved the earlier contents of {self.out} to {aside}")
        self.before = set(held_files(self.out))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.main:
            return
        if exc is not None and os.path.isdir(self.out):
            fresh = not self.parsed.training.resume_from_checkpoint
            remove_failed_outputs(self.out, self.before, fresh)
        self._leave()
        if exc is not None and self.aside and not os.path.exists(self.out):
            # The run failed and kept nothing: the earlier contents go back where they were.
            try:
                os.rename(self.aside, self.out)
            except OSError:
                print(f"hf-llama-strategies: the earlier contents of {self.out} stay in {self.aside}")

    def _leave(self) -> None:
        if self.locked:
            release_run_lock(self.out)
            self.locked = False
        folders = [*self.created, os.path.abspath(self.out)] if self.aside else self.created
        for folder in folders:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


def _barrier(training_args: Any) -> None:
    if getattr(training_args, "world_size", 1) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
