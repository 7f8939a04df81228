"""Nothing in ``output_dir`` is overwritten or deleted: the rule for an occupied output folder."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from transformers import TrainingArguments

from ..core.plan import PLAN_FILE_NAME
from ..errors import CliError, InvalidArgumentError
from ..training.checkpoints import CHECKPOINT_RE, checkpoint_problem, checkpoint_step, list_checkpoints
from .config import RunArguments

#: Files (and patterns) a finished run leaves at the top of output_dir: never overwritten by a fresh run.
_RUN_OUTPUTS = (
    PLAN_FILE_NAME, "trainer_state.json", "training_args.bin", "config.json", "generation_config.json",
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "all_results.json",
    "train_results.json", "eval_results.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
)


def _earlier_run_files(out: str) -> list[str]:
    names = sorted(os.listdir(out))
    return [
        n for n in names
        if CHECKPOINT_RE.match(n) or n in _RUN_OUTPUTS or (n.startswith("model-") and n.endswith(".safetensors"))
    ]


def check_output_dir(training_args: TrainingArguments, run_args: RunArguments) -> None:
    """Nothing in output_dir is overwritten or deleted (rotation then only sees this run's checkpoints).

    A fresh run goes into an empty (or new) output_dir, or, with ``overwrite_output_dir``, one
    that holds none of the files a run writes. A resumed run may not start behind a newer
    complete checkpoint of output_dir (it would write over it).
    """
    out = training_args.output_dir
    if not out or not os.path.isdir(out) or not os.listdir(out):
        return
    resume = training_args.resume_from_checkpoint
    if run_args.restart_interrupted:
        return
    if resume:
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
        return
    held = sorted(os.listdir(out))
    if not run_args.overwrite_output_dir:
        raise CliError(
            f"output_dir={out!r} already holds files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
            "nothing was written. Choose another output_dir, resume with --resume_from_checkpoint, or pass "
            "--overwrite_output_dir true to add this run's files beside them."
        )
    clash = _earlier_run_files(out)
    if clash:
        raise CliError(
            f"output_dir={out!r} holds an earlier run ({', '.join(clash[:6])}{', ...' if len(clash) > 6 else ''}), "
            "which this run would overwrite or rotate away; overwrite_output_dir only adds new files. Nothing was "
            "written. Choose another output_dir, move those files away, or resume with resume_from_checkpoint: true."
        )


@contextmanager
def created_output_dir(path: str) -> Iterator[None]:
    """Create ``output_dir`` for the run; a run that fails before writing anything leaves no empty folder behind."""
    created = missing_dirs(path)
    try:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError("output_dir", path, "a directory that can be created", exc.strerror) from None
        yield
    finally:
        for folder in created:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


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
