"""How a plan reads: the text table (``plan``, the start of training) and the PNG picture (``plan --plot``).

Pure functions of a :class:`~hf_llama_strategies.plan.StrategyPlan`; nothing here decides.
"""

from __future__ import annotations

from .anatomy import EMBEDDINGS, HEAD, NORM, OTHER
from .errors import StrategyError
from .plan import ParamDecision, StrategyPlan, decision_nbytes


def _human_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count}B"


def _human(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


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
        trained = f"{_human(trainable)} ({100 * trainable / total:.0f}%)"
    dtypes = ",".join(sorted({d.dtype.replace("torch.", "") for d in decisions}))
    memory = _human_bytes(sum(decision_nbytes(d) for d in decisions))
    row = (label, _human(total), trained, _lr_text(decisions), dtypes, memory)
    # The start column appears only for dynamic plans, so a static table stays as it was.
    return row[:3] + (_starts_text(decisions),) + row[3:] if dynamic else row


def _layer_signature(plan: StrategyPlan, decisions: list[ParamDecision]) -> tuple:
    # Layers whose parameters are decided alike (by name inside the layer) share a row.
    skip = len(plan.layers_path) + 1
    return tuple(
        (d.name[skip:].split(".", 1)[-1], d.trainable, d.lr, d.lr_scale, d.dtype, d.weight_decay, d.active_from,
         d.schedule)
        for d in decisions
    )


def format_plan_table(plan: StrategyPlan) -> str:
    """Render ``plan`` as a fixed-width table (block, params, trainable, lr, dtype, memory).

    ``memory`` is what the block's parameters hold: measured from the tensors once the
    plan was applied, estimated from the planned dtypes before. A dynamic plan gets a
    ``starts`` column (the step from which each block trains, or its schedule's name) and
    one line per schedule under the table.
    """
    dynamic = plan.is_dynamic
    by_block: dict[str, list[ParamDecision]] = {}
    for decision in plan:
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

    for index in range(plan.num_layers):
        block = by_block.get(f"layers.{index}")
        if block is None:
            continue
        if run and _layer_signature(plan, by_block[f"layers.{run[-1]}"]) != _layer_signature(plan, block):
            flush()
        run.append(index)
    flush()
    for kind in (NORM, HEAD, OTHER):
        if kind in by_block:
            rows.append(_row(kind, by_block[kind], dynamic))
    rows.append(_row("total", list(plan), dynamic))

    header = ("block", "params", "trainable", "lr", "dtype", "memory")
    if dynamic:
        header = header[:3] + ("starts",) + header[3:]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    render = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    body = [render(header), line, *(render(r) for r in rows[:-1]), line, render(rows[-1])]
    title = (
        f"hf-llama-strategies plan for {plan.model_class}: {_human(plan.num_trainable)} of "
        f"{_human(plan.num_parameters)} parameters {'may ' if dynamic else ''}train "
        f"({100 * plan.num_trainable / max(plan.num_parameters, 1):.2f}%)"
    )
    out = [title, *body]
    out.extend(f"{key}: {value['summary']}" for key, value in plan.settings.items() if value.get("summary"))
    out.extend(f"schedule {name}: {spec['description']}" for name, spec in plan.schedules.items()
               if spec.get("description"))
    out.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(out)



def layer_profile(plan: StrategyPlan, base_lr: float) -> tuple[list[str], list[float], list[float]]:
    """Per block (embeddings, each layer, norm, head): labels, trainable fraction, max LR."""
    blocks: dict[str, list] = {}
    for decision in plan:
        blocks.setdefault(decision.block, []).append(decision)
    order = ["embeddings", *(f"layers.{i}" for i in range(plan.num_layers)), "norm", "head", "other"]
    labels, fractions, rates = [], [], []
    for label in order:
        if label not in blocks:
            continue
        decisions = blocks[label]
        total = sum(d.numel for d in decisions)
        trained = [d for d in decisions if d.trainable]
        labels.append(label.replace("layers.", ""))
        fractions.append(sum(d.numel for d in trained) / total if total else 0.0)
        rates.append(max((base_lr if d.lr is None else d.lr) for d in trained) if trained else 0.0)
    return labels, fractions, rates


def plot_plan(plan: StrategyPlan, path: str, base_lr: float) -> None:
    """Write a PNG with the trainable fraction and the learning rate of every block."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StrategyError("--plot needs matplotlib: pip install 'hf-llama-strategies[plot]'") from None
    labels, fractions, rates = layer_profile(plan, base_lr)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(labels) * 0.18), 5), sharex=True)
    positions = range(len(labels))
    top.bar(positions, fractions, color="tab:green")
    top.set_ylabel("trainable fraction")
    top.set_ylim(0, 1.05)
    bottom.plot(positions, rates, marker="o", color="tab:blue")
    bottom.set_ylabel("learning rate")
    bottom.set_xticks(list(positions))
    bottom.set_xticklabels(labels, rotation=90, fontsize=7)
    fig.suptitle(f"{plan.model_class}: {plan.num_trainable:,} of {plan.num_parameters:,} parameters train")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
