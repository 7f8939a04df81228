"""The plan as a picture (``plan --plot``): every block's trainable fraction and learning rate."""

from __future__ import annotations

from ..errors import StrategyError
from .plan import StrategyPlan


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
