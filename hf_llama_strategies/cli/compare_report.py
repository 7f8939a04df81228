"""What ``compare`` reports: the table, the JSON object, the recommendation and its rule, the plot."""

from __future__ import annotations

import math
from typing import Any, Optional

from ..core.units import compact_bytes, format_bytes, format_count
from ..errors import StrategyError
from .candidates import yaml_lines
from .compare_runs import Budget, RunResult, SharedPrefix

#: A candidate within this share of the best final eval loss counts as good as the best.
WITHIN = 0.01


def final_loss(result: RunResult) -> Optional[float]:
    """The eval loss of the run's last evaluation, when it finished."""
    if result.status != "done" or not result.points:
        return None
    loss = result.points[-1].metrics.get("eval_loss")
    return loss if loss is not None and math.isfinite(loss) else None


def alone_seconds(result: RunResult, seconds: float, rows: int, shared: SharedPrefix) -> float:
    """``seconds`` of own training plus the shared prefix's cost for ``rows``: the time as trained alone."""
    return seconds + rows * shared.per_row() if result.served else seconds


def per_step(result: RunResult, shared: SharedPrefix) -> Optional[float]:
    if not result.steps:
        return None
    return alone_seconds(result, result.own_seconds, result.rows, shared) / result.steps


def recommend(results: list[RunResult], shared: SharedPrefix, device_memory: Optional[int],
              budget: Budget) -> Optional[dict]:
    """The recommended run and its rule; ``None`` when no run finished (and fits ``device_memory``).

    Among the runs that finished and fit: for a budget of steps, the fastest (time per step, as
    trained alone) whose final eval loss is within 1% of the best; for a budget of time (every run
    trained as long), the lowest final eval loss.
    """
    pool = [r for r in results if final_loss(r) is not None and (device_memory is None or r.fits)]
    if not pool:
        return None
    best = min(final_loss(r) for r in pool)  # type: ignore[type-var]
    fits = f" among those whose estimated peak fits {format_bytes(device_memory)} per device" if device_memory else ""
    if budget.seconds is not None:
        chosen = min(pool, key=lambda r: (final_loss(r), r.run.index))
        rule = f"the lowest final eval loss ({best:.4f}) after the same training time{fits}"
    else:
        good = [r for r in pool if final_loss(r) <= best + WITHIN * abs(best)]  # type: ignore[operator]
        chosen = min(good, key=lambda r: (per_step(r, shared) or math.inf, r.run.index))
        rule = (f"the fastest candidate (time per step, as trained alone) whose final eval loss is within "
                f"{WITHIN:.0%} of the best ({best:.4f}){fits}")
    return {"index": chosen.run.index, "name": chosen.run.name, "rule": rule, "best_eval_loss": best,
            "yaml": None}


def to_json(results: list[RunResult], shared: Optional[SharedPrefix], budget: Budget, extra: dict[str, Any],
            config: dict[str, Any]) -> dict[str, Any]:
    """One JSON object: the settings, the shared prefix, every candidate in the order given, the recommendation."""
    account = shared or SharedPrefix()
    candidates = [_candidate_json(r, account) for r in results]
    chosen = recommend(results, account, extra.get("device_memory_bytes"), budget)
    if chosen is not None:
        chosen["yaml"] = yaml_lines(next(r.run for r in results if r.run.index == chosen["index"]), config)
    return {
        **extra,
        "budget": {"seconds": budget.seconds} if budget.seconds is not None else {"max_steps": _steps(results)},
        "eval_points": budget.points,
        "shared_prefix": None if shared is None else _shared_json(shared),
        "candidates": candidates,
        "recommendation": chosen,
    }


def _steps(results: list[RunResult]) -> Optional[int]:
    done = [r.steps for r in results if r.status == "done"]
    return max(done) if done else None


def _shared_json(shared: SharedPrefix) -> dict[str, Any]:
    return {
        "boundary": shared.boundary, "prefix": shared.prefix, "frozen_prefix_cache_boundary": shared.option,
        "runs": shared.runs, "rows_computed": shared.rows_computed, "rows_read": shared.rows_read,
        "cost_seconds": round(shared.cost_seconds, 4), "compute_seconds": round(shared.compute_seconds, 4),
        "store_seconds": round(shared.store_seconds, 4), "seconds_per_row": shared.per_row(),
        "saved_seconds": round(shared.rows_read * shared.per_row(), 4), "bytes": shared.bytes,
    }


def _candidate_json(r: RunResult, shared: SharedPrefix) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": r.run.index, "name": r.run.name, "candidate": r.run.candidate.name, "keys": r.run.keys,
        "learning_rate": r.run.parsed.training.learning_rate, "status": r.status, "reason": r.reason or None,
        "trainable_params": r.trainable, "total_params": r.total, "steps": r.steps,
        "seconds": round(alone_seconds(r, r.own_seconds, r.rows, shared), 4),
        "seconds_per_step": per_step(r, shared), "seconds_measured": round(r.own_seconds, 4),
        "shared_prefix": r.served, "prefix_rows": r.rows, "peak_bytes": r.peak_bytes,
        "estimated_peak_bytes": r.estimated_peak, "fits": r.fits, "eval_loss": final_loss(r),
    }
    for point in r.points:
        for key, value in point.metrics.items():
            out[f"{key}_step_{point.step}"] = value
    if r.points:
        out.update({k: v for k, v in r.points[-1].metrics.items() if k != "eval_loss"})
    out["eval_points"] = [
        {"step": p.step, "seconds": round(alone_seconds(r, p.own_seconds, p.rows, shared), 4), **p.metrics}
        for p in r.points
    ]
    out["train_losses"] = r.train_losses
    out["cache"] = r.cache or None
    return out


# -- the table --------------------------------------------------------------------------------------


def table(results: list[RunResult], shared: Optional[SharedPrefix], budget: Budget, peak_what: str,
          device_memory: Optional[int]) -> str:
    """The table: one row per run, in the order given, and the lines under it."""
    account = shared or SharedPrefix()
    labels = _point_labels(results, budget)
    header = ["#", "candidate", "trainable", *labels, "time", "s/step", "peak here"]
    if device_memory is not None:
        header += ["est. peak/device", f"fits {compact_bytes(device_memory)}"]
    accuracy = any("eval_accuracy" in p.metrics for r in results for p in r.points)
    if accuracy:
        header.insert(3 + len(labels), "accuracy")
    rows = [_row(r, account, labels, budget, accuracy, device_memory) for r in results]
    lines = [_aligned([header, *rows])]
    lines += [f"  {r.run.index} ({r.run.name}) {r.status}" + (f": {r.reason}" if r.reason else "")
              for r in results if r.status != "done"]
    estimate = "; est. peak/device: the memory estimate of `plan` (a dry run of one step)" if device_memory else ""
    lines.append(f"time: training as if alone, evaluations left out; peak here: {peak_what}{estimate}")
    if shared is not None:
        lines.append(shared_line(shared))
    return "\n".join(lines)


def shared_line(shared: SharedPrefix) -> str:
    """What was shared and what it saved, in one line."""
    runs = ", ".join(str(i) for i in shared.runs)
    return (
        f"shared: {shared.prefix} (frozen in candidates {runs}) computed once, at {shared.boundary}: "
        f"{shared.rows_computed} rows in {shared.cost_seconds:.2f} s (the prefix's forward {shared.compute_seconds:.2f}"
        f" s, storing {shared.store_seconds:.2f} s; {format_bytes(shared.bytes)}), "
        f"then read {shared.rows_read} times: saved ~{shared.rows_read * shared.per_row():.2f} s; each candidate's "
        "time counts its own rows' share, as trained alone"
    )


def _point_labels(results: list[RunResult], budget: Budget) -> list[str]:
    if budget.seconds is not None:
        return ["loss@0", *(f"@{k}/{budget.points}" for k in range(1, budget.points + 1))]
    steps = sorted({p.step for r in results for p in r.points})
    return [f"loss@{s}" if i == 0 else f"@{s}" for i, s in enumerate(steps)]


def _row(r: RunResult, shared: SharedPrefix, labels: list[str], budget: Budget, accuracy: bool,
         device_memory: Optional[int]) -> list[str]:
    if budget.seconds is not None:
        losses = [f"{p.metrics['eval_loss']:.4f}" if "eval_loss" in p.metrics else "-" for p in r.points]
        losses = (losses + ["-"] * len(labels))[: len(labels)]
    else:
        by_step = {p.step: p.metrics.get("eval_loss") for p in r.points}
        steps = [int(label.split("@")[1]) for label in labels]
        losses = [f"{by_step[s]:.4f}" if by_step.get(s) is not None else "-" for s in steps]
    trainable = "-" if r.trainable is None else format_count(r.trainable)
    if r.trainable is not None and r.total:
        trainable += f" ({100 * r.trainable / r.total:.1f}%)"
    seconds = per_step(r, shared)
    row = [str(r.run.index), r.run.name + (" *" if r.served else ""), trainable, *losses,
           _duration(alone_seconds(r, r.own_seconds, r.rows, shared)) if r.steps else "-",
           "-" if seconds is None else f"{seconds:.3f}",
           "-" if r.peak_bytes is None else compact_bytes(r.peak_bytes)]
    if accuracy:
        last = r.points[-1].metrics.get("eval_accuracy") if r.points else None
        row.insert(3 + len(labels), "-" if last is None else f"{last:.3f}")
    if device_memory is not None:
        row.append("-" if r.estimated_peak is None else compact_bytes(r.estimated_peak))
        row.append("-" if r.fits is None else ("yes" if r.fits else "no"))
    return row


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the plot ---------------------------------------------------------------------------------------


def require_matplotlib() -> None:
    """``--plot`` needs matplotlib (the ``[plot]`` extra): said before anything trains."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise StrategyError("--plot needs matplotlib: pip install 'hf-llama-strategies[plot]'") from None


def plot(results: list[RunResult], shared: Optional[SharedPrefix], path: str) -> None:
    """A PNG of eval loss against training time (as if alone), one line per candidate."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    account = shared or SharedPrefix()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        points = [p for p in r.points if "eval_loss" in p.metrics]
        if points:
            xs = [alone_seconds(r, p.own_seconds, p.rows, account) for p in points]
            ax.plot(xs, [p.metrics["eval_loss"] for p in points], marker="o", label=f"{r.run.index}. {r.run.name}")
    ax.set_xlabel("training time as if alone (s)")
    ax.set_ylabel("eval loss")
    ax.set_title("hf-llama-strategies compare: eval loss against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
