"""Preemption: SIGTERM or SIGUSR1 ends a run at the next optimizer step, after a complete checkpoint.

Schedulers stop jobs with SIGTERM (SLURM, Kubernetes, spot instances, ``kill``); SLURM can send
SIGUSR1 ahead of the end (``--signal=USR1@120``). The default action kills the process at once:
everything since the last checkpoint is lost. :class:`SignalStop` catches both instead: the
training loop finishes its optimizer step, saves ``checkpoint-N`` through the staged path, and
stops; ``train()`` then raises :class:`~hf_llama_strategies.errors.TrainingStopped`, whose exit
code is the one a shell reports for that signal (143 for SIGTERM). A second signal while the
checkpoint is written takes the default action (the staged save leaves no partial checkpoint).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: The signals a run stops on (those of them this platform has).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class SignalReceived(BaseException):
    """A stop signal outside the training loop (raised by a :class:`SignalStop` that does not defer)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalStop:
    """Catches :data:`STOP_SIGNALS` while installed (main thread only; elsewhere it does nothing).

    Args:
        defer: ``True``: remember the signal for the training loop (:attr:`signum`); ``False``:
            raise :class:`SignalReceived` where the program is (before or after training).
    """

    def __init__(self, defer: bool = True) -> None:
        self.defer = defer
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        """Whether its handlers are in place."""
        return bool(self._previous)

    def install(self) -> "SignalStop":
        """Put its handler in place of each stop signal's (in the main thread; elsewhere nothing happens)."""
        if threading.current_thread() is not threading.main_thread() or self.installed:
            return self
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the handlers found by :meth:`install` back."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # A second signal: the default action (the checkpoint being written is staged: no partial one).
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        if not self.defer:
            raise SignalReceived(signum)
        logger.warning(f"{signal_name(signum)} received: stopping after this optimizer step, with a checkpoint.")

    def __enter__(self) -> "SignalStop":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


class StopOnSignalCallback(TrainerCallback):
    """At the end of an optimizer step after a stop signal: save a checkpoint now, skip evaluation, stop training."""

    def __init__(self, stop: Callable[[], Optional[int]]) -> None:
        self._stop = stop
        #: The step of the last checkpoint saved (``None``: none yet in this run).
        self.saved_step: Optional[int] = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._stop() is not None:
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.saved_step = state.global_step
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # The loop saves and evaluates once more at an epoch's end: once the step is saved, neither.
        if self._stop() is not None:
            control.should_save = self.saved_step != state.global_step
            control.should_evaluate = False
            control.should_training_stop = True
        return control
