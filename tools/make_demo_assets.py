"""Regenerate the bundled demo assets (dataset, tokenizer, model config). Deterministic.

    python tools/make_demo_assets.py

Writes hf_llama_strategies/assets/demo/{train.csv,validation.csv,tokenizer files,config.json}, and the
instruction-tuning variant in assets/demo/sft/: train.json (Alpaca records), validation.jsonl (OpenAI
`messages` records), a tokenizer with a chat template (ChatML) and a model config.
"""

from __future__ import annotations

import csv
import json
import os
import random

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "hf_llama_strategies", "assets", "demo")
SFT_OUT = os.path.join(OUT, "sft")

SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the cast",
            "the script", "the director", "the story", "the camera work", "the dialogue", "this sequel",
            "the premise", "the pacing", "the characters", "the effects", "the score"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "clever",
            "beautiful", "funny", "memorable", "excellent", "touching", "fresh", "stunning", "warm"]
NEGATIVE = ["dull", "boring", "clumsy", "awful", "tedious", "messy", "flat", "predictable", "weak",
            "lifeless", "annoying", "terrible", "shallow", "forgettable", "confusing", "bland"]
INTENSIFIERS = ["", "", "really", "truly", "quite", "so", "rather", "very", "incredibly"]
OPENERS = ["", "", "honestly", "i think", "overall", "to be fair", "in the end", "frankly", "sadly",
           "happily", "as expected", "surprisingly"]
CLOSERS = ["", "", "and i would watch it again", "and i left early", "from start to finish",
           "despite the hype", "for a family evening", "on a rainy sunday", "in my opinion"]
CONTRAST = ["but", "although", "even if", "while"]


def sentence(rng: random.Random, label: int) -> str:
    good, bad = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
    parts = [rng.choice(OPENERS), rng.choice(SUBJECTS), "was", rng.choice(INTENSIFIERS), rng.choice(good)]
    if rng.random() < 0.35:
        # A weaker opposite clause first makes the task need more than one word.
        parts = [rng.choice(SUBJECTS), "was", rng.choice(bad), rng.choice(CONTRAST), *parts]
    parts.append(rng.choice(CLOSERS))
    return " ".join(p for p in parts if p)


def save_tokenizer_and_config(out: str, corpus: list[str], extra_specials: list[str], eos: str, max_length: int,
                              chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer trained on ``corpus`` and a 4-layer Llama config for it, saved in ``out``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *extra_specials]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    additional = [t for t in extra_specials if t != eos]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token=eos,
        model_max_length=max_length, **({"additional_special_tokens": additional} if additional else {}),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_length,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    ).save_pretrained(out)
    return fast


def main() -> None:
    rng = random.Random(1234)
    os.makedirs(OUT, exist_ok=True)
    rows = [(sentence(rng, label), "positive" if label else "negative") for label in [i % 2 for i in range(1000)]]
    rng.shuffle(rows)
    for name, part in (("train.csv", rows[:800]), ("validation.csv", rows[800:])):
        with open(os.path.join(OUT, name), "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(part)

    fast = save_tokenizer_and_config(OUT, [t for t, _ in rows], [], "[EOS]", 64)
    print(json.dumps({"vocab": len(fast), "train": 800, "validation": 200}))
    make_sft()


SFT_SYSTEM = "you are a film critic assistant . answer in one or two words ."


def instruction(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output) of one of three small tasks about a generated review."""
    label = rng.randrange(2)
    review = sentence(rng, label)
    kind = rng.randrange(3)
    if kind == 0:
        return "what is the sentiment of this review ?", review, "positive" if label else "negative"
    if kind == 1:
        subject = next(s for s in sorted(SUBJECTS, key=len, reverse=True) if s in review)
        return "which part of the film does this review talk about ?", review, subject
    words = POSITIVE if label else NEGATIVE
    return f"give a word that means the same as {rng.choice(words)} .", "", rng.choice(words)


def make_sft() -> None:
    """The SFT demo: Alpaca records to train on, OpenAI-style records to evaluate, a ChatML tokenizer."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from hf_llama_strategies.data.chat_templates import build_chat_template

    rng = random.Random(4321)
    os.makedirs(SFT_OUT, exist_ok=True)
    records = [instruction(rng) for _ in range(700)]
    train = [{"instruction": i, "input": x, "output": o} for i, x, o in records[:600]]
    for record in train[::5]:
        record["system"] = SFT_SYSTEM
    with open(os.path.join(SFT_OUT, "train.json"), "w", encoding="utf-8") as fh:
        json.dump(train, fh, indent=1)
        fh.write("\n")
    with open(os.path.join(SFT_OUT, "validation.jsonl"), "w", encoding="utf-8") as fh:
        for i, x, o in records[600:]:
            user = f"{i}\n{x}" if x else i
            messages = [{"role": "system", "content": SFT_SYSTEM}, {"role": "user", "content": user},
                        {"role": "assistant", "content": o}]
            fh.write(json.dumps({"messages": messages}) + "\n")

    corpus = [" ".join(r) for r in records] + [SFT_SYSTEM, "system user assistant"]
    fast = save_tokenizer_and_config(SFT_OUT, corpus, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", 128,
                                     chat_template=build_chat_template("chatml"))
    print(json.dumps({"sft_vocab": len(fast), "sft_train": len(train), "sft_validation": 100}))


if __name__ == "__main__":
    main()
