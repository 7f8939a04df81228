"""``training_loss.png``: a run's losses and learning rates by step, from the Trainer's log history."""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..errors import InvalidArgumentError

LOSS_PLOT = "training_loss.png"


def require_matplotlib(option: str = "plot_loss") -> None:
    """Refuse ``plot_loss: true`` up front when matplotlib is missing (before anything is written)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            option, True, "false, or install matplotlib: pip install 'hf-llama-strategies[plot]'"
        ) from None


def _series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], float(entry[key])) for entry in log_history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss(log_history: Sequence[dict[str, Any]], output_dir: str) -> str:
    """Write ``training_loss.png`` in ``output_dir``; returns its path.

    The upper panel shows the training loss by optimizer step and the evaluation loss (an
    evaluation at step 0, ``eval_on_start``, is the untrained model's); the lower one the
    learning rate of each optimizer group (``learning_rate/<group>``, which ``StrategyTrainer``
    logs), or the Trainer's one rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for entry in log_history for k in entry if k.startswith("learning_rate/")}) or ["learning_rate"]
    fig, (losses, rates) = plt.subplots(2, 1, sharex=True, figsize=(7, 6), height_ratios=(2, 1))
    for key, label, style in (("loss", "training loss", "-"), ("eval_loss", "evaluation loss", "o-")):
        steps, values = _series(log_history, key)
        if steps:
            losses.plot(steps, values, style, label=label)
    losses.set_ylabel("loss")
    losses.legend()
    losses.grid(alpha=0.3)
    for key in keys:
        steps, values = _series(log_history, key)
        if steps:
            rates.plot(steps, values, label=key.partition("/")[2] or "learning rate")
    rates.set_xlabel("optimizer step")
    rates.set_ylabel("learning rate")
    if rates.get_legend_handles_labels()[0]:
        rates.legend(fontsize="small")
    rates.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(output_dir, LOSS_PLOT)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
