"""The CPU label head (``training/label_head.py``) that the CLI's SFT trainer puts in front of TRL's fused head.

It computes what TRL's ``ChunkedLogProbFunction`` computes (each label's log-probability, the
entropy, whether the label is the top prediction) in another order: only labelled rows, the
vocabulary summed in one piece instead of 32768-wide tiles. Float32 sums of the same terms in
another order differ by a few units in the last place: with this vocabulary (128 tokens) a
log-probability moves by at most ~1e-6 relative, so values are compared within 1e-5 (relative)
against TRL's and against a float64 reference; whole runs too (see ``close`` for the weights).
Where the head hands the call to TRL (autocast, a transformed head), the run is TRL's bit for bit.
"""

from __future__ import annotations

import csv
import os

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'hf-llama-strategies[trl]'")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import losses, snapshot, strategy  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

from hf_llama_strategies.cli.demo import DEMO_DIR  # noqa: E402
from hf_llama_strategies.strategies import frozen_prefix_cache as fpc  # noqa: E402
from hf_llama_strategies.training import label_head  # noqa: E402
from hf_llama_strategies.training.trl import strategy_sft_trainer_class  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def prompt_completion() -> Dataset:
    with open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)][:16]
    # The prompt's labels are -100: the head skips those rows, TRL's CPU path scores them too.
    return Dataset.from_dict({"prompt": [t[: len(t) // 2] for t in texts],
                              "completion": [t[len(t) // 2:] for t in texts]})


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Adam turns 1e-7 gradient differences into up to ~3e-6 on a weight (measured); 1e-5 is 1% of
    # one step at learning_rate=1e-3. The losses (1e-5 relative) are the sharper check.
    return torch.allclose(a, b, rtol=0, atol=1e-5)


def train(tmp_path, trainer_class, data, tokenizer, name, model=None, **kwargs):
    model = model if model is not None else tiny_model("llama", tie_word_embeddings=True).train()
    args = SFTConfig(
        output_dir=str(tmp_path / name), num_train_epochs=2, per_device_train_batch_size=4, max_length=32,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=kwargs.pop("bf16", False), seed=0, disable_tqdm=True, dataloader_num_workers=0, **kwargs.pop("sft", {}),
    )
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)
    trainer.train()
    return trainer, model


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


# -- the function ---------------------------------------------------------------------------


def inputs(rows=37, hidden=16, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.5,
            torch.randint(0, vocab, (rows,), generator=g))


def test_values_and_gradients_equal_a_float64_reference_and_trls_kernel(monkeypatch):
    monkeypatch.setattr(label_head, "_ROWS_PER_BLOCK", 16)  # several blocks, the last one short
    hidden, weight, targets = inputs()
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_probs, entropy, is_top1 = label_head.LabelLogProbs.apply(x, w, targets)
    (log_probs * torch.linspace(0.5, 2, len(targets))).sum().backward()

    x64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    log_softmax = torch.log_softmax(x64 @ w64.t(), dim=-1)
    reference = log_softmax.gather(1, targets[:, None])[:, 0]
    (reference * torch.linspace(0.5, 2, len(targets)).double()).sum().backward()
    assert torch.allclose(log_probs.double(), reference.detach(), rtol=RTOL, atol=0)
    assert torch.allclose(entropy.double(), -(log_softmax.exp() * log_softmax).sum(-1).detach(), rtol=RTOL, atol=0)
    assert torch.equal(is_top1, (x64 @ w64.t()).argmax(-1) == targets)
    # Gradients are O(1) here: 1e-5 absolute is 1e-5 relative to their scale.
    assert torch.allclose(x.grad.double(), x64.grad, rtol=0, atol=RTOL)
    assert torch.allclose(w.grad.double(), w64.grad, rtol=0, atol=RTOL)

    trl_log_probs, trl_entropy, _, _, trl_top1 = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs", "entropy", "is_top1"))
    assert torch.allclose(log_probs, trl_log_probs, rtol=RTOL, atol=0)
    assert torch.allclose(entropy, trl_entropy, rtol=RTOL, atol=0)
    assert torch.equal(is_top1, trl_top1)


def test_a_second_backward_through_the_same_graph_is_refused():
    hidden, weight, targets = inputs()
    x = hidden.clone().requires_grad_()
    log_probs, _, _ = label_head.LabelLogProbs.apply(x, weight, targets)
    log_probs.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        log_probs.sum().backward()


# -- in the trainer -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_cli_sft_trainer_trains_as_trls_sft_trainer(tmp_path, tokenizer, prompt_completion):
    # No option: every weight trains, the head's (tied to the embeddings) included, so the head's
    # weight gradient is compared too.
    stock, stock_model = train(tmp_path, SFTTrainer, prompt_completion, tokenizer, "stock")
    ours, ours_model = train(tmp_path, strategy_sft_trainer_class(), prompt_completion, tokenizer, "ours",
                             strategy_args=strategy())
    assert getattr(ours_model.forward, "_hfls_label_head", False)
    assert not getattr(stock_model.forward, "_hfls_label_head", False)
    # The first step starts from the same weights: only the head's arithmetic differs.
    for key in ("loss", "entropy"):
        a, b = logged(ours, key), logged(stock, key)
        assert len(a) == len(b) == 8
        assert all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b)), key
    assert logged(ours, "mean_token_accuracy") == logged(stock, "mean_token_accuracy")
    assert logged(ours, "num_tokens") == logged(stock, "num_tokens")
    for (name, a), (_, b) in zip(ours_model.named_parameters(), stock_model.named_parameters()):
        assert close(a, b), name


def test_it_evaluates_as_trls_sft_trainer(tmp_path, tokenizer, prompt_completion):
    results = []
    for trainer_class in (SFTTrainer, strategy_sft_trainer_class()):
        model = tiny_model("llama", tie_word_embeddings=True)
        args = SFTConfig(output_dir=str(tmp_path / trainer_class.__name__), per_device_eval_batch_size=3,
                         max_length=32, report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
        results.append(trainer_class(model=model, args=args, train_dataset=prompt_completion,
                                     eval_dataset=prompt_completion, processing_class=tokenizer).evaluate())
    stock, ours = results
    assert abs(ours["eval_loss"] - stock["eval_loss"]) <= RTOL * stock["eval_loss"]
    assert ours["eval_mean_token_accuracy"] == stock["eval_mean_token_accuracy"]


@pytest.mark.slow
def test_under_autocast_the_call_is_trls_bit_for_bit(tmp_path, tokenizer, prompt_completion):
    stock, stock_model = train(tmp_path, SFTTrainer, prompt_completion, tokenizer, "stock", bf16=True)
    ours, ours_model = train(tmp_path, strategy_sft_trainer_class(), prompt_completion, tokenizer, "ours",
                             bf16=True, strategy_args=strategy())
    assert losses(ours) == losses(stock)
    assert logged(ours, "entropy") == logged(stock, "entropy")
    assert snapshot(ours_model) == snapshot(stock_model)


@pytest.mark.slow
def test_a_head_that_transforms_its_logits_keeps_trls_head(tmp_path, tokenizer, prompt_completion):
    stock, stock_model = train(tmp_path, SFTTrainer, prompt_completion, tokenizer, "stock",
                               model=_softcapped())
    ours, ours_model = train(tmp_path, strategy_sft_trainer_class(), prompt_completion, tokenizer, "ours",
                             model=_softcapped(), strategy_args=strategy())
    assert not getattr(ours_model.forward, "_hfls_label_head", False)
    assert losses(ours) == losses(stock)
    assert snapshot(ours_model) == snapshot(stock_model)


def _softcapped() -> torch.nn.Module:
    model = tiny_model("llama", tie_word_embeddings=True).train()
    model.config.final_logit_softcapping = 30.0  # TRL's head applies it (the model's own forward does not)
    return model


def test_a_batch_with_no_label_gives_a_zero_loss_and_a_backward():
    model = tiny_model("llama", tie_word_embeddings=True).train()
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    assert label_head.install_label_head(model)
    ids = torch.randint(3, 100, (2, 6))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.full_like(ids, -100),
                fused_lm_head=True)
    assert out.loss.item() == 0.0 and out.label_mask.sum() == 0
    out.loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


@pytest.mark.slow
def test_with_the_frozen_prefix_cache_it_trains_as_without_bit_for_bit(tmp_path, tokenizer, prompt_completion):
    # Packed fixed-length rows: the pre-pass computes every row at the shape training uses, so the
    # cached hidden states are the uncached ones bit for bit, and so is everything the head does with them.
    data = Dataset.from_dict({"text": [p + c for p, c in zip(prompt_completion["prompt"],
                                                               prompt_completion["completion"])]})
    packed = dict(packing=True, packing_strategy="wrapped", padding_free=False)
    runs = {}
    for mode in ("off", "memory"):
        runs[mode] = train(tmp_path, strategy_sft_trainer_class(), data, tokenizer, mode, sft=packed,
                           strategy_args=strategy(trainable_layers="-1:", frozen_prefix_cache=mode))
    (off, off_model), (on, on_model) = runs["off"], runs["memory"]
    assert getattr(on_model.forward, "_hfls_label_head", False)
    cache = fpc.get_frozen_prefix_cache(on_model)
    rows = len(on.train_dataset)
    assert (cache.prepass_samples, cache.misses, cache.hits) == (rows, rows, 2 * rows)
    assert losses(on) == losses(off)
    assert snapshot(on_model) == snapshot(off_model)
