"""Held-out evaluation: loss and perplexity on the trained tokens, and for question/answer rows the share of
greedy answers that match the reference, exactly and after normalisation.

Normalisation lowercases, drops punctuation and collapses whitespace, so "The L-7 harp." and "the l7 harp"
match. The rows are the normalised rows of `data.formats` (alpaca, messages or text), rendered with
the run's prompt contract exactly as in training.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fasttune.data.templates import PromptContract, encode_prompt, render_messages, render_prompt

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c).startswith("P") and c not in "-'" else c
                   for c in text.lower())
    text = text.replace("-", "").replace("'", "")
    return _SPACES.sub(" ", text).strip()


def row_format(row: dict[str, Any]) -> str:
    if "instruction" in row:
        return "alpaca"
    if "messages" in row:
        return "messages"
    if "text" in row:
        return "text"
    raise ValueError(f"evaluate: a row with keys {sorted(row)} is none of alpaca (instruction/input/output), "
                     "messages or text")


def question_and_reference(row: dict[str, Any], contract: PromptContract,
                           tokenizer: Any) -> tuple[str, str, str] | None:
    """(prompt text, reference answer, the question as shown) for rows that ask something, else None."""
    fmt = row_format(row)
    if fmt == "alpaca":
        prompt = render_prompt(row["instruction"], row.get("input", ""), contract, tokenizer)
        return prompt, row["output"], row["instruction"]
    if fmt == "messages":
        msgs = row["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or not any(m["role"] == "user" for m in msgs[:last]) or msgs[last].get("tool_calls"):
            return None  # nothing asked, or an answer that is a tool call rather than text to compare
        question = next(m["content"] for m in reversed(msgs[:last]) if m["role"] == "user")
        prompt = render_messages(msgs[:last], contract, tokenizer, tools=row.get("tools"))
        return prompt, msgs[last]["content"], question
    return None


@torch.no_grad()
def eval_loss(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]],
              contract: PromptContract, *, max_seq_length: int = 2048,
              batch_size: int = 8) -> tuple[float, int]:
    """Mean cross-entropy per trained token over `rows`, and the number of trained tokens."""
    from fasttune.data.packing import make_batches
    from fasttune.data.tokenize import encode_row

    examples = []
    for row in rows:
        ex = encode_row(row, row_format(row), tokenizer, contract)
        ex.input_ids, ex.labels = ex.input_ids[:max_seq_length], ex.labels[:max_seq_length]
        if ex.n_trained:
            examples.append(ex)
    if not examples:
        return math.nan, 0
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    try:
        batches = make_batches(examples, batch_size, max_seq_length, contract.pad_id, packing=False, seed=0,
                               epoch=0)
        for batch in batches:
            out = model(**{k: v.to(device) for k, v in batch.items()})
            loss_sum += float(out.loss_sum)
            n += int(out.n_tokens)
    finally:
        model.train(was_training)
    return loss_sum / max(n, 1), n


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], contract: PromptContract,
                   *, eos_token_ids: Sequence[int], max_new_tokens: int = 128,
                   batch_size: int = 8) -> list[str]:
    """The model's greedy answer to each rendered prompt (batched, left-padded), stop strings cut off."""
    from fasttune.infer.generate import generate

    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(p, contract, tokenizer) for p in prompts[start:start + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), contract.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encoded):
                ids[i, width - len(e):] = torch.tensor(e)  # left padding: every row ends where it generates
                mask[i, width - len(e):] = 1
            out = generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                           eos_token_ids=list(eos_token_ids), pad_token_id=contract.eos_id,
                           stop_strings=contract.stop_strings or None, tokenizer=tokenizer,
                           compile=False)  # eager: no graph pool or cache kept alive during training
            for row in out[:, width:].tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                for stop in contract.stop_strings or []:
                    text = text.split(stop)[0]
                answers.append(text.strip())
    finally:
        model.train(was_training)
    return answers


@dataclass
class AnswerSet:
    """Held-out questions with their reference answers, rendered with the run's contract, ready to answer.

    `max_new_tokens` is the longest reference in tokens plus a margin: an answer that runs longer than that
    cannot match any reference, so generating further only costs time (and on a CPU it costs the most).
    """

    prompts: list[str]
    references: list[str]
    questions: list[str]
    max_new_tokens: int

    def __len__(self) -> int:
        return len(self.prompts)


ANSWER_MARGIN = 8  # tokens past the longest reference: re-tokenised spacing or casing, a stop string


def answer_set(rows: Sequence[dict[str, Any]], contract: PromptContract, tokenizer: Any,
               margin: int = ANSWER_MARGIN) -> AnswerSet | None:
    """The rows that ask something (alpaca, or messages ending in an assistant turn), in order; None if
    there are none (text rows)."""
    asked = [qr for row in rows if (qr := question_and_reference(row, contract, tokenizer)) is not None]
    if not asked:
        return None
    longest = max(len(tokenizer.encode(ref, add_special_tokens=False)) for _, ref, _ in asked)
    return AnswerSet(prompts=[p for p, _, _ in asked], references=[r for _, r, _ in asked],
                     questions=[q for _, _, q in asked], max_new_tokens=longest + margin)


def match_answers(model: torch.nn.Module, tokenizer: Any, answers: AnswerSet, contract: PromptContract, *,
                  eos_token_ids: Sequence[int], limit: int | None = None, max_new_tokens: int | None = None,
                  batch_size: int = 8, n_samples: int = 3) -> dict[str, Any]:
    """Greedy answers to the first `limit` questions (all with None) scored against their references.

    Returns {"n_answered", "exact_match", "normalized_match" (shares in [0, 1]), "samples" (the first
    `n_samples` as {"question", "reference", "answer"})}. `max_new_tokens` None takes the set's own cap.
    """
    n = len(answers) if limit is None else min(limit, len(answers))
    if n <= 0:
        raise ValueError(f"match_answers: limit={limit} leaves no question to answer")
    refs, questions = answers.references[:n], answers.questions[:n]
    predicted = greedy_answers(model, tokenizer, answers.prompts[:n], contract, eos_token_ids=eos_token_ids,
                               max_new_tokens=max_new_tokens or answers.max_new_tokens, batch_size=batch_size)
    exact = sum(p.strip() == ref.strip() for p, ref in zip(predicted, refs))
    loose = sum(normalize_answer(p) == normalize_answer(ref) for p, ref in zip(predicted, refs))
    return {"n_answered": n, "exact_match": exact / n, "normalized_match": loose / n,
            "samples": [{"question": q, "reference": ref, "answer": p}
                        for p, ref, q in list(zip(predicted, refs, questions))[:n_samples]]}


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    contract: PromptContract,
    *,
    max_seq_length: int = 2048,
    batch_size: int = 8,
    answers: bool = True,
    max_new_tokens: int | None = 128,
    eos_token_ids: Sequence[int] | None = None,
    n_samples: int = 3,
) -> dict[str, Any]:
    """Loss, perplexity and (for rows with a question) answer match rates on held-out `rows`.

    Returns {"eval_loss", "perplexity", "eval_tokens", "n_rows", and with answers: "n_answered",
    "exact_match", "normalized_match" (shares in [0, 1]), "samples" (the first `n_samples` as
    {"question", "reference", "answer"})}. `max_new_tokens` None: the longest reference plus a margin.
    """
    loss, n_tokens = eval_loss(model, tokenizer, rows, contract, max_seq_length=max_seq_length,
                               batch_size=batch_size)
    result: dict[str, Any] = {"eval_loss": loss, "perplexity": math.exp(loss) if n_tokens else math.nan,
                              "eval_tokens": n_tokens, "n_rows": len(rows)}
    if not answers:
        return result
    asked = answer_set(rows, contract, tokenizer)
    if asked is None:
        return result
    if eos_token_ids is None:
        from fasttune.infer.load import stop_ids

        eos_token_ids = stop_ids(contract, tokenizer)
    result.update(match_answers(model, tokenizer, asked, contract, eos_token_ids=eos_token_ids,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, n_samples=n_samples))
    return result


def format_result(result: dict[str, Any]) -> str:
    """The evaluation as a few lines for the terminal."""
    lines = [f"eval loss {result['eval_loss']:.4f}  perplexity {result['perplexity']:.2f}  "
             f"({result['eval_tokens']:,} trained tokens, {result['n_rows']} rows)"]
    if "exact_match" in result:
        lines.append(f"answers: exact match {100 * result['exact_match']:.1f}%  normalised match "
                     f"{100 * result['normalized_match']:.1f}%  ({result['n_answered']} questions)")
        for s in result.get("samples", []):
            lines += [f"  Q: {s['question']}", f"  reference: {s['reference']}",
                      f"  answer:    {s['answer']}"]
    return "\n".join(lines)
