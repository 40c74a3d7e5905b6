"""A benchmark dataset that resembles real instruction data, made from a seed (no download): Alpaca rows
(instruction, optional input, output) whose texts in the notebook's Alpaca prompt run from about 50 to
1,500 tokens, most of them short, a long tail of long ones (log-normal, median about 250 tokens), as in
Alpaca-style sets.

    python benchmarks/instruction_data.py --rows 2000 --seed 0 --out /tmp/uneven.jsonl \
        [--tokenizer DIR]   # size each row in this tokenizer's tokens (else about 1.3 tokens a word)

The words are English but the sentences are random: this is for speed and memory, whose cost depends on
the lengths only. The same seed (and tokenizer) always gives the same rows.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

# The Unsloth Alpaca notebook's prompt (tests/notebooks/unsloth_alpaca.py), used with and without input.
PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
          "context. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}")

TASKS = ["Explain {}.", "Write a short story about {}.", "Summarize the following text.",
         "List five facts about {}.", "Give three tips for {}.", "Describe {} to a child.",
         "Rewrite the following paragraph in a formal tone.", "What is the difference between {} and {}?",
         "Write an email about {}.", "Classify the following sentence.",
         "Translate the text into plain English.",
         "Compose a poem about {}.", "Answer the question about {}.", "Suggest a plan for {}."]
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month lot right study book eye "
         "job word business issue side kind head house service friend father power hour game line end "
         "member law car city community name president team minute idea kid body information back parent "
         "face others level office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education river music garden market energy science "
         "ocean bridge museum harvest island language kitchen winter summer planet machine engine network "
         "recipe travel weather forest mountain village library doctor village sound light color paper "
         "make take give find tell ask work seem feel try leave call keep help show play run move live "
         "believe bring happen write provide sit stand lose pay meet include continue learn change lead "
         "understand watch follow stop create speak read spend grow open walk offer remember consider "
         "appear buy wait serve build stay fall reach remain suggest raise pass sell require report decide "
         "good new first last long great little own other old right big high different small large next "
         "early young important few public bad same able simple clear careful quiet bright strong warm "
         "and the of to in for on with as at by from about into over after under between through during "
         "a an this that these those each every many most some any").split()
TOPICS = ["renewable energy", "the water cycle", "a small bakery", "learning a language", "city gardens",
          "the history of maps", "saving money", "sleep", "a mountain village", "photosynthesis",
          "remote work", "public libraries", "ocean tides", "healthy breakfasts", "old bridges"]
TOKENS_PER_WORD = 1.3  # English prose with punctuation, in Llama-style BPE tokens, when no tokenizer is given


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n_words))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def _prose(rng: random.Random, n_words: int) -> str:
    """About n_words words in sentences of 6 to 20 words, a paragraph break every few sentences."""
    out, left, k = [], n_words, 0
    while left > 0:
        n = min(left, rng.randint(6, 20))
        out.append(_sentence(rng, n))
        left -= n
        k += 1
        if k % rng.randint(3, 6) == 0 and left > 0:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


def _trim(text: str, n_words: int) -> str:
    return " ".join(text.split(" ")[:max(1, n_words)])


def target_lengths(n: int, seed: int, lo: int = 50, hi: int = 1500, median: int = 250) -> list[int]:
    """Row lengths in tokens: log-normal around `median`, clipped to [lo, hi]."""
    rng = random.Random(f"lengths-{seed}")
    return [min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), 0.8))))) for _ in range(n)]


def row_text(row: dict[str, str]) -> str:
    """The text the Alpaca notebook trains on for this row (its formatting function, without EOS)."""
    return PROMPT.format(row["instruction"], row["input"], row["output"])


def make_rows(n: int, seed: int = 0, tokenizer: Any = None, lo: int = 50, hi: int = 1500,
              median: int = 250) -> list[dict]:
    """n Alpaca rows whose texts (`row_text`) are about `target_lengths` tokens long: exactly, within a few
    tokens, when a tokenizer is given (the output is lengthened or cut to fit); else by word count."""
    count = (lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])) if tokenizer else \
        (lambda t: round(len(t.split()) * TOKENS_PER_WORD))
    rows = []
    for i, target in enumerate(target_lengths(n, seed, lo, hi, median)):
        rng = random.Random(f"row-{seed}-{i}")
        topics = rng.sample(TOPICS, 2)
        task = rng.choice(TASKS)
        instruction = task.format(*topics[:task.count("{}")])
        context = _prose(rng, rng.randint(15, max(16, target // 5))) if rng.random() < 0.4 else ""
        row = {"instruction": instruction, "input": context, "output": ""}
        room = target - count(row_text(dict(row, output="x")))
        if room < 5 and context:  # a short row: drop the input rather than the answer
            row["input"], room = "", target - count(row_text(dict(row, input="", output="x")))
        words = max(3, round(room / TOKENS_PER_WORD))
        output = _prose(rng, words + 40)  # extra words to cut from
        for _ in range(4):  # the token count per word varies: correct the word count a few times
            row["output"] = _trim(output, words)
            err = target - count(row_text(row))
            if abs(err) <= 2:
                break
            words = max(3, words + round(err / TOKENS_PER_WORD))
            if words > len(output.split(" ")):
                output += " " + _prose(rng, words)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory to size the rows in its tokens")
    p.add_argument("--min-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=1500)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = make_rows(args.rows, args.seed, tok, args.min_tokens, args.max_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
