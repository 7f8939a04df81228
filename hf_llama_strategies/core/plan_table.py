"""The plan as a text table: one row per block (embeddings, runs of alike layers, norm, head), a total.

Pure functions of the decisions; :meth:`StrategyPlan.table` adds the title and the notes.
"""

from __future__ import annotations

from .anatomy import EMBEDDINGS, HEAD, NORM, OTHER
from .decisions import ParamDecision, decision_nbytes, is_dynamic
from .units import compact_bytes, format_count


def _lr_text(decisions: list[ParamDecision]) -> str:
    trained = [d for d in decisions if d.trainable]
    if not trained:
        return "-"
    # "base": TrainingArguments.learning_rate; "x0.5": relative to it, in a plan built
    # without TrainingArguments; a number: an absolute rate.
    base = any(d.lr is None and d.lr_scale is None for d in trained)
    scales = sorted({d.lr_scale for d in trained if d.lr is None and d.lr_scale is not None})
    rates = sorted({d.lr for d in trained if d.lr is not None})
    texts = ["base"] * base + [f"x{s:.3g}" for s in scales] + [f"{lr:.3g}" for lr in rates]
    if len(texts) <= 2:
        return ", ".join(texts)
    return f"{texts[0]}..{texts[-1]}"


def _starts_text(decisions: list[ParamDecision]) -> str:
    """When the block's trainable parameters train: ``step 0``, ``step 20``, ``lisa``, ``step 0..40``."""
    trained = [d for d in decisions if d.trainable]
    if not trained:
        return "-"
    parts = []
    for schedule in [None, *sorted({d.schedule for d in trained if d.schedule is not None})]:
        steps = sorted({d.active_from for d in trained if d.schedule == schedule})
        if not steps:
            continue
        text = f"step {steps[0]}" if len(steps) == 1 else f"step {steps[0]}..{steps[-1]}"
        if schedule is not None:
            text = schedule if steps == [0] else f"{schedule} from {text}"
        parts.append(text)
    return ", ".join(parts)


def _row(label: str, decisions: list[ParamDecision], dynamic: bool = False) -> tuple[str, ...]:
    total = sum(d.numel for d in decisions)
    trainable = sum(d.numel for d in decisions if d.trainable)
    if trainable == total:
        trained = "all"
    elif trainable == 0:
        trained = "none"
    else:
        trained = f"{format_count(trainable)} ({100 * trainable / total:.0f}%)"
    dtypes = ",".join(sorted({d.dtype.replace("torch.", "") for d in decisions}))
    memory = compact_bytes(sum(decision_nbytes(d) for d in decisions))
    row = (label, format_count(total), trained, _lr_text(decisions), dtypes, memory)
    # The start column appears only for dynamic plans, so a static table stays as it was.
    return row[:3] + (_starts_text(decisions),) + row[3:] if dynamic else row


def _layer_signature(decisions: list[ParamDecision], skip: int) -> tuple:
    # Layers whose parameters are decided alike (by name inside the layer) share a row.
    return tuple(
        (d.name[skip:].split(".", 1)[-1], d.trainable, d.lr, d.lr_scale, d.dtype, d.weight_decay, d.active_from,
         d.schedule)
        for d in decisions
    )


def _block_rows(decisions: list[ParamDecision], layers_path: str, num_layers: int, dynamic: bool) -> list[tuple]:
    by_block: dict[str, list[ParamDecision]] = {}
    for decision in decisions:
        by_block.setdefault(decision.block, []).append(decision)
    rows: list[tuple[str, ...]] = []
    if EMBEDDINGS in by_block:
        rows.append(_row(EMBEDDINGS, by_block[EMBEDDINGS], dynamic))
    run: list[int] = []

    def flush() -> None:
        if run:
            label = f"layers.{run[0]}" if len(run) == 1 else f"layers.{run[0]}-{run[-1]}"
            rows.append(_row(label, [d for i in run for d in by_block[f"layers.{i}"]], dynamic))
            run.clear()

    skip = len(layers_path) + 1
    for index in range(num_layers):
        block = by_block.get(f"layers.{index}")
        if block is None:
            continue
        if run and _layer_signature(by_block[f"layers.{run[-1]}"], skip) != _layer_signature(block, skip):
            flush()
        run.append(index)
    flush()
    for kind in (NORM, HEAD, OTHER):
        if kind in by_block:
            rows.append(_row(kind, by_block[kind], dynamic))
    return rows


def format_block_table(decisions: list[ParamDecision], layers_path: str, num_layers: int) -> str:
    """A fixed-width table of ``decisions`` by block (block, params, trainable, lr, dtype, memory), then a total.

    ``memory`` is what the block's parameters hold: measured from the tensors once the
    plan was applied, estimated from the planned dtypes before. A dynamic plan gets a
    ``starts`` column (the step from which each block trains, or its schedule's name).
    """
    dynamic = is_dynamic(decisions)
    rows = [*_block_rows(decisions, layers_path, num_layers, dynamic), _row("total", decisions, dynamic)]
    header = ("block", "params", "trainable", "lr", "dtype", "memory")
    if dynamic:
        header = header[:3] + ("starts",) + header[3:]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def render(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([render(header), line, *(render(r) for r in rows[:-1]), line, render(rows[-1])])
