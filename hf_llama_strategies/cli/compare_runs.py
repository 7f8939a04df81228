"""One run of ``compare``: a fresh copy of the model, trained as ``train`` trains it, timed as if alone.

Its time is the training loop's wall time less its evaluations and less the shared frozen
prefix it computed for others; the prefix's cost for the rows it trained on is then added back
at the prefix's measured cost per row, so that every run is timed as it would train alone.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from transformers import TrainerCallback

from ..memory.peak import PeakMemory
from .candidates import Run
from .train import TaskData, build_trainer

#: Evaluation metrics that describe the evaluation itself, not the model.
_EVAL_TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


@dataclass
class Budget:
    """What every run gets: its steps (the config's ``max_steps`` or epochs), or ``seconds`` of training.

    Attributes:
        seconds: ``--budget``, in seconds of training as if alone; ``None``: the config's steps.
        points: evaluations after the one before training, at equal shares of the budget.
    """

    seconds: Optional[float]
    points: int


@dataclass
class EvalPoint:
    """One evaluation: at which step, after how much training, and what it measured."""

    step: int
    own_seconds: float
    rows: int
    metrics: dict[str, float]


@dataclass
class RunResult:
    """What ``compare`` learned of one run (the table's row, the JSON's candidate).

    Attributes:
        status: ``waiting``, ``done``, ``refused``, ``out of memory``, ``interrupted`` or ``not run``.
        own_seconds: training time here, less evaluations and the shared prefix computed for others.
        rows: training rows the shared prefix served (their prefix is not in ``own_seconds``).
        served: the run read the shared frozen prefix.
        peak_bytes: the peak memory measured here (:class:`~..memory.peak.PeakMemory`).
        peak_what: what ``peak_bytes`` counts, in words.
    """

    run: Run
    status: str = "waiting"
    reason: str = ""
    trainable: Optional[int] = None
    total: Optional[int] = None
    estimated_peak: Optional[int] = None
    fits: Optional[bool] = None
    served: bool = False
    steps: int = 0
    own_seconds: float = 0.0
    rows: int = 0
    points: list[EvalPoint] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    peak_what: str = ""
    cache: dict[str, float] = field(default_factory=dict)


@dataclass
class SharedPrefix:
    """The account of the frozen prefix the served runs share: what computing it cost, what it served.

    Attributes:
        option: ``frozen_prefix_cache_boundary`` of the served runs (``None``: their own boundary).
        boundary: where the cached forward starts, in words (``layers.2``).
        runs: the served runs' indices.
    """

    option: Optional[int] = None
    boundary: str = ""
    prefix: str = ""
    runs: list[int] = field(default_factory=list)
    compute_seconds: float = 0.0
    store_seconds: float = 0.0
    rows_computed: int = 0
    rows_read: int = 0
    loaded: int = 0
    bytes: int = 0
    #: The prefix's forward for rows computed during training steps, and those rows: the cost per row a
    #: run alone pays (the first evaluation's rows also pay the process's first forward; storing is
    #: compare's own work).
    train_seconds: float = 0.0
    train_rows: int = 0

    @property
    def cost_seconds(self) -> float:
        """What computing the prefix once cost ``compare``: the forward and storing the rows."""
        return self.compute_seconds + self.store_seconds

    def per_row(self, seconds: float = 0.0, rows: int = 0) -> float:
        """The prefix's forward per row computed in training steps (with ``seconds``, ``rows`` of a run training)."""
        seconds, rows = self.train_seconds + seconds, self.train_rows + rows
        if rows:
            return seconds / rows
        return self.compute_seconds / self.rows_computed if self.rows_computed else 0.0

    def add(self, cache: Any, train_seconds: float, train_rows: int) -> dict[str, float]:
        """Count one finished run's cache (and its forward of rows computed in training steps) in; its figures."""
        own = {"rows_computed": int(cache.misses), "rows_read": int(cache.hits),
               "compute_seconds": float(cache.compute_seconds), "store_seconds": float(cache.store_seconds),
               "loaded": int(cache.loaded_entries)}
        self.compute_seconds += own["compute_seconds"]
        self.store_seconds += own["store_seconds"]
        self.rows_computed += own["rows_computed"]
        self.rows_read += own["rows_read"]
        self.loaded += own["loaded"]
        self.bytes = max(self.bytes, int(cache.nbytes))
        self.train_seconds += train_seconds
        self.train_rows += train_rows
        return own


class Progress:
    """One progress bar across the runs (standard error): steps, or seconds of a time budget."""

    def __init__(self, runs: int, budget: Budget) -> None:
        from tqdm.auto import tqdm

        self.runs, self.budget = runs, budget
        #: One run's part of the bar: its steps, or the seconds of the budget.
        self.share: Optional[float] = budget.seconds
        total = runs * budget.seconds if budget.seconds is not None else None
        self.bar = tqdm(total=total, unit="s" if budget.seconds is not None else "step", file=sys.stderr,
                        dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]")

    def start(self, result: RunResult, max_steps: int) -> None:
        if self.share is None:
            self.share = float(max_steps)
            self.bar.total = self.runs * max_steps
        self.bar.set_description(f"compare {result.run.index}/{self.runs}: {result.run.name}")

    def advance(self, amount: float) -> None:
        self.bar.update(amount)

    def finish_run(self, position: int) -> None:
        """Fill the bar to the end of the ``position``-th run (one that stopped early, or never started)."""
        if self.share is not None and position * self.share > self.bar.n:
            self.bar.update(position * self.share - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class RunMeter(TrainerCallback):
    """Times one run as if alone, asks for its evaluations at fixed points, stops it at its budget."""

    def __init__(self, result: RunResult, budget: Budget, shared: SharedPrefix, cache_of: Callable[[], Any],
                 progress: Optional[Progress]) -> None:
        self.result, self.budget, self.shared, self.progress = result, budget, shared, progress
        self.cache_of = cache_of
        self.cache: Any = None
        self.started = self.mark = 0.0
        self.eval_seconds = 0.0
        self.prefix_seconds = 0.0  # computing and storing rows for the others, in training steps
        self.forward_seconds = 0.0  # of which the prefix's forward
        self.computed = 0  # rows computed in training steps
        self.steps_due: set[int] = set()
        self.next_point = 1
        self.before = (0.0, 0.0, 0, 0)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.cache = self.cache_of() if self.result.served else None
        self.started = self.mark = time.perf_counter()
        if self.budget.seconds is None:
            self.steps_due = eval_steps(state.max_steps, self.budget.points)
        if self.progress is not None:
            self.progress.start(self.result, state.max_steps)

    def _counters(self) -> tuple[float, float, int, int]:
        """The cache's seconds computing and storing, rows met and rows computed so far."""
        cache = self.cache
        if cache is None:
            return 0.0, 0.0, 0, 0
        return (float(cache.compute_seconds), float(cache.store_seconds), int(cache.hits + cache.misses),
                int(cache.misses))

    def clock(self) -> float:
        """Training time so far as if alone: its own, plus the prefix's forward for its rows."""
        return self.result.own_seconds + self.result.rows * self.shared.per_row(self.forward_seconds, self.computed)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before = self._counters()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        forward, store, rows, computed = self._counters()
        self.forward_seconds += forward - self.before[0]
        self.prefix_seconds += forward - self.before[0] + store - self.before[1]
        self.result.rows += rows - self.before[2]
        self.computed += computed - self.before[3]
        before = self.clock()
        self.result.own_seconds = now - self.started - self.eval_seconds - self.prefix_seconds
        self.result.steps = state.global_step
        clock = self.clock()
        if self.budget.seconds is None:
            control.should_evaluate = state.global_step in self.steps_due
            advance = 1.0
        else:
            control.should_evaluate = self._time_point_due(clock) or state.global_step >= state.max_steps
            if clock >= self.budget.seconds:
                control.should_training_stop = control.should_evaluate = True
            advance = min(clock, self.budget.seconds) - min(before, self.budget.seconds)
        if self.progress is not None:
            self.progress.advance(advance)
        self.mark = time.perf_counter()

    def _time_point_due(self, clock: float) -> bool:
        due = False
        assert self.budget.seconds is not None
        while self.next_point <= self.budget.points and clock >= self.budget.seconds * self.next_point / (
                self.budget.points):
            due, self.next_point = True, self.next_point + 1
        return due

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Optional[dict] = None, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.eval_seconds += now - self.mark
        self.mark = now
        kept = {k: float(v) for k, v in (metrics or {}).items()
                if k.startswith("eval_") and k not in _EVAL_TIMING and isinstance(v, (int, float))}
        self.result.points.append(EvalPoint(state.global_step, self.result.own_seconds, self.result.rows, kept))


def eval_steps(max_steps: int, points: int) -> set[int]:
    """The steps of ``points`` evaluations at equal shares of ``max_steps`` (the last at the end)."""
    return {math.ceil(max_steps * k / points) for k in range(1, points + 1)} - {0}


def train_run(result: RunResult, pristine: Any, task_data: TaskData, shared: SharedPrefix, budget: Budget,
              progress: Optional[Progress], keep: bool) -> None:
    """Train ``result.run`` on a fresh copy of ``pristine`` as ``train`` would; fill in ``result``.

    The copy is exact (``copy.deepcopy``: every parameter and buffer byte for byte), and faster
    than loading the model again (``benchmarks/compare.py`` measures both). ``keep``: the run's
    folder keeps the trained model and its state; otherwise ``compare`` deletes the folder.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    run = result.run
    peak = PeakMemory(run.parsed.training.device.type)
    peak.start()
    model = copy.deepcopy(pristine)
    trainer = build_trainer(run.parsed, task_data, model, run.config, run.overrides)
    for noisy in (PrinterCallback, ProgressCallback):  # compare prints its own progress and table
        trainer.remove_callback(noisy)

    def cache_of() -> Any:
        context = getattr(getattr(trainer, "strategy_callback", None), "context", None)
        return None if context is None else context.reports.get("frozen_prefix_cache")

    meter = RunMeter(result, budget, shared, cache_of, progress)
    trainer.add_callback(meter)
    try:
        trainer.train()
        result.status = "done"
    finally:
        result.train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result.peak_bytes, result.peak_what = peak.read(), peak.what
        if meter.cache is not None:
            result.cache = shared.add(meter.cache, meter.forward_seconds, meter.computed)
    if keep:
        trainer.save_model()
        trainer.save_state()
