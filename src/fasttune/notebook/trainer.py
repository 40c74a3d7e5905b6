"""`SFTTrainer` with TRL's arguments, running fasttune's training loop.

The dataset is read the way TRL reads it: a `dataset_text_field` column (default "text") of whole texts,
trained on every token with EOS appended (a trailing EOS string the notebook added is not doubled); or
a `formatting_func` that turns each row into that text; or conversational `messages` rows rendered with
the chat template. Alpaca rows (instruction/input/output) without a text column use fasttune's Alpaca
prompt, trained on the response only.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.notebook.arguments import SFTConfig, TrainingArguments, to_train_config
from fasttune.notebook.model import NotebookModel

SOURCE = "train_dataset"


class TrainOutput(NamedTuple):
    """What `trainer.train()` returns, as transformers' TrainOutput."""

    global_step: int
    training_loss: float
    metrics: dict[str, Any]


def _rows(dataset: Any, name: str) -> list[dict[str, Any]]:
    if dataset is None:
        raise ValueError(f"SFTTrainer: {name} is required")
    if isinstance(dataset, dict) and all(isinstance(v, list) for v in dataset.values()):
        raise TypeError(f"SFTTrainer: {name} is a dict of columns; pass a datasets.Dataset or a list of rows")
    rows = list(dataset)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"expected a mapping of column names to values, got {type(row).__name__}",
                file=name,
                row=i + 1,
            )
    return rows


def _formatted(rows: list[dict[str, Any]], func: Callable, name: str) -> list[dict[str, str]]:
    """Apply `formatting_func`: per row returning a string (TRL today), or batched returning a list (older
    TRL and many notebooks)."""
    if not rows:
        return []
    first = func(rows[0])
    if isinstance(first, str):
        texts = [first] + [func(r) for r in rows[1:]]
    else:
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        texts = func(columns)
        if isinstance(texts, dict) and "text" in texts:
            texts = texts["text"]
        if not isinstance(texts, list) or len(texts) != len(rows):
            raise ValueError(
                "SFTTrainer: formatting_func must return a string per row (or, called on a batch "
                "of columns, a list with one string per row)"
            )
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            raise DataError(
                f"formatting_func returned {type(t).__name__} {str(t)[:30]!r}, not a text",
                file=name,
                row=i + 1,
            )
    return [{"text": t} for t in texts]


class SFTTrainer:
    """TRL's SFTTrainer surface over fasttune's loop: `SFTTrainer(model=, tokenizer=, train_dataset=,
    args=TrainingArguments(...)).train()`."""

    def __init__(
        self,
        model: NotebookModel,
        args: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        processing_class: Any = None,
        *,
        dataset_text_field: str | None = None,
        max_seq_length: int | None = None,
        dataset_num_proc: int | None = None,
        packing: bool | None = None,
        formatting_func: Callable | None = None,
        data_collator: Any = None,
        callbacks: Iterable[Any] | None = None,
        peft_config: Any = None,
        dataset_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"SFTTrainer: unknown argument(s) {', '.join(sorted(kwargs))}")
        if not isinstance(model, NotebookModel):
            raise TypeError(
                "SFTTrainer: model must come from fasttune's FastLanguageModel.from_pretrained "
                f"(got {type(model).__name__})"
            )
        if data_collator is not None:
            raise ValueError(
                "SFTTrainer: data_collator is not supported; fasttune batches (and packs) rows itself"
            )
        if peft_config is not None:
            raise ValueError(
                "SFTTrainer: peft_config is not supported; call FastLanguageModel.get_peft_model first"
            )
        if dataset_kwargs and dataset_kwargs.get("skip_prepare_dataset"):
            raise ValueError(
                "SFTTrainer: dataset_kwargs skip_prepare_dataset (pre-tokenized data) is not supported"
            )
        if callbacks:
            warnings.warn(
                "SFTTrainer: callbacks are ignored; progress and metrics go to the terminal and to "
                "metrics.jsonl in output_dir",
                UserWarning,
                stacklevel=2,
            )
        self.model = model
        self.tokenizer = self.processing_class = processing_class or tokenizer or model.tokenizer
        self.args = args if args is not None else SFTConfig(output_dir="trainer_output")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        get = lambda name, default: (
            getattr(self.args, name, None) if getattr(self.args, name, None) is not None else default
        )  # noqa: E731
        self.dataset_text_field = dataset_text_field or get("dataset_text_field", "text")
        self.max_seq_length = (
            max_seq_length or get("max_seq_length", None) or model.max_seq_length or get("max_length", 1024)
        )
        self.packing = packing if packing is not None else bool(get("packing", False))
        self.assistant_only_loss = bool(get("assistant_only_loss", False))
        self.formatting_func = formatting_func
        self.dataset_num_proc = (
            dataset_num_proc  # tokenizing is single-process and fast; accepted for notebooks
        )
        self.contract = None
        self.state: Any = None

    # ------------------------------------------------------------ data
    def _examples(self, dataset: Any, name: str) -> list[Any]:
        from fasttune.data.formats import detect_format, normalise_row
        from fasttune.data.templates import make_contract
        from fasttune.data.tokenize import encode_row

        rows = _rows(dataset, name)
        cfg = DataConfig(text_field=self.dataset_text_field)
        if self.formatting_func is not None:
            rows, fmt = _formatted(rows, self.formatting_func, name), "completion"
            cfg = DataConfig(text_field="text")
        else:
            fmt = detect_format(rows[0], cfg) if rows else None
            if fmt is None:
                keys = sorted(rows[0]) if rows else []
                raise DataError(
                    f"no '{self.dataset_text_field}' column (dataset_text_field) and no "
                    f"messages or instruction/output columns; columns are {keys}. Add a text column "
                    "(dataset.map) or pass formatting_func",
                    file=name,
                    row=1,
                )
        if self.contract is None:
            self.contract = make_contract("auto", fmt, self.tokenizer)
        train_on_inputs = fmt == "messages" and not self.assistant_only_loss  # TRL trains whole conversations
        examples = []
        for i, raw in enumerate(rows):
            try:
                ex = encode_row(
                    normalise_row(raw, fmt, cfg), fmt, self.tokenizer, self.contract, train_on_inputs
                )
            except DataError as e:
                raise e.at(file=name, row=i + 1) from None
            ex.row = i + 1
            ex.input_ids, ex.labels = ex.input_ids[: self.max_seq_length], ex.labels[: self.max_seq_length]
            if ex.n_trained:
                examples.append(ex)
        if not examples:
            raise DataError(
                f"all labels are masked: nothing to train in {name} with max_seq_length={self.max_seq_length}"
            )
        return examples

    # ------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Run fasttune's loop on the adapters; return (global_step, training_loss, metrics)."""
        import dataclasses

        from fasttune.data.packing import BatchStream, make_batches, resolve_packing
        from fasttune.train.loop import seed_everything, train_loop
        from fasttune.train.precision import resolve_precision

        if isinstance(resume_from_checkpoint, str):
            raise ValueError(
                "train(resume_from_checkpoint=PATH): pass True to resume from output_dir's latest"
            )
        inner, device = self.model.model, self.model.device
        if not any(p.requires_grad for p in inner.parameters()):
            raise ValueError(
                "SFTTrainer: the model has no LoRA adapters; call FastLanguageModel.get_peft_model"
            )
        mode = inner.gradient_checkpointing if self.model.lora_config is not None else None
        cfg = to_train_config(self.args, device_type=device.type, gradient_checkpointing=mode)
        cfg = dataclasses.replace(cfg, resume=bool(resume_from_checkpoint))
        precision = resolve_precision(cfg.precision, device)
        seed_everything(cfg.seed)
        examples = self._examples(self.train_dataset, SOURCE)
        eval_examples = (
            self._examples(self.eval_dataset, "eval_dataset") if self.eval_dataset is not None else None
        )
        packing = resolve_packing(
            "on" if self.packing else "off", exact=getattr(inner, "supports_packing", False)
        )
        if self.packing and not packing:
            warnings.warn(
                "SFTTrainer: packing=True is not exact on this architecture; training unpacked",
                UserWarning,
                stacklevel=2,
            )
        bs, pad = cfg.per_device_train_batch_size, self.contract.pad_id
        stream = BatchStream(examples, bs, self.max_seq_length, pad, packing, seed=cfg.seed)
        eval_batches = (
            None
            if eval_examples is None
            else make_batches(eval_examples, bs, self.max_seq_length, pad, packing, seed=cfg.seed, epoch=0)
        )
        params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        records: list[dict[str, Any]] = []
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = train_loop(
            inner,
            params,
            stream,
            cfg,
            cfg.output_dir,
            eval_batches=eval_batches,
            device=device,
            precision=precision,
            on_record=records.append,
        )
        runtime = time.perf_counter() - t0
        self.model.prompt_contract = self.contract
        return self._output(result, records, runtime, len(examples), len(stream), cfg)

    def _output(
        self,
        result: dict[str, Any],
        records: list[dict[str, Any]],
        runtime: float,
        n_rows: int,
        micro_batches: int,
        cfg: Any,
    ) -> TrainOutput:
        steps = int(result["steps"])
        train = [r for r in records if r.get("kind") == "train"]
        # transformers reports the mean over steps; each record is the mean of its logging interval.
        prev, total = 0, 0.0
        for r in train:
            total += r["loss"] * (r["step"] - prev)
            prev = r["step"]
        loss = total / max(prev, 1) if train else float(result.get("final_loss") or 0.0)
        samples = steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        metrics = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(samples / runtime, 3),
            "train_steps_per_second": round(steps / runtime, 3),
            "total_flos": 0.0,
            "train_loss": loss,
            "epoch": steps * cfg.gradient_accumulation_steps / max(micro_batches, 1),
            "train_tokens_per_second": result.get("tokens_per_s"),
            "train_rows": n_rows,
        }
        if result.get("eval_loss") is not None:
            metrics["eval_loss"] = result["eval_loss"]
        from types import SimpleNamespace

        self.state = SimpleNamespace(
            global_step=steps,
            log_history=[
                {
                    "step": r["step"],
                    **(
                        {"loss": r["loss"], "learning_rate": r["lr"], "grad_norm": r["grad_norm"]}
                        if r.get("kind") == "train"
                        else {"eval_loss": r["eval_loss"]}
                    ),
                }
                for r in records
            ],
        )
        return TrainOutput(steps, loss, metrics)

    def save_model(self, output_dir: str | None = None) -> None:
        """The adapter (PEFT format) in output_dir (default: args.output_dir)."""
        self.model.save_pretrained(output_dir or getattr(self.args, "output_dir", "trainer_output"))


__all__ = ["SFTConfig", "SFTTrainer", "TrainOutput", "TrainingArguments"]
