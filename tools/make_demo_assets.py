"""Regenerate the bundled demo assets (dataset, tokenizer, model config). Deterministic.

    python tools/make_demo_assets.py

Writes hf_llama_strategies/assets/demo/{train.csv,validation.csv,tokenizer files,config.json}.
"""

from __future__ import annotations

import csv
import json
import os
import random

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(__file__), "..", "hf_llama_strategies", "assets", "demo")

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

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tokenizer.train_from_iterator([t for t, _ in rows], trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=64,
    )
    fast.save_pretrained(OUT)

    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(OUT)
    print(json.dumps({"vocab": len(fast), "train": 800, "validation": 200}))


if __name__ == "__main__":
    main()
