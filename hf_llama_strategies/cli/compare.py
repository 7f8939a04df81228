"""``hf-llama-strategies compare``: which strategy, for this model and these data, measured in minutes.

Every candidate (a set of strategy keys over the config) trains on a fresh copy of the model, on
the same data in the same order with the same seed, for the same budget, and is evaluated on the
same eval set before training and at fixed points. Where it is exact, work is shared: the frozen
prefix that two or more candidates share is computed once, at the lowest boundary among them,
and read by all of them (``frozen_prefix_cache: disk`` in a folder of the output folder, at
``frozen_prefix_cache_boundary``, each sample computed when first met). Everything is checked
before anything trains; nothing is written outside the output folder.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..core.options import check_positive_int
from ..errors import CliError, InvalidArgumentError, StrategyError
from .candidates import (
    Run,
    build_run,
    build_runs,
    default_candidates,
    expand,
    parse_lr_grid,
    read_candidates,
)
from .compare_report import plot, require_matplotlib, table, to_json
from .compare_runs import Budget, Progress, RunResult, SharedPrefix, train_run
from .config import ParsedConfig, given, one_line, parse_config
from .output_dir import OutputDir
from .quiet import quiet_run
from .train import TaskData, build_task_model, load_task_data, run_inputs

RESULTS_FILE = "compare.json"
CACHE_FOLDER = "prefix-cache"
RUNS_FOLDER = "runs"
#: Training keys that differ between runs and that the memory estimate does not read.
_NOT_ESTIMATED = frozenset({"learning_rate", "output_dir", "logging_dir", "run_name"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)


@dataclass
class CompareOptions:
    """Options of ``compare`` beside the config keys."""

    candidates: Optional[str] = None
    budget: Optional[float] = None
    device_memory: Optional[int] = None
    plot: Optional[str] = None
    json: bool = False
    eval_points: int = 4
    lr_grid: Optional[list[float]] = None
    keep_runs: bool = False
    share_prefix: bool = True


_VALUED = {
    "candidates": "a YAML file or inline YAML list, e.g. --candidates '[{trainable_layers: \"-2:\"}]'",
    "budget": "a duration, e.g. --budget 10m", "device_memory": "a memory size, e.g. --device_memory 80GiB",
    "plot": "a file name, e.g. --plot compare.png", "eval_points": "a number, e.g. --eval_points 4",
    "lr_grid": "learning rates, e.g. --lr_grid 1e-4,3e-4", "share_prefix": "true or false",
}


def split_compare_options(overrides: list[str]) -> tuple[CompareOptions, list[str]]:
    """Take ``compare``'s own options out of the ``--key value`` overrides."""
    from ..memory.fit import parse_size

    rest: list[str] = []
    options = CompareOptions()
    tokens = iter(overrides)
    for token in tokens:
        name, eq, value = token.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key in ("json", "keep_runs") and not eq:
            setattr(options, key, True)
            continue
        if key not in _VALUED:
            rest.append(token)
            continue
        if not eq:
            value = next(tokens, None)
            if value is None or value.startswith("--"):
                raise CliError(f"--{key} needs {_VALUED[key]}")
        if key == "budget":
            options.budget = parse_duration(value)
        elif key == "device_memory":
            options.device_memory = parse_size(value, "--device_memory")
        elif key == "eval_points":
            options.eval_points = check_positive_int("--eval_points", value, maximum=100, from_text=True)
        elif key == "lr_grid":
            options.lr_grid = parse_lr_grid(value)
        elif key == "share_prefix":
            options.share_prefix = _flag("--share_prefix", value)
        else:
            setattr(options, key, value)
    return options, rest


def _flag(option: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in ("true", "false"):
        raise InvalidArgumentError(option, value, "true or false")
    return word == "true"


def parse_duration(text: str, option: str = "--budget") -> float:
    """Seconds in ``text``: ``90s``, ``10m``, ``1.5h`` (a bare number: seconds)."""
    match = _DURATION.match(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise InvalidArgumentError(option, text, "a positive duration such as 90s, 10m or 1.5h")
    unit = (match.group(2) or "s").lower()[0]
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]


def run_compare(config: dict[str, Any], overrides: Sequence[str], options: CompareOptions) -> dict[str, Any]:
    """Train every candidate as ``options`` say; print the table (or ``--json``); return the JSON object."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError(
            "compare trains its candidates one after another in one process: run it without torchrun or "
            "accelerate launch (it uses the process's GPU), then train the chosen candidate as you launch `train`."
        )
    config = dict(config)
    source = options.candidates if options.candidates is not None else config.pop("candidates", None)
    config.pop("candidates", None)
    base = parse_config(config, overrides)
    quiet_run(base.training)  # as `train`: nothing about packages its candidates do not use
    _check_base(base)
    if options.plot:
        require_matplotlib()
    out = os.path.abspath(base.training.output_dir)
    settings = _settings_for(base, config, overrides, out)
    user = None
    if source is not None:
        origin = "--candidates" if options.candidates is not None else "candidates"
        user = build_runs(expand(read_candidates(source, origin), options.lr_grid), config, overrides, settings)
    emit = _printer(options)
    stdout = sys.stdout
    # With --json, standard output holds the JSON object alone: whatever a library prints goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if options.json else contextlib.nullcontext()
    # One rule for an occupied output_dir, as for `train`: refused, or moved aside with overwrite_output_dir.
    with OutputDir(base, run_inputs(base)) as output, quiet:
        for note in output.notes:
            emit(f"hf-llama-strategies: {note}")
        task_data = load_task_data(base)
        if task_data.data.eval is None:
            raise _no_eval_data()
        # The copy every candidate starts from: built as `train` builds it, at the same point.
        pristine = build_task_model(base, task_data)
        meta = build_task_model(base, task_data, meta=True)
        runs = user if user is not None else _default_runs(meta, base, config, overrides, settings, options, emit)
        session = _Session(runs, base, config, overrides, options, out, emit, stdout)
        try:
            return session.run(pristine, meta, task_data)
        except KeyboardInterrupt:
            if not session.interrupted_report:
                raise
    # Raised outside OutputDir, which would remove a failed run's files: the partial report stays.
    raise KeyboardInterrupt


def _check_base(base: ParsedConfig) -> None:
    """What ``compare`` needs of the config beyond what ``train`` needs: eval data, fresh runs."""
    data = base.data
    if not (data.validation_file or data.validation_split or getattr(data, "sft_eval_datasets", None)):
        raise _no_eval_data()
    if base.training.resume_from_checkpoint:
        raise InvalidArgumentError(
            "resume_from_checkpoint", base.training.resume_from_checkpoint, "unset for compare",
            "Every candidate trains from the model as loaded.",
        )
    if base.training.push_to_hub:
        raise InvalidArgumentError("push_to_hub", True, "false for compare", "Its candidates are trial runs.")


def _no_eval_data() -> CliError:
    return CliError(
        "compare needs evaluation data (every candidate is judged by its eval loss): give validation_file, or "
        "validation_split (a fraction of train_file held out)."
    )


def _settings_for(base: ParsedConfig, config: dict[str, Any], overrides: Sequence[str],
                  out: str) -> Callable[[int, str], dict[str, Any]]:
    """The keys ``compare`` sets in every run: its own folder, its evaluations, no checkpoints, no plan table."""
    report_to = None if given("report_to", config, overrides) else "none"

    def settings(index: int, name: str) -> dict[str, Any]:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:48] or "run"
        keys = {"output_dir": os.path.join(out, RUNS_FOLDER, f"{index:02d}-{slug}"), "eval_strategy": "no",
                "eval_on_start": True, "save_strategy": "no", "load_best_model_at_end": False, "disable_tqdm": True,
                "print_plan": False, "overwrite_output_dir": False}
        if report_to is not None:
            keys["report_to"] = report_to
        return keys

    return settings


def _printer(options: CompareOptions) -> Callable[[str], None]:
    """Where ``compare``'s lines go: standard output, or standard error beside ``--json``."""
    stream = sys.stderr if options.json else sys.stdout

    def emit(line: str) -> None:
        print(line, file=stream, flush=True)

    return emit


def _default_runs(meta: Any, base: ParsedConfig, config: dict[str, Any], overrides: Sequence[str],
                  settings: Callable[[int, str], dict[str, Any]], options: CompareOptions,
                  emit: Callable[[str], None]) -> list[Run]:
    """The default candidates for this model (and ``--lr_grid``)."""
    from ..planner import build_plan

    num_layers = build_plan(meta).num_layers
    candidates = default_candidates(num_layers)
    emit(f"hf-llama-strategies compare: no candidates given; the defaults for {num_layers} layers: "
         + "; ".join(c.name for c in candidates))
    return build_runs(expand(candidates, options.lr_grid), config, overrides, settings)


class _Session:
    """One ``compare``: plan every run, decide what is shared, train them, report."""

    def __init__(self, runs: list[Run], base: ParsedConfig, config: dict[str, Any], overrides: Sequence[str],
                 options: CompareOptions, out: str, emit: Callable[[str], None], stdout: Any) -> None:
        self.results = [RunResult(run) for run in runs]
        self.stdout = stdout
        self.base, self.config, self.overrides = base, config, overrides
        self.options, self.out, self.emit = options, out, emit
        self.budget = Budget(options.budget, options.eval_points)
        self.shared: Optional[SharedPrefix] = None
        self.cache_dir = os.path.join(out, CACHE_FOLDER)
        #: Ctrl-C came after the runs began and the partial compare.json was written.
        self.interrupted_report = False
        self._estimates: dict[str, int] = {}

    def run(self, pristine: Any, meta: Any, task_data: TaskData) -> dict[str, Any]:
        import time

        started = time.perf_counter()
        for result in self.results:
            self._plan(result, meta)
        self.shared = self._share(meta)
        try:
            self._train_all(pristine, task_data)
        except KeyboardInterrupt:
            self.emit("hf-llama-strategies compare: interrupted; the candidates so far:")
            self._report(time.perf_counter() - started, partial=True)
            self.interrupted_report = True
            raise
        return self._report(time.perf_counter() - started)

    def _plan(self, result: RunResult, meta: Any) -> None:
        """The run's plan on the meta device: refused here when the model cannot take it; its memory estimate."""
        from ..context import RunContext
        from ..memory.dry_run import estimate_training_memory
        from ..planner import build_plan

        parsed = result.run.parsed
        try:
            context = RunContext.create(parsed.strategy, parsed.training, model=meta)
            training_args = context.resolve_training_arguments(in_place=False)
            plan = build_plan(meta, context=context)
        except StrategyError as exc:
            return self._refuse(result, one_line(str(exc)))
        result.trainable, result.total = plan.num_trainable, plan.num_parameters
        if not plan.num_trainable:
            why = "; ".join(plan.notes) or "no parameter is trainable"
            return self._refuse(result, f"nothing trains: {why}")
        if self.options.device_memory is None:
            return  # the estimate (a dry run of one step, seconds per run) answers --device_memory
        # A learning-rate grid's runs differ in nothing the estimate reads: one dry run serves them.
        training = {k: v for k, v in parsed.training.to_dict().items() if k not in _NOT_ESTIMATED}
        key = json.dumps([parsed.strategy.to_dict(), training], sort_keys=True, default=str)
        if key not in self._estimates:
            self._estimates[key] = estimate_training_memory(
                meta, parsed.strategy, training_args, seq_len=parsed.data.max_seq_length, context=context
            ).peak_bytes
        result.estimated_peak = self._estimates[key]
        result.fits = result.estimated_peak <= self.options.device_memory

    def _refuse(self, result: RunResult, reason: str) -> None:
        result.status, result.reason = "refused", reason
        self.emit(f"hf-llama-strategies compare: candidate {result.run.index} ({result.run.name}) refused: {reason}")

    def _share(self, meta: Any) -> Optional[SharedPrefix]:
        """The lowest boundary that two or more runs can read their frozen prefix from; those runs served."""
        if not self.options.share_prefix:
            return None
        own = {}
        for result in self.results:
            if result.status == "waiting":
                boundary = self._boundary(result.run, meta, None)[1]
                if boundary is not None:
                    own[result.run.index] = boundary
        if len(own) < 2:
            return None
        lowest = min(own.values(), key=_boundary_order)
        option = None if all(b == lowest for b in own.values()) else lowest["index"]
        served = {}
        for result in self.results:
            if result.run.index in own:
                variant, boundary = self._boundary(result.run, meta, option)
                if boundary is not None:
                    served[result.run.index] = variant
        if len(served) < 2:
            return None
        for result in self.results:
            if result.run.index in served:
                result.run, result.served = served[result.run.index], True
        return SharedPrefix(option=option, boundary=_describe_boundary(lowest), prefix=_prefix_text(lowest),
                            runs=sorted(served))

    def _boundary(self, run: Run, meta: Any, option: Optional[int]) -> tuple[Run, Optional[dict[str, Any]]]:
        """The run reading the frozen prefix from its own boundary (or ``option``), and where that lies.

        The boundary is ``None`` where the run cannot read one (layer 0 or the embeddings train, dropout
        below it...): that run trains as given.
        """
        from ..context import RunContext
        from ..planner import build_plan

        keys = {"frozen_prefix_cache": "disk", "frozen_prefix_cache_dir": self.cache_dir,
                "frozen_prefix_cache_prepass": False}
        if option is not None:
            keys["frozen_prefix_cache_boundary"] = option
        try:
            variant = build_run(run.index, run.name, run.candidate, run.keys, self.config, self.overrides,
                                {**run.settings, **keys})
            context = RunContext.create(variant.parsed.strategy, variant.parsed.training, model=meta)
            plan = build_plan(meta, context=context)
        except StrategyError:
            return run, None
        boundary = (plan.settings.get("frozen_prefix_cache") or {}).get("boundary")
        return variant, boundary

    def _train_all(self, pristine: Any, task_data: TaskData) -> None:
        to_train = [r for r in self.results if r.status == "waiting"]
        if not to_train:
            return
        progress = Progress(len(to_train), self.budget)
        try:
            for position, result in enumerate(to_train, start=1):
                self._train_one(result, pristine, task_data, progress)
                progress.finish_run(position)
        finally:
            progress.close()
            for result in self.results:
                if result.status == "waiting":
                    result.status = "not run"
            if not self.options.keep_runs:
                shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _train_one(self, result: RunResult, pristine: Any, task_data: TaskData, progress: Progress) -> None:
        import torch

        account = self.shared or SharedPrefix()
        try:
            train_run(result, pristine, task_data, account, self.budget, progress, self.options.keep_runs)
        except KeyboardInterrupt:
            result.status = "interrupted"
            raise
        except StrategyError as exc:
            self._refuse(result, one_line(str(exc)))
        except RuntimeError as exc:
            if not _out_of_memory(exc):
                raise
            # The machine's limit, not a bug: this candidate needs more memory than there is; the others run.
            result.status, result.reason = "out of memory", one_line(str(exc))[:200]
            self.emit(f"hf-llama-strategies compare: candidate {result.run.index} ({result.run.name}) ran out of "
                      "memory; the others still run")
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not self.options.keep_runs:
                shutil.rmtree(result.run.parsed.training.output_dir, ignore_errors=True)
                _remove_if_empty(os.path.join(self.out, RUNS_FOLDER))

    def _report(self, wall_seconds: float, partial: bool = False) -> dict[str, Any]:
        device = self.base.training.device.type
        measured = next((r.peak_what for r in self.results if r.peak_what), "")
        extra = {"command": "compare", "partial": partial, "output_dir": self.out, "device": device,
                 "wall_seconds": round(wall_seconds, 3), "load_average": _load_average(),
                 "peak_memory_measures": measured, "device_memory_bytes": self.options.device_memory}
        report = to_json(self.results, self.shared, self.budget, extra, self.config)
        with open(os.path.join(self.out, RESULTS_FILE), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        if self.options.plot:
            path = self.options.plot if os.path.isabs(self.options.plot) else os.path.join(self.out, self.options.plot)
            plot(self.results, self.shared, path)
            report["plot"] = path
        self._print(report, wall_seconds)
        return report

    def _print(self, report: dict[str, Any], wall_seconds: float) -> None:
        if self.options.json:
            print(json.dumps(report, indent=2), file=self.stdout)
            return
        print(table(self.results, self.shared, self.budget, report["peak_memory_measures"] or "-",
                    self.options.device_memory))
        chosen = report["recommendation"]
        if chosen is not None:
            print(f"recommended: candidate {chosen['index']} ({chosen['name']}), {chosen['rule']}. Paste into your "
                  "config:")
            print("\n".join(f"  {line}" for line in chosen["yaml"].splitlines()))
        else:
            print("no recommendation: no candidate finished with an eval loss")
        where = f"; plot: {report['plot']}" if "plot" in report else ""
        print(f"{len(self.results)} candidates in {wall_seconds:.1f} s; results: "
              f"{os.path.join(self.out, RESULTS_FILE)}{where}")


def _boundary_order(boundary: dict[str, Any]) -> tuple[int, int]:
    return int(boundary["index"]), {"layer": 0, "norm": 1, "head": 2}.get(boundary["kind"], 3)


def _describe_boundary(boundary: dict[str, Any]) -> str:
    kind = boundary["kind"]
    if kind == "layer":
        return f"the input of layers.{boundary['index']}"
    return "the final norm's input" if kind == "norm" else "the head's input"


def _prefix_text(boundary: dict[str, Any]) -> str:
    index = int(boundary["index"])
    layers = "layer 0" if index == 1 else f"layers 0-{index - 1}"
    extra = " and the final norm" if boundary["kind"] == "head" else ""
    return f"the embeddings and {layers}{extra}"


def _out_of_memory(exc: RuntimeError) -> bool:
    """A GPU's ``OutOfMemoryError``, or the CPU allocator's "can't allocate memory"."""
    import torch

    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if k)
    return isinstance(exc, kinds) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def _remove_if_empty(folder: str) -> None:
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


__all__ = ["CompareOptions", "parse_duration", "run_compare", "split_compare_options"]
