"""Nothing lost under faults: signals, two runs, a full disk, a clock set back, a damaged cache, odd inputs.

Each scenario of docs/faults.md: what the run does, what it leaves, and that a resume (or a
rerun) reaches the result of the uninterrupted run (``reference``, conftest.py) bit for bit.
Signals and full disks are made in this process at a chosen point (a signal sent to itself, a
writer that fails as safetensors and torch fail on ENOSPC), so each test is deterministic.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import (
    TokenDataset,
    assert_same_weights,
    copy_run,
    lm_run_config,
    losses,
    make_training_args,
    one_line_error,
    snapshot,
    strategy,
    tree,
    write_yaml,
)
from tiny_models import tiny_model
from transformers import Trainer, TrainerCallback

from hf_llama_strategies import StrategyTrainer, build_plan, cli, hookimpl
from hf_llama_strategies.errors import EXIT_STORAGE, OutputDirBusyError, PluginError, TrainingStopped
from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache
from hf_llama_strategies.training.checkpoints import checkpoint_problem
from hf_llama_strategies.training.run_lock import LOCK_FILE_NAME, acquire_run_lock, release_run_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def run_config(reference, out, **extra):
    return lm_run_config(reference["config_dir"], reference["corpus"], out, **extra)


def signal_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to this process while the Trainer computes optimizer step ``step``."""
    real = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step - 1:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


def checkpoints(out) -> list[str]:
    return sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def stopped_line(capsys) -> str:
    """The one line of ours on stderr (transformers' progress bars of a save may stand beside it), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-llama-strategies:")]
    assert len(lines) == 1 and "Traceback" not in err and "bug" not in err, err
    return lines[0]


def fault_line(capsys) -> str:
    line = stopped_line(capsys)
    assert line.startswith("hf-llama-strategies: error: "), line
    return line


# -- signals -------------------------------------------------------------------------------------


def test_sigterm_saves_the_step_exits_143_and_the_resume_is_bit_identical(tmp_path, reference, capsys, monkeypatch):
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", run_config(reference, out))
    signal_at(monkeypatch, 3)
    assert cli.main(["train", path]) == 143
    assert stopped_line(capsys) == ("hf-llama-strategies: stopped by SIGTERM at step 3; checkpoint-3 saved; resume "
                                    "with `--resume_from_checkpoint true`")
    # The step being computed was finished and saved, complete; no final model, no results; lock released.
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3", "strategy_plan.json"]
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone with the run
    monkeypatch.undo()
    assert cli.main(["train", path, "--resume_from_checkpoint", "true"]) == 0
    assert_same_weights(out, reference["out"])
    for name in ("checkpoint-4", "checkpoint-6"):
        assert_same_weights(out / name, reference["out"] / name)


def test_a_signal_before_training_keeps_nothing_and_one_after_it_keeps_a_checkpoint(tmp_path, reference, capsys,
                                                                                      monkeypatch):
    from hf_llama_strategies.cli import train as cli_train

    out = tmp_path / "early"
    real_load = cli_train.load_task_data

    def load_then_signal(parsed):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_load(parsed)

    monkeypatch.setattr(cli_train, "load_task_data", load_then_signal)
    assert cli.main(["train", write_yaml(tmp_path / "a.yaml", run_config(reference, out))]) == 138  # 128 + 10
    assert "stopped by SIGUSR1 before training began; nothing of this run was kept" in stopped_line(capsys)
    assert not out.exists()
    monkeypatch.undo()

    # During the final save (no checkpoint at step 6: saves every 4): the partial final files go, a
    # checkpoint of the last step takes their place; the resume saves the final outputs from it.
    out = tmp_path / "late"
    path = write_yaml(tmp_path / "b.yaml", run_config(reference, out, save_steps=4))
    real_save = Trainer.save_model

    def save_then_signal(self, output_dir=None, _internal_call=False):
        real_save(self, output_dir, _internal_call)
        if not _internal_call:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "save_model", save_then_signal)
    assert cli.main(["train", path]) == 143
    assert "stopped by SIGTERM at step 6; checkpoint-6 saved" in stopped_line(capsys)
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-6", "strategy_plan.json"]
    monkeypatch.undo()
    assert cli.main(["train", path, "--resume_from_checkpoint", "true"]) == 0
    assert "checkpoint-6 is the end of this run" in capsys.readouterr().out
    assert_same_weights(out, reference["out"])


_SIGNALLED = textwrap.dedent(
    """
    import os, sys, time
    from transformers import Trainer

    marker, real = os.environ["MARKER"], Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(5)  # the signal arrives from outside, during this step
        return real(self, *args, **kwargs)

    Trainer.training_step = training_step
    from hf_llama_strategies import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_a_signal_from_outside_ends_the_process_with_128_plus_the_signal(tmp_path, reference):
    out, marker = tmp_path / "run", tmp_path / "marker"
    path = write_yaml(tmp_path / "c.yaml", run_config(reference, out))
    child = subprocess.Popen([sys.executable, "-c", _SIGNALLED, "train", path], env=dict(ENV, MARKER=str(marker)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGUSR1)
    _, err = child.communicate(timeout=240)
    assert child.returncode == 138, err[-2000:]
    assert "stopped by SIGUSR1 at step 3; checkpoint-3 saved" in err and "Traceback" not in err
    assert checkpoint_problem(str(out / "checkpoint-3")) is None and not (out / "model.safetensors").exists()


def test_strategy_trainer_option_raises_training_stopped_and_leaves_plain_trainer_signals_alone(tmp_path,
                                                                                                monkeypatch):
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(signal.getsignal(signal.SIGTERM))

    args = make_training_args(tmp_path / "off", max_steps=2)
    StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=TokenDataset(),
                    strategy_args=strategy(precision="fp32"), callbacks=[Watch()]).train()
    assert seen == [signal.SIG_DFL, signal.SIG_DFL]  # no option: transformers' own behaviour

    signal_at(monkeypatch, 2)
    args = make_training_args(tmp_path / "on", max_steps=6, save_strategy="steps", save_steps=4)
    trainer = StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=TokenDataset(),
                              strategy_args=strategy(checkpoint_on_signal=True))
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train()
    assert (stopped.value.code, stopped.value.step, stopped.value.signal_name) == (143, 2, "SIGTERM")
    assert stopped.value.checkpoint == str(tmp_path / "on" / "checkpoint-2")
    assert checkpoint_problem(stopped.value.checkpoint) is None
    assert not isinstance(stopped.value, Exception)  # `except Exception` in a script does not swallow it


def test_transformers_jit_checkpoint_composes_with_staged_checkpoints(tmp_path, reference, capsys, caplog):
    class RequestAt(TrainerCallback):
        """What transformers' SIGTERM handler does after its wait, without the wait."""

        def __init__(self, trainer_ref):
            self.trainer_ref = trainer_ref

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                jit = next(c for c in self.trainer_ref[0].callback_handler.callbacks
                           if type(c).__name__ == "JITCheckpointCallback")
                jit.jit_manager.is_checkpoint_requested = True

    ref = []
    args = make_training_args(tmp_path / "jit", max_steps=8, save_strategy="steps", save_steps=2,
                              enable_jit_checkpoint=True)
    trainer = StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=TokenDataset(),
                              strategy_args=strategy(precision="fp32"), callbacks=[RequestAt(ref)])
    ref.append(trainer)
    with caplog.at_level("WARNING"):
        trainer.train()
    out = tmp_path / "jit"
    assert trainer.jit_checkpoint_step == 3
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    assert not [n for n in os.listdir(out) if n.startswith(("incomplete-", ".tmp-"))]
    assert not [r for r in caplog.records if "incomplete" in r.getMessage()]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # The CLI with checkpoint_on_signal: one SIGTERM handler, ours (transformers' stood down).
    built = []
    real_init = StrategyTrainer.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    import unittest.mock

    with unittest.mock.patch.object(StrategyTrainer, "__init__", keep):
        config = run_config(reference, tmp_path / "cli", max_steps=2, enable_jit_checkpoint=True)
        assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    (jit,) = [c for c in built[0].callback_handler.callbacks if type(c).__name__ == "JITCheckpointCallback"]
    assert jit.jit_manager is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- two runs, one output_dir ------------------------------------------------------------------


_HOLD = "import sys, time; from hf_llama_strategies.training.run_lock import acquire_run_lock as a; " \
        "a(sys.argv[1]); print('locked', flush=True); time.sleep(120)"


def test_a_second_run_into_a_locked_output_dir_is_refused_naming_the_holder(tmp_path, reference, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(out)
        assert cli.main(["train", write_yaml(tmp_path / "c.yaml", run_config(reference, out))]) == 2
        line = one_line_error(capsys)
        assert f"is in use by another run: process {holder.pid} on host " in line and ", started " in line, line
        assert tree(out) == before
        with pytest.raises(OutputDirBusyError, match=f"process {holder.pid}"):
            StrategyTrainer(model=tiny_model("llama"), args=make_training_args(out), train_dataset=TokenDataset(),
                            strategy_args=strategy(lock_output_dir=True))
    finally:
        holder.kill()
        holder.wait()
    # Killed: its lock file stays, the kernel's lock is gone; the next run takes it over and says so.
    assert (out / LOCK_FILE_NAME).exists()
    note = acquire_run_lock(str(out))
    assert note and f"left by process {holder.pid}" in note
    release_run_lock(str(out))
    assert not (out / LOCK_FILE_NAME).exists()


def test_the_lock_is_shared_within_one_process(tmp_path):
    out = tmp_path / "run"
    first = StrategyTrainer(model=tiny_model("llama"), args=make_training_args(out), train_dataset=TokenDataset(),
                            strategy_args=strategy(lock_output_dir=True))
    second = StrategyTrainer(model=tiny_model("llama"), args=make_training_args(out), train_dataset=TokenDataset(),
                             strategy_args=strategy(lock_output_dir=True))
    assert (out / LOCK_FILE_NAME).exists()
    del first, second
    import gc

    gc.collect()
    assert not (out / LOCK_FILE_NAME).exists()


@pytest.mark.multiprocess
def test_two_cli_runs_started_at_once_into_one_output_dir(tmp_path, reference):
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", run_config(reference, out))
    command = [sys.executable, "-m", "hf_llama_strategies", "train", path]
    runs = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(r.wait(timeout=600), *r.communicate()) for r in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    (loser,) = [err for code, _, err in results if code == 2]
    assert "is in use by another run" in loser or "already holds files" in loser, loser
    assert "saved in" not in [o for c, o, _ in results if c == 2][0]
    # The winner's run, whole: its checkpoints and its model, the same as the reference.
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert_same_weights(out, reference["out"])


# -- rotation by step number ---------------------------------------------------------------------


def test_rotation_orders_checkpoints_by_step_not_by_file_time(tmp_path, reference):
    out = copy_run(reference, tmp_path / "run")
    # The clock was moved back an hour after these were written: they look newer than anything now.
    now = time.time()
    for name, ahead in (("checkpoint-2", 7200), ("checkpoint-4", 3600)):
        os.utime(out / name, (now + ahead, now + ahead))
    config = run_config(reference, out, resume_from_checkpoint=True, save_total_limit=2)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 0
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert_same_weights(out / "checkpoint-6", reference["out"] / "checkpoint-6")


# -- a full disk --------------------------------------------------------------------------------


def failing_writes(monkeypatch, where: str, how: str) -> None:
    """Writes whose path contains ``where`` fail as a full disk makes them fail (``how``: which writer)."""
    import safetensors.torch
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def fail(filename):
        if where in str(filename):
            if how == "safetensors":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            if how == "torch":
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_safe, real_torch = mu.safe_save_file, torch.save

    def safe_save(tensors, filename, metadata=None):
        fail(filename)
        return real_safe(tensors, filename, metadata=metadata)

    def torch_save(obj, f, *args, **kwargs):
        fail(f)
        return real_torch(obj, f, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", safe_save)
    monkeypatch.setattr(safetensors.torch, "save_file", safe_save)
    monkeypatch.setattr(torch, "save", torch_save)


@pytest.mark.parametrize("how, target", [("safetensors", "model.safetensors"), ("torch", "optimizer.pt")])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_resumable(tmp_path, reference, capsys, monkeypatch,
                                                                         how, target):
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", run_config(reference, out))
    failing_writes(monkeypatch, os.path.join(".tmp-checkpoint-4", "checkpoint-4", target), how)
    assert cli.main(["train", path]) == EXIT_STORAGE
    line = fault_line(capsys)
    assert "saving checkpoint-4 failed: " in line and str(out / ".tmp-checkpoint-4") in line, line
    if how == "safetensors":
        assert "No space left on device" in line
    assert "bug" not in line
    # What was saved stays; nothing half-written blocks the resume.
    assert sorted(os.listdir(out)) == ["checkpoint-2", "strategy_plan.json"]
    monkeypatch.undo()
    assert cli.main(["train", path, "--resume_from_checkpoint", "true"]) == 0
    assert_same_weights(out, reference["out"])


def test_a_full_disk_at_the_final_save_leaves_a_rerun_or_a_resume_possible(tmp_path, reference, capsys, monkeypatch):
    # A fresh run with no checkpoint: it keeps nothing, so a rerun is the same command.
    out = tmp_path / "fresh"
    path = write_yaml(tmp_path / "a.yaml", run_config(reference, out, save_strategy="no"))
    failing_writes(monkeypatch, str(out / "model.safetensors"), "oserror")
    assert cli.main(["train", path]) == EXIT_STORAGE
    assert "saving the final model failed: No space left on device" in fault_line(capsys)
    assert not out.exists()
    monkeypatch.undo()
    assert cli.main(["train", path]) == 0
    assert_same_weights(out, reference["out"])

    # With checkpoints: they stay, the partial final files go; the resume finishes from checkpoint-6.
    out = tmp_path / "ckpt"
    path = write_yaml(tmp_path / "b.yaml", run_config(reference, out))
    failing_writes(monkeypatch, str(out / "model.safetensors"), "safetensors")
    assert cli.main(["train", path]) == EXIT_STORAGE
    fault_line(capsys)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "strategy_plan.json"]
    monkeypatch.undo()
    assert cli.main(["train", path, "--resume_from_checkpoint", "true"]) == 0
    assert_same_weights(out, reference["out"])


def test_a_full_disk_when_training_begins_is_one_line_and_leaves_nothing(tmp_path, reference, capsys, monkeypatch):
    from hf_llama_strategies.core.plan import StrategyPlan

    def full(self, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StrategyPlan, "save", full)
    out = tmp_path / "run"
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", run_config(reference, out))]) == EXIT_STORAGE
    assert f"saving strategy_plan.json failed: No space left on device ({out})" in fault_line(capsys)
    assert not out.exists()


def test_a_full_disk_while_writing_the_cache_keeps_it_in_memory(tmp_path, caplog, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if "shard-" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with caplog.at_level("WARNING"):
        cached = cache_run(tmp_path, "cached", tmp_path / "cache")
    monkeypatch.undo()
    warned = [r.getMessage() for r in caplog.records if "cannot write to" in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0] and "in memory only" in warned[0]
    assert get_frozen_prefix_cache(cached.model).hits == 16
    plain = cache_run(tmp_path, "plain", tmp_path / "cache", mode="off")
    assert losses(cached) == losses(plain) and snapshot(cached.model) == snapshot(plain.model)


# -- a damaged frozen-prefix cache ------------------------------------------------------------------


def cache_run(tmp_path, name, cache_dir, mode="disk"):
    """A head-only run of 8 fixed-length samples, 2 epochs: the pre-pass has the training's shapes."""
    extra = {"frozen_prefix_cache_dir": str(cache_dir)} if mode == "disk" else {}
    args = make_training_args(tmp_path / name, max_steps=-1, num_train_epochs=2, per_device_eval_batch_size=4)
    trainer = StrategyTrainer(
        model=tiny_model("llama", head="seq_cls", num_hidden_layers=4), args=args,
        train_dataset=TokenDataset(n=8, num_labels=3),
        strategy_args=strategy(frozen_prefix_cache=mode, trainable_layers="none", train_norm=False, **extra),
    )
    trainer.train()
    return trainer


def _damage(shard, kind):
    data = shard.read_bytes()
    if kind == "data_byte":
        shard.write_bytes(data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:])
    elif kind == "header_byte":
        shard.write_bytes(data[:20] + bytes([data[20] ^ 0x01]) + data[21:])
    elif kind == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        shard.write_bytes(b"")
    elif kind == "foreign":
        from safetensors.torch import save_file

        save_file({"00" * 32: torch.zeros(16, 64)}, str(shard))


@pytest.mark.parametrize("kind", ["data_byte", "header_byte", "truncated", "empty", "foreign"])
def test_a_damaged_cache_shard_is_named_set_aside_and_recomputed(tmp_path, caplog, kind):
    cache_dir = tmp_path / "cache"
    cache_run(tmp_path, "first", cache_dir)
    (folder,) = cache_dir.iterdir()
    (shard, *_) = sorted(folder.glob("shard-*.safetensors"))
    _damage(shard, kind)
    with caplog.at_level("WARNING"):
        second = cache_run(tmp_path, "second", cache_dir)
    warned = [r.getMessage() for r in caplog.records if "is not usable" in r.getMessage()]
    assert len(warned) == 1 and str(shard) in warned[0], warned
    assert (folder / (shard.name + ".damaged")).exists()
    cache = get_frozen_prefix_cache(second.model)
    assert cache.misses > 0 and cache.loaded_entries + cache.misses == 8  # its samples computed again
    plain = cache_run(tmp_path, "plain", cache_dir, mode="off")
    # Same shapes as the uncached run: bit for bit, so a damaged state trained on would show.
    assert losses(second) == losses(plain) and snapshot(second.model) == snapshot(plain.model)
    third = cache_run(tmp_path, "third", cache_dir)  # the shard was written again, whole
    assert get_frozen_prefix_cache(third.model).loaded_entries == 8


# -- inputs that are no bug: one line, exit 2, nothing written -------------------------------------


def test_model_folders_without_whole_weights_and_missing_paths_are_one_line(tmp_path, reference, capsys):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    data = (model_dir / "model.safetensors").read_bytes()
    cases = []
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((truncated, "model.safetensors is truncated"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    cases.append((empty, "no model weights (model.safetensors or pytorch_model.bin)"))
    cases.append((tmp_path / "not" / "there", "No such directory"))
    capsys.readouterr()  # save_pretrained's progress bar
    for i, (path, fragment) in enumerate(cases):
        out = tmp_path / f"out{i}"
        config = dict(run_config(reference, out, max_steps=1), model_name_or_path=str(path),
                      tokenizer_name_or_path=reference["config"]["tokenizer_name_or_path"])
        del config["model_config"]
        assert cli.main(["train", write_yaml(tmp_path / f"{i}.yaml", config)]) == 2
        line = one_line_error(capsys)
        assert f"model_name_or_path={str(path)!r}" in line and fragment in line, line
        assert not out.exists()


def test_report_to_a_reporter_that_is_not_installed_is_one_line(tmp_path, reference, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    config = run_config(reference, out, report_to="wandb")
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    assert "report_to='wandb'" in line and "pip install wandb" in line, line
    assert not out.exists()


class NanRate:
    @hookimpl
    def hfls_adjust_plan(self, plan, anatomy, strategy_args, training_args):
        plan.set(plan.select(lambda d: d.name.endswith("up_proj.weight")), "nan_rate plugin", lr=float("nan"))


def test_a_plugin_that_sets_a_learning_rate_to_nan_is_named(tmp_path):
    with pytest.raises(PluginError, match=r"NanRate.*hfls_adjust_plan.*lr=nan \(set by nan_rate plugin\)"):
        build_plan(tiny_model("llama"), strategy(precision="fp32"), make_training_args(tmp_path),
                   plugins=[NanRate()])
    with pytest.raises(PluginError, match="no run survives"):
        StrategyTrainer(model=tiny_model("llama"), args=make_training_args(tmp_path / "out"),
                        train_dataset=TokenDataset(), strategy_args=strategy(), strategy_plugins=[NanRate()])
    assert not (tmp_path / "out").exists()


def _fifo(tmp_path):
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


def _loop(tmp_path):
    path = tmp_path / "loop.jsonl"
    os.symlink(path, path)
    return path


def _long_line(tmp_path):
    path = tmp_path / "one-line.txt"
    with open(path, "wb") as fh:  # 33 MiB without a newline: one example over the limit
        for _ in range(33):
            fh.write(b"word " * (2**20 // 5 + 1))
    return path


def _other_columns(tmp_path):
    path = tmp_path / "valid.csv"
    path.write_text("sentence,label\nhello there,1\nbye now,0\n", encoding="utf-8")
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and symbolic links")
@pytest.mark.parametrize("make, key, fragment", [
    (_fifo, "train_file", "It is a FIFO (named pipe)"),
    (_loop, "train_file", "It is a symbolic link loop"),
    (_long_line, "train_file", "Line 1 is over 32 MiB long"),
    (_other_columns, "validation_file", "text_column='text' is not valid: expected a column of"),
])
def test_data_files_that_are_no_bug_are_one_line(tmp_path, reference, cls_files, capsys, make, key, fragment):
    out = tmp_path / "run"
    extra = {key: str(make(tmp_path))}
    if key == "validation_file":
        extra.update(train_file=cls_files[0], eval_strategy="no")
    config = run_config(reference, out, **extra)
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", config)]) == 2
    line = one_line_error(capsys)
    assert fragment in line and extra[key] in line, line
    assert not out.exists()


def test_an_error_line_quoting_a_huge_value_is_cut(tmp_path, reference, capsys):
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"column_{i}" for i in range(20000)) + "\n", encoding="utf-8")  # a header, no rows
    out = tmp_path / "run"
    assert cli.main(["train", write_yaml(tmp_path / "c.yaml", run_config(reference, out, train_file=str(path)))]) == 2
    line = one_line_error(capsys)
    assert len(line) < 1200 and "characters cut" in line and "but no rows" in line, line[:300]


def test_a_fifo_as_the_config_file_is_one_line(tmp_path, capsys):
    path = _fifo(tmp_path)
    assert cli.main(["train", str(path)]) == 2
    assert "is a FIFO (named pipe)" in one_line_error(capsys)


def test_stopped_and_storage_errors_are_not_strategy_errors():
    # A scheduler tells these apart by the exit code: 2 your input, 74 the machine, 128+N a signal.
    from hf_llama_strategies.errors import StorageError, StrategyError

    assert issubclass(StorageError, OSError) and not issubclass(StorageError, StrategyError)
    assert issubclass(TrainingStopped, SystemExit) and TrainingStopped(15, "SIGTERM", 3, None).code == 143
    err = StorageError("saving checkpoint-4", "/x/.tmp-checkpoint-4", "No space left on device", errno.ENOSPC)
    assert err.errno == errno.ENOSPC and str(err) == (
        "saving checkpoint-4 failed: No space left on device (/x/.tmp-checkpoint-4)")
    assert json.dumps(str(err))


# -- several processes ---------------------------------------------------------------------------


_RANK = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import Trainer

    stop_rank, real = int(os.environ.get("STOP_RANK", "-1")), Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2 and self.args.process_index == stop_rank:
            os.kill(os.getpid(), signal.SIGTERM)  # one rank only: the other hears of it from it
        return real(self, *args, **kwargs)

    Trainer.training_step = training_step
    from hf_llama_strategies import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def launch_two(path, *extra, stop_rank=-1):
    """The CLI in 2 CPU processes (gloo), started as torchrun starts them; returns [(exit code, stderr)]."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", STOP_RANK=str(stop_rank))
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, "train", path, *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=600), p.communicate()[1]) for p in procs]


@pytest.mark.multiprocess
def test_two_processes_stop_together_stage_their_checkpoint_and_resume_past_incomplete_ones(tmp_path, reference):
    out = tmp_path / "run"
    path = write_yaml(tmp_path / "c.yaml", run_config(reference, out, per_device_train_batch_size=1))
    results = launch_two(path, stop_rank=0)
    # SIGTERM reached rank 0 only; both stop after step 3, with one checkpoint written by both.
    assert [code for code, _ in results] == [143, 143], [err[-3000:] for _, err in results]
    assert all("stopped by SIGTERM at step 3; checkpoint-3 saved" in err for _, err in results)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"] and not (out / "model.safetensors").exists()
    for name in checkpoints(out):
        assert checkpoint_problem(str(out / name)) is None
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / name))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    # Incomplete checkpoints a kill left: only the main process sets them aside (two at once collided).
    for step in (8, 10, 12, 14, 16):
        (out / f"checkpoint-{step}").mkdir()
        (out / f"checkpoint-{step}" / "config.json").write_text("{}", encoding="utf-8")
    results = launch_two(path, "--resume_from_checkpoint", "true")
    assert [code for code, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    assert {n for n in os.listdir(out) if n.startswith("incomplete-")} == {
        f"incomplete-checkpoint-{s}" for s in (8, 10, 12, 14, 16)}
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_only_the_process_that_saves_sets_incomplete_checkpoints_aside_the_others_wait(tmp_path):
    from types import SimpleNamespace

    from hf_llama_strategies.training.resume import set_aside_incomplete_once

    (tmp_path / "checkpoint-8").mkdir()
    waited = []
    for should_save in (False, True):
        trainer = SimpleNamespace(args=SimpleNamespace(should_save=should_save, world_size=2),
                                  accelerator=SimpleNamespace(wait_for_everyone=lambda: waited.append(1)))
        moved = set_aside_incomplete_once(str(tmp_path), trainer)
        assert moved == ([str(tmp_path / "incomplete-checkpoint-8")] if should_save else [])
        assert (tmp_path / "checkpoint-8").exists() is not should_save
    assert waited == [1, 1]  # every process meets at the barrier, after the main one renamed
