"""``hf-llama-strategies train``: fine-tune as a config says. Everything is checked before anything is written."""

from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..core.faults import writing
from ..data.local import CAUSAL_LM, SEQ_CLS, SFT
from ..errors import InvalidArgumentError, TrainingStopped
from ..training.checkpoints import checkpoint_problem
from ..training.stop_signal import SignalReceived, SignalStop, signal_name
from .config import ParsedConfig, given, parse_config
from .models import build_model, configure_for_task, fit_embeddings, load_model_config, load_tokenizer, weights_source
from .output_dir import OutputDir
from .quiet import quiet_run

#: Keys whose values are input paths: an output_dir holding one is never moved aside.
_INPUT_KEYS = ("model_name_or_path", "gguf_file", "model_config", "tokenizer_name_or_path", "train_file",
               "validation_file", "deepspeed", "adapter_name_or_path")


@dataclass
class TaskData:
    """What the trainer is built from: the task, the tokenizer and the datasets."""

    task: str
    tokenizer: Any
    data: Any


def run_train(config: dict[str, Any], overrides: Sequence[str] = (), config_file: Optional[str] = None
              ) -> dict[str, float]:
    """Fine-tune as ``config`` says; returns the final metrics. Everything is checked before writing.

    ``config_file``, where ``config`` was read from, is one of the run's inputs (never moved aside).

    Raises:
        TrainingStopped: SIGTERM or SIGUSR1 stopped the run (after a complete checkpoint, once
            training began); no final model or results were written.
        StorageError: the machine failed a write (disk full, ...); what the run had begun of its
            final outputs is removed, its complete checkpoints stay.
    """
    from ..training.loss_plot import require_matplotlib

    parsed = parse_config(config, overrides)
    if parsed.run.plot_loss:
        require_matplotlib()
    if parsed.run.resume_note:
        print(f"hf-llama-strategies: {parsed.run.resume_note}")
    quiet_run(parsed.training)
    if parsed.model.gguf_file:
        weights_source(parsed.model)  # a GGUF model converted (once) before output_dir is touched
    inputs = run_inputs(parsed, config_file)
    signals = SignalStop(defer=False) if parsed.strategy.checkpoint_on_signal else contextlib.nullcontext()
    try:
        with signals, OutputDir(parsed, inputs) as output:
            for note in output.notes:
                print(f"hf-llama-strategies: {note}")
            metrics = _run(parsed, config, overrides)
    except SignalReceived as received:  # before training began: nothing of this run is kept
        raise TrainingStopped(received.signum, signal_name(received.signum), 0, None) from None
    if parsed.training.process_index == 0:
        print(written_summary(parsed.training.output_dir))
    return metrics


def run_inputs(parsed: ParsedConfig, config_file: Optional[str] = None) -> list[str]:
    """The paths a run reads (model, tokenizer, data, DeepSpeed config, its config file): never moved aside."""
    inputs = [str(v) for v in (getattr(a, k, None) for a in parsed for k in _INPUT_KEYS) if isinstance(v, str)]
    return inputs + ([config_file] if config_file else [])


def _run(parsed: ParsedConfig, config: dict[str, Any], overrides: Sequence[str]) -> dict[str, float]:
    """Load, build, train, evaluate, save; a stop signal after training began ends at a complete checkpoint."""
    trainer = None
    try:
        task_data = load_task_data(parsed)
        model = build_task_model(parsed, task_data)
        trainer = build_trainer(parsed, task_data, model, config, overrides)
        metrics = _train_or_finish(trainer, parsed.training)
        if task_data.data.eval is not None:
            metrics.update(_evaluate(trainer, task_data.task))
        with writing("saving trainer_state.json", parsed.training.output_dir):
            trainer.save_state()
        if parsed.run.plot_loss and trainer.is_world_process_zero():
            from ..training.loss_plot import plot_loss

            with writing("writing training_loss.png", parsed.training.output_dir):
                plot_loss(trainer.state.log_history, parsed.training.output_dir)
        return metrics
    except SignalReceived as received:
        raise _stopped_after_training(trainer, received.signum) from None


def _stopped_after_training(trainer: Any, signum: int) -> TrainingStopped:
    """A signal outside the training loop: once steps were trained, make sure a checkpoint holds them."""
    name = signal_name(signum)
    step = trainer.state.global_step if trainer is not None else 0
    if step == 0:
        return TrainingStopped(signum, name, 0, None)
    path = os.path.join(trainer.args.output_dir, f"checkpoint-{step}")
    args = trainer.args
    # After load_best_model_at_end the model holds another step's weights; several processes
    # cannot meet at the save's barriers from wherever the signal found each: resume from the last one.
    if checkpoint_problem(path) is not None and not args.load_best_model_at_end and args.world_size == 1:
        with writing(f"saving checkpoint-{step}", path):
            trainer._save_checkpoint(trainer.model, None)
    return TrainingStopped(signum, name, step, path if checkpoint_problem(path) is None else None)


def written_summary(output_dir: str) -> str:
    """What the run left in ``output_dir``, every file and folder named, and how to look at the logs."""
    from ..training.loss_plot import LOSS_PLOT

    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    lines = [f"written in {output_dir}:"]
    lines += [f"  {name}{os.sep if os.path.isdir(os.path.join(output_dir, name)) else ''}" for name in names]
    if LOSS_PLOT in names:
        lines.append(f"the loss plot: open {os.path.join(output_dir, LOSS_PLOT)}")
    if "runs" in names:
        lines.append(f"TensorBoard logs: tensorboard --logdir {os.path.join(output_dir, 'runs')}  "
                     "(then open http://localhost:6006)")
    return "\n".join(lines)


def load_task_data(parsed: ParsedConfig) -> TaskData:
    """The task (``auto`` inferred from the data), the tokenizer and the tokenised or converted datasets."""
    import datasets

    from ..data.local import detect_task, load_raw, prepare
    from ..data.sft import load_sft_data, looks_like_sft
    from ..data.template_data import load_template_data
    from ..training.trl import require_trl

    # Local files load in moments; their progress bars would bury the plan and any error.
    datasets.disable_progress_bars()
    model_args, data_args = parsed.model, parsed.data
    task = model_args.task
    if task == SFT or (task == "auto" and looks_like_sft(data_args)):
        # A LLaMA-Factory template prepares the tokenizer itself (EOS first, then padding).
        tokenizer = load_tokenizer(model_args, pad_with_eos=data_args.template is None)
        require_trl()
        if data_args.template is not None:
            data = load_template_data(data_args, data_args, tokenizer, seed=parsed.training.seed)
        else:
            data = load_sft_data(data_args, data_args, tokenizer, seed=parsed.training.seed)
        for note in data.notes:
            print(f"hf-llama-strategies: template {data_args.template}: {note}")
        for split, count in data.skipped.items():
            print(f"hf-llama-strategies: skipped {count} bad {split} record(s) (bad_records: skip)")
        return TaskData(SFT, tokenizer, data)
    raw = load_raw(data_args)
    task = detect_task(raw, data_args) if task == "auto" else task
    tokenizer = load_tokenizer(model_args)
    return TaskData(task, tokenizer, prepare(raw, task, tokenizer, data_args))


def build_task_model(parsed: ParsedConfig, task_data: TaskData, meta: bool = False) -> Any:
    """The model ``train`` trains: its config fitted to the task (a classifier's labels), loaded or built.

    ``meta``: built on the meta device, with no weights (for a plan or a memory estimate). A real one
    is built after ``set_seed(seed)``, as transformers' example scripts do: weights the checkpoint
    lacks (a new classification head) start the same in every run of the config.
    """
    model_config = load_model_config(parsed.model)
    # What `plan` does too (cli/plan.py): the same model, the same trainable count.
    configure_for_task(model_config, task_data.task, getattr(task_data.data, "label_names", []), task_data.tokenizer)
    if not meta:
        from transformers import set_seed

        set_seed(parsed.training.seed)
    return build_model(parsed.model, model_config, task_data.task, meta=meta)


def build_trainer(
    parsed: ParsedConfig, task_data: TaskData, model: Any, config: dict[str, Any], overrides: Sequence[str]
) -> Any:
    """The trainer of ``model``: ``StrategyTrainer``, or TRL's SFT trainer with the plan for ``task: sft``."""
    from transformers import DataCollatorWithPadding, default_data_collator

    from ..data.metrics import compute_metrics_for
    from ..training.trainer import StrategyTrainer
    from ..training.trl import build_sft_trainer

    model_args, data_args, training_args, strategy_args, run_args = parsed
    task, tokenizer, data = task_data.task, task_data.tokenizer, task_data.data
    if training_args.eval_strategy != "no" and data.eval is None:
        raise InvalidArgumentError(
            "eval_strategy", getattr(training_args.eval_strategy, "value", training_args.eval_strategy),
            "'no' when there is no validation data", "Give validation_file or validation_split.",
        )
    model, peft_config = _adapted(parsed, task_data, model)
    _cli_defaults(training_args, config, overrides)
    # StrategyTrainer builds and checks the plan before Trainer.__init__ creates output_dir.
    if task == SFT:
        return build_sft_trainer(model, training_args, data_args, data_args, data, tokenizer, strategy_args,
                                 peft_config=peft_config)
    collator = DataCollatorWithPadding(tokenizer) if task == SEQ_CLS else default_data_collator
    return StrategyTrainer(
        model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=tokenizer, data_collator=collator,
        compute_metrics=compute_metrics_for(run_args.metric) if task == SEQ_CLS else None,
        strategy_args=strategy_args,
    )


def _adapted(parsed: ParsedConfig, task_data: TaskData, model: Any) -> tuple[Any, Any]:
    """``model`` with its embeddings grown for a template's new tokens and its adapters applied, and the
    LoRA config TRL is to wrap it with (None: no LoRA, or an adapter that keeps training)."""
    from transformers import set_seed

    from ..training.peft import embedding_module_names, load_adapters, lora_config

    model_args, training_args = parsed.model, parsed.training
    task, tokenizer, data = task_data.task, task_data.tokenizer, task_data.data
    # New embedding rows and adapters are drawn at random: from the run's seed, as LLaMA-Factory seeds first.
    set_seed(training_args.seed)
    resized = fit_embeddings(model, tokenizer) if task == SFT and data.tokenized else None
    if resized:
        print(f"hf-llama-strategies: {resized}")
    if not model_args.use_peft:
        return model, None
    model, notes = load_adapters(model, model_args)
    for note in notes:
        print(f"hf-llama-strategies: {note}")
    if model_args.adapter_name_or_path and not model_args.create_new_adapter:
        return model, None  # the last adapter keeps training
    # New tokens train with the adapter (LLaMA-Factory's resize_vocab does the same).
    extra = embedding_module_names(model) if resized else ()
    config = lora_config(model_args, model, "SEQ_CLS" if task == SEQ_CLS else "CAUSAL_LM", modules_to_save=extra)
    if task == SFT:
        return model, config  # TRL's SFTTrainer wraps it (peft_config), after setting the seed again
    from ..training.peft import require_peft

    set_seed(training_args.seed)
    return require_peft().get_peft_model(model, config), None


def _cli_defaults(training_args: Any, config: dict[str, Any], overrides: Sequence[str]) -> None:
    """What the CLI sets unless the user did: TensorBoard logs, no pinned memory on a CPU."""
    if not given("report_to", config, overrides):
        training_args.report_to = _default_reporters()
    if not given("dataloader_pin_memory", config, overrides) and training_args.device.type == "cpu":
        # Pinned memory only helps host-to-GPU copies; on a CPU run it only warns.
        training_args.dataloader_pin_memory = False


def _train_or_finish(trainer: Any, training_args: Any) -> dict[str, float]:
    """Train (resuming where asked), save the model and the training metrics."""
    from ..training.resume import checkpoint_finished, set_aside_incomplete_once

    out = training_args.output_dir
    resume: Optional[str] = training_args.resume_from_checkpoint
    if resume:
        # The plan check first: a refused resume changes nothing in output_dir.
        if trainer.strategy_callback.plan is not None:
            trainer.strategy_callback.check_resume(resume)
        set_aside_incomplete_once(out, trainer)
    if resume and checkpoint_finished(resume, training_args):
        # Killed after its last checkpoint: its weights are the result (training again would add a step).
        from transformers import TrainerState

        print(f"hf-llama-strategies: {resume} is the end of this run; saving its final outputs")
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        with writing("saving the final model", out):
            trainer.save_model()
        return {}
    result = trainer.train(resume_from_checkpoint=resume)
    jit_step = getattr(trainer, "jit_checkpoint_step", None)
    if jit_step is not None:
        # transformers' enable_jit_checkpoint saved and stopped at SIGTERM: the run is not finished.
        path = os.path.join(out, f"checkpoint-{jit_step}")
        raise TrainingStopped(signal.SIGTERM, "SIGTERM", jit_step, path if os.path.isdir(path) else None)
    with writing("saving the final model", out):
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    return dict(result.metrics)


def _evaluate(trainer: Any, task: str) -> dict[str, float]:
    # An evaluation at the last step (eval_strategy: epoch or steps) is the final one: not run twice.
    last = [e for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == trainer.state.global_step]
    metrics = {k: v for k, v in last[-1].items() if k != "step"} if last else trainer.evaluate()
    if task in (CAUSAL_LM, SFT) and "eval_loss" in metrics:
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    trainer.log_metrics("eval", metrics)
    with writing("saving the evaluation results", trainer.args.output_dir):
        trainer.save_metrics("eval", metrics)
    return dict(metrics)


def _default_reporters() -> list[str]:
    # The CLI promises TensorBoard logs unless the user chose reporters.
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return ["none"]
    return ["tensorboard"]
