"""Metric modules shipped with the package, loaded by path (``evaluate.load`` by name needs the Hub)."""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import InvalidArgumentError

_METRICS_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "metrics")


def metric_path(name: str) -> str:
    """Path of a shipped ``evaluate`` metric module (``accuracy``)."""
    shipped = sorted(os.listdir(_METRICS_DIR))
    # A name only: a path would make evaluate import and run that file's code.
    if not isinstance(name, str) or name not in shipped:
        raise ValueError(f"metric={name!r} is not shipped with hf-llama-strategies; shipped metrics: {shipped}")
    path = os.path.join(_METRICS_DIR, name, f"{name}.py")
    if not os.path.isfile(path):
        raise ValueError(f"metric={name!r} is not shipped with hf-llama-strategies; shipped metrics: {shipped}")
    return path


def load_metric(name: str) -> Any:
    """``evaluate.load`` of a shipped metric, offline."""
    import evaluate

    return evaluate.load(metric_path(name))


def compute_metrics_for(name: str) -> Callable[[Any], dict[str, float]]:
    """A ``Trainer(compute_metrics=...)`` function computing the shipped metric ``name`` from logits (classification).

    Raises:
        InvalidArgumentError: ``name`` is not a shipped metric.
    """
    import numpy as np

    try:
        metric = load_metric(name)
    except ValueError as exc:
        raise InvalidArgumentError("metric", name, "a metric shipped with the package", str(exc)) from None

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return compute_metrics
