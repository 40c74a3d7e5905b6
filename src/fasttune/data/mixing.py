"""Several datasets in one run: each entry of a `dataset` list read with its own format and columns,
tokenized, then mixed by weight into one list of training examples.

Weights. Entry i with weight w_i gets the share p_i = w_i / sum(w) of an epoch's N training examples,
where N is the number of examples of all entries together (an epoch is as long as their concatenation).
Its count k_i = p_i * N is rounded by largest remainder (ties to the earlier entry), so the counts sum to N.
An entry with n_i examples gives each of them floor(k_i / n_i) times, plus k_i mod n_i of them once more,
drawn without replacement, seeded by the run's seed and the entry's position. The mix is drawn once per
run: every epoch trains the same multiset, in the order `data/packing.plan_epoch` draws for that epoch,
so a resumed run, which rebuilds the data from the same config and seed, continues the same sequence.
Without weights every example of every entry comes once per epoch (concatenation).

Worked example: entries of 100 and 10 examples, weights 1 and 1. N = 110, k = (55, 55): the first entry
gives 55 of its 100 examples (a seeded subset), the second each of its 10 examples 5 times and 5 of them
a sixth time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fasttune.config import ConfigError, DataConfig, DatasetSpec, dataset_specs
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows
from fasttune.data.holdout import holdout_fraction
from fasttune.data.tokenize import DataSummary, TokenizedData, build_dataset

# the columns roles that are *_field options: an entry's `columns` sets them for that entry
FIELD_ROLES = {"instruction": "instruction_field", "input": "input_field", "output": "output_field",
               "messages": "messages_field", "text": "text_field"}
PLAIN_TEMPLATES = ("text",)  # rows used as written: no prompt template to agree on
_MIX_STREAM = 0x6D6978  # keeps the mix's random stream apart from the epoch order's (seed, epoch)


def mix_counts(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Examples per epoch from each entry (module docstring): the sizes themselves without weights."""
    if weights is None:
        return list(sizes)
    total, wsum = sum(sizes), float(sum(weights))
    exact = [w / wsum * total for w in weights]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_indices(sizes: Sequence[int], weights: Sequence[float] | None, seed: int) -> list[list[int]]:
    """Per entry, the indices of its examples in the mix, in ascending order (repeats adjacent)."""
    out = []
    for i, (n, k) in enumerate(zip(sizes, mix_counts(sizes, weights))):
        whole, extra = divmod(k, n)
        rng = np.random.default_rng([seed, _MIX_STREAM, i])
        chosen = rng.choice(n, size=extra, replace=False) if extra else np.empty(0, dtype=np.int64)
        times = np.full(n, whole, dtype=np.int64)
        times[chosen] += 1
        out.append(np.repeat(np.arange(n), times).tolist())
    return out


def label(index: int, spec: DatasetSpec) -> str:
    """How errors and the log name entry `index` (1-based)."""
    return f"dataset[{index}] {spec.path}"


def entry_config(data_cfg: DataConfig, spec: DatasetSpec) -> DataConfig:
    """The DataConfig that reads one entry: its format, its max_rows, its columns for the *_field roles.
    Its `dataset` is the entry itself, which `sources.read_rows` takes as a source."""
    changes: dict[str, Any] = {FIELD_ROLES[r]: c for r, c in spec.columns.items() if r in FIELD_ROLES}
    if spec.format is not None:
        changes["format"] = spec.format
    if spec.max_rows is not None:
        changes["max_rows"] = spec.max_rows
    return dataclasses.replace(data_cfg, dataset=spec, **changes)


def _named(e: DataError, index: int, spec: DatasetSpec) -> DataError:
    """The error with the entry named and a renamed role's field given as the entry's own column."""
    where = e.field
    for role, column in spec.columns.items():
        if where is not None and role not in FIELD_ROLES and (where == role or where.startswith(role + "[")):
            where = column + where[len(role):]
    own = e.file is None or str(e.file) == spec.path
    return DataError(e.message, file=label(index, spec) if own else f"{label(index, spec)} ({e.file})",
                     row=e.row, field=where, reason=e.reason)


@dataclasses.dataclass
class MixedSummary(DataSummary):
    """A mixed split: the sums over the examples in the mix, each entry's own summary, and its count."""

    parts: list[DataSummary] = dataclasses.field(default_factory=list)
    counts: list[int] | None = None  # examples per epoch of each entry (train), None for eval
    weights: list[float] | None = None

    def __str__(self) -> str:
        n = len(self.parts)
        lines = [f"{self.split} data: {n} dataset{'s' if n > 1 else ''} ({self.format} rows, "
                 f"template {self.template})"]
        for i, part in enumerate(self.parts):
            lines.extend("  " + line for line in str(part).splitlines())
            if self.counts is not None:
                k = self.counts[i]
                share = f"weight {self.weights[i]:g}, " if self.weights else ""
                lines.append(f"    in the mix: {k} of each epoch's {self.examples} examples "
                             f"({share}{100 * k / max(1, self.examples):.1f}%, from its {part.examples})")
        lines.append(f"  {self.split} examples {self.examples}: tokens {self.tokens} ({self.trained_tokens} "
                     f"trained), longest example {self.longest}")
        return "\n".join(lines)


def _build_parts(data_cfg: DataConfig, tokenizer: Any, max_seq_length: int, split: str,
                 contract: Any) -> list[TokenizedData]:
    parts = []
    for i, spec in enumerate(dataset_specs(data_cfg), start=1):
        try:
            part = build_dataset(entry_config(data_cfg, spec), tokenizer, max_seq_length, split, contract)
        except DataError as e:
            raise _named(e, i, spec) from None
        part.summary.source = label(i, spec)
        parts.append(part)
    return parts


def _run_contract(parts: list[Any], specs: list[DatasetSpec], plain_fits: bool = True) -> Any:
    """The one prompt contract of the run: the entries that need a prompt template must agree on it;
    SFT entries used as written (text, prompt/completion rows) fit any (`plain_fits`). The plain prompts of
    preference and RL rows go through the run's template, so there every entry must agree."""
    framed = [(i, p) for i, p in enumerate(parts)
              if not plain_fits or p.contract.template not in PLAIN_TEMPLATES]
    for i, p in framed[1:]:
        j, first = framed[0]
        if p.contract != first.contract:
            raise ConfigError(
                f"{label(j + 1, specs[j])} ({first.format} rows, template {first.contract.template}) and "
                f"{label(i + 1, specs[i])} ({p.format} rows, template {p.contract.template}) would be "
                "rendered with different prompt templates, and a run has one: set template chat to render "
                "alpaca rows as chat too, or mix entries of one kind")
    return (framed[0][1] if framed else parts[0]).contract


def _sequences(example: Any) -> list[Any]:
    """The tokenized sequences of an example: itself (SFT), a pair's two, a KTO row's one (a GRPO prompt
    has no trained sequence)."""
    if hasattr(example, "chosen"):
        return [example.chosen, example.rejected]
    if hasattr(example, "example"):
        return [example.example]
    return [] if hasattr(example, "prompt_ids") else [example]


def _summary(parts: list[Any], examples: list[Any], split: str, contract: Any,
             counts: list[int] | None, weights: list[float] | None) -> MixedSummary:
    formats = sorted({p.format for p in parts})
    seqs = [s for e in examples for s in _sequences(e)]
    prompts = sum(len(e.prompt_ids) for e in examples if hasattr(e, "prompt_ids"))
    return MixedSummary(
        source=" + ".join(str(p.summary.source) for p in parts), split=split, format="/".join(formats),
        template=contract.template, rows_read=sum(p.summary.rows_read for p in parts),
        rows_valid=sum(p.summary.rows_valid for p in parts), examples=len(examples),
        tokens=prompts + sum(len(s.input_ids) for s in seqs), trained_tokens=sum(s.n_trained for s in seqs),
        longest=max((len(s.input_ids) for s in seqs), default=0),
        parts=[p.summary for p in parts], counts=counts, weights=weights)


def _mix(parts: list[Any], specs: list[DatasetSpec], seed: int) -> tuple[list[Any], list[int], Any]:
    """(the mixed examples, each entry's count, the weights or None)."""
    weights = [s.weight for s in specs] if specs[0].weight is not None else None
    chosen = mix_indices([len(p.examples) for p in parts], weights, seed)
    examples = [p.examples[k] for p, picks in zip(parts, chosen) for k in picks]
    return examples, [len(c) for c in chosen], weights


def build_train(data_cfg: DataConfig, tokenizer: Any, max_seq_length: int, seed: int) -> TokenizedData:
    """The training examples: `build_dataset` for one dataset, the weighted mix for a list."""
    if isinstance(data_cfg.dataset, str):
        return build_dataset(data_cfg, tokenizer, max_seq_length, "train")
    specs = dataset_specs(data_cfg)
    parts = _build_parts(data_cfg, tokenizer, max_seq_length, "train", None)
    contract = _run_contract(parts, specs)
    examples, counts, weights = _mix(parts, specs, seed)
    summary = _summary(parts, examples, "train", contract, counts, weights)
    return TokenizedData(examples=examples, summary=summary, contract=contract, format=summary.format)


def build_method_train(data_cfg: DataConfig, method: str, tokenizer: Any, max_seq_length: int,
                       contract: Any, seed: int) -> Any:
    """The training data of a dpo/orpo/kto/grpo run (`pairs.build_method_data`), mixed for a list as
    `build_train` mixes SFT examples (a pair, a KTO row or a GRPO prompt is one example)."""
    from fasttune.data.pairs import MethodData, build_method_data

    if isinstance(data_cfg.dataset, str):
        return build_method_data(data_cfg, method, tokenizer, max_seq_length, "train", contract)
    specs = dataset_specs(data_cfg)
    parts = []
    for i, spec in enumerate(specs, start=1):
        try:
            part = build_method_data(entry_config(data_cfg, spec), method, tokenizer, max_seq_length, "train",
                                     contract, source=spec)
        except DataError as e:
            raise _named(e, i, spec) from None
        part.summary.source = label(i, spec)
        parts.append(part)
    contract = _run_contract(parts, specs, plain_fits=False)
    examples, counts, weights = _mix(parts, specs, seed)
    summary = _summary(parts, examples, "train", contract, counts, weights)
    return MethodData(examples, summary, contract, parts[0].format)


def build_eval(eval_cfg: DataConfig, tokenizer: Any, max_seq_length: int,
               contract: Any) -> TokenizedData | None:
    """The eval examples of `eval_cfg` (api.eval_config's). Held out of a list (split:F / val_set_size),
    each entry holds out that share of its own rows, and the eval split is all of them, each once, each
    entry rendered as its training rows are (text rows as written, the others with the run's `contract`)."""
    if isinstance(eval_cfg.dataset, str) or holdout_fraction(eval_cfg) is None:
        return build_dataset(eval_cfg, tokenizer, max_seq_length, "eval", contract=contract)
    specs = dataset_specs(eval_cfg)
    parts = _build_parts(eval_cfg, tokenizer, max_seq_length, "eval", None)
    for i, part in enumerate(parts):
        if part.contract.template not in PLAIN_TEMPLATES and part.contract != contract:
            raise ConfigError(f"{label(i + 1, specs[i])}: its held-out rows would be rendered with template "
                              f"{part.contract.template}, the training rows with {contract.template}")
    examples = [e for p in parts for e in p.examples]
    summary = _summary(parts, examples, "eval", contract, None, None)
    return TokenizedData(examples=examples, summary=summary, contract=contract, format=summary.format)


def eval_rows(eval_cfg: DataConfig) -> list[dict[str, Any]]:
    """The eval split's validated rows (for the questions shown and scored), as `build_eval` reads them."""
    if isinstance(eval_cfg.dataset, str) or holdout_fraction(eval_cfg) is None:
        return [r for _, r in load_rows(eval_cfg.eval_dataset, eval_cfg, "eval").rows]
    rows = []
    for i, spec in enumerate(dataset_specs(eval_cfg), start=1):
        cfg = entry_config(eval_cfg, spec)
        try:
            rows.extend(r for _, r in load_rows(cfg.eval_dataset, cfg, "eval").rows)
        except DataError as e:
            raise _named(e, i, spec) from None
    return rows


def first_rows(data_cfg: DataConfig, n: int) -> list[dict[str, Any]]:
    """The first n validated training rows (of the first entry of a list), to show before training."""
    spec = dataset_specs(data_cfg)[0]
    cfg = data_cfg if isinstance(data_cfg.dataset, str) else entry_config(data_cfg, spec)
    try:
        return [r for _, r in load_rows(cfg.dataset, dataclasses.replace(cfg, max_rows=n)).rows]
    except DataError as e:
        raise (e if isinstance(data_cfg.dataset, str) else _named(e, 1, spec)) from None


def describe(value: str | list[DatasetSpec]) -> str:
    """data.dataset in one line for messages: the path, or the entries with their weights."""
    if isinstance(value, str):
        return value
    return ", ".join(s.path + (f" (weight {s.weight:g})" if s.weight is not None else "") for s in value)
