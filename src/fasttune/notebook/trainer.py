"""`SFTTrainer` with TRL's arguments, running fasttune's training loop.

The datasets are prepared when the trainer is built, as TRL prepares them (`notebook/dataset.py`): the
`dataset_text_field` column (or `formatting_func`'s text) is trained whole, with EOS appended unless the
text ends with it; `trainer.train_dataset` then holds the rows as `input_ids` and `labels`, which
`train_on_responses_only` can mask. A `data_collator` of transformers' changes what is trained as Unsloth
applies it (`notebook/collators.py`), when `train()` starts. Rows are drawn in the order transformers'
Trainer draws them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from fasttune.notebook.arguments import (
    SFTConfig,
    TrainingArguments,
    _plain,
    check_fields,
    epoch_intervals,
    to_train_config,
)
from fasttune.notebook.collators import has_labels, leave_untrained, untrained_token
from fasttune.notebook.dataset import prepare
from fasttune.notebook.model import NotebookModel
from fasttune.notebook.sft_args import max_length, sampling, text_options

SOURCE = "train_dataset"


class TrainOutput(NamedTuple):
    """What `trainer.train()` returns, as transformers' TrainOutput."""

    global_step: int
    training_loss: float
    metrics: dict[str, Any]


# keys of a metrics record that are not the method's own numbers
RECORD_KEYS = frozenset({"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens",
                         "memory_gib", "memory_kind", "epoch", "unit", "eval_loss", "eval_perplexity"})


def train_output(result: dict[str, Any], records: list[dict[str, Any]], runtime: float, n_rows: int,
                 micro_batches: int, cfg: Any, method_metrics: bool = False) -> tuple[TrainOutput, Any]:
    """(what `trainer.train()` returns, `trainer.state`) from the loop's result and metrics records.
    `method_metrics`: also the method's own numbers (rewards/..., kl, ...) of each record in log_history,
    and those of the last training record in the metrics."""
    from types import SimpleNamespace

    steps = int(result["steps"])
    train = [r for r in records if r.get("kind") == "train"]
    # as transformers: the mean of the losses of the steps this call ran (after a resume, those past the
    # checkpoint; none: 0.0), and the rates over those steps
    ran = steps - int(result.get("started_at", 0))
    loss = result.get("mean_step_loss")
    loss = 0.0 if loss is None else float(loss)
    samples = ran * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    metrics = {
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(samples / runtime, 3),
        "train_steps_per_second": round(ran / runtime, 3),
        "total_flos": 0.0,
        "train_loss": loss,
        "epoch": steps * cfg.gradient_accumulation_steps / max(micro_batches, 1),
        "train_tokens_per_second": result.get("tokens_per_s"),
        "train_rows": n_rows,
    }
    if result.get("eval_loss") is not None:
        metrics["eval_loss"] = result["eval_loss"]

    def own(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in RECORD_KEYS} if method_metrics else {}

    if method_metrics and train:
        metrics.update(own(train[-1]))
    state = SimpleNamespace(
        global_step=steps,
        log_history=[
            {
                "step": r["step"],
                **(
                    {"loss": r["loss"], "learning_rate": r["lr"], "grad_norm": r["grad_norm"]}
                    if r.get("kind") == "train"
                    else {"eval_loss": r["eval_loss"]}
                ),
                **own(r),
            }
            for r in records
        ],
    )
    return TrainOutput(steps, loss, metrics), state


def plan_activation_memory(model: NotebookModel, run: Any, precision: str,
                           log: Callable[[str], None]) -> None:
    """Our Llama model offloading on a GPU: its plan made from the run's shape (`run`: a RunConfig whose
    max_seq_length and train section are the trainer's), as `fasttune train` makes it
    (`memory.setup.set_checkpointing`: narrow micro-batches keeping their last layers unless `keep_narrow` is
    off, the pinned block reserved before the first step). get_peft_model sets the bare mode only."""
    from fasttune.memory.settings import OFFLOAD_MODES
    from fasttune.memory.setup import set_checkpointing
    from fasttune.models.llama import LlamaForCausalLM

    inner, device = model.model, model.device
    if device.type != "cuda" or not isinstance(inner, LlamaForCausalLM) or model.lora_config is None:
        return
    if run.train.gradient_checkpointing not in OFFLOAD_MODES:
        return
    run = dataclasses.replace(run, lora=model.lora_config)  # the adapters' rank and targets, for the estimate
    set_checkpointing(inner, run, device, precision=precision, quantization=model.loaded.quantization,
                      log=log)


def prepare_output_dir(cfg: Any, log: Callable[[str], None], main: bool) -> None:
    """Before a notebook run writes into cfg.output_dir: an earlier run there is continued only with
    `train(resume_from_checkpoint=True)` and replaced (its files removed, by the main process) only with
    `overwrite_output_dir=True`, as the CLI's --resume and --overwrite; otherwise its checkpoints stop the
    run with the ways on."""
    from fasttune.run_dir import RunDir
    from fasttune.train.checkpoint import step_dirs
    from fasttune.train.output_dir import remove_earlier_run

    run = RunDir(cfg.output_dir)
    if cfg.resume:
        return
    if cfg.overwrite:
        if main:
            remove_earlier_run(run, log, "overwrite_output_dir")
        return
    earlier = step_dirs(run.root)
    if earlier:
        raise ValueError(f"output_dir {run.root} holds checkpoints of an earlier run ({earlier[-1].name} the "
                         "newest): continue it with trainer.train(resume_from_checkpoint=True), replace it "
                         "with overwrite_output_dir=True in the trainer's arguments, or choose another "
                         "output_dir")


def recorded_train_loop(
    inner: Any, params: dict[str, Any], stream: Any, cfg: Any, *, report_to: Any, config: dict[str, Any],
    **loop_args: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """train_loop into cfg.output_dir with every record kept and sent to the trackers of `report_to`:
    (its result, the records, the seconds it took). `loop_args` go to train_loop."""
    from fasttune.train.loop import train_loop
    from fasttune.train.trackers import Trackers

    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    dist = loop_args.get("dist")
    prepare_output_dir(cfg, loop_args.get("log", print), dist is None or dist.is_main)
    with Trackers(report_to, cfg.output_dir, config, Path(cfg.output_dir).resolve().name) as trackers:

        def on_record(rec: dict[str, Any]) -> None:
            if "step_mean_loss" in rec:  # transformers logs the mean of the steps' losses as `loss`
                rec = {**rec, "loss": rec["step_mean_loss"]}
                del rec["step_mean_loss"]
            records.append(rec)
            trackers.record(rec)

        # as transformers' Trainer, a resumed run starts a new logging interval at the checkpoint
        result = train_loop(inner, params, stream, cfg, cfg.output_dir, on_record=on_record,
                            resume_log_window=False, **loop_args)
    return result, records, time.perf_counter() - t0


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
        if peft_config is not None:
            raise ValueError(
                "SFTTrainer: peft_config is not supported; call FastLanguageModel.get_peft_model first"
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
        check_fields(self.args)  # unsupported fields are refused here, as TRL refuses them when built
        self.options = text_options(self.args, dataset_text_field, dataset_kwargs)
        self.dataset_text_field = self.options.text_field
        self.max_seq_length = max_length(self.args, max_seq_length, model.max_seq_length)
        self.options.max_length = self.max_seq_length
        self.packing = packing if packing is not None else bool(getattr(self.args, "packing", False))
        self.assistant_only_loss = self.options.assistant_only_loss
        self.formatting_func = formatting_func
        self.dataset_num_proc = dataset_num_proc  # tokenizing is single-process and fast; accepted
        self.sampling = sampling(self.args)
        labels_given = has_labels(train_dataset)
        self.train_dataset = prepare(train_dataset, SOURCE, self.tokenizer, self.options, formatting_func)
        self.contract = self.train_dataset.contract
        self.data_collator = data_collator
        # the token the collator leaves untrained (notebook/collators.py); train_on_responses_only clears it
        self.untrained_token = untrained_token(data_collator, labels_given, self.train_dataset.kind,
                                               self.tokenizer)
        self.eval_dataset = None
        if eval_dataset is not None:
            self.eval_dataset = prepare(eval_dataset, "eval_dataset", self.tokenizer, self.options,
                                        formatting_func, contract=self.contract)
        self.state: Any = None

    def batch_stream(self, batch_size: int, packing: bool, accumulation: int = 1, dist: Any = None) -> Any:
        """The training micro-batches as transformers' Trainer draws them: rows in its order (grouped by
        length if asked), each epoch ending on its own accumulation window, however few micro-batches
        are left for it; under torchrun (`dist`) this rank's slice of the global sequence."""
        from fasttune.data.packing import BatchStream

        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        return BatchStream(self.train_dataset.examples, batch_size, self._batch_length(),
                           self.contract.pad_id, packing, seed=self.sampling.seed,
                           group_by_length=self.sampling.group_by_length, sampler="torch",
                           epoch_multiple=accumulation, rank=rank, world_size=world)

    def _batch_length(self) -> int:
        """The batch width limit: max_length, or with max_length=None the longest example."""
        if self.max_seq_length is not None:
            return self.max_seq_length
        data = [self.train_dataset] + ([self.eval_dataset] if self.eval_dataset is not None else [])
        return max(len(ex.input_ids) for d in data for ex in d.examples)

    # ------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Run fasttune's loop on the adapters; return (global_step, training_loss, metrics)."""
        from fasttune.data.packing import resolve_packing
        from fasttune.train.loop import seed_everything
        from fasttune.train.objective import BatchMeanLoss
        from fasttune.train.precision import resolve_precision

        if isinstance(resume_from_checkpoint, str) and not Path(resume_from_checkpoint).is_dir():
            raise ValueError(
                f"train(resume_from_checkpoint={resume_from_checkpoint!r}): no such checkpoint directory "
                "(a step-N directory of output_dir/checkpoints, or True for the latest)"
            )
        inner, device = self.model.model, self.model.device
        if not any(p.requires_grad for p in inner.parameters()):
            raise ValueError(
                "SFTTrainer: the model has no LoRA adapters; call FastLanguageModel.get_peft_model"
            )
        mode = inner.gradient_checkpointing if self.model.lora_config is not None else None
        cfg = to_train_config(self.args, device_type=device.type, gradient_checkpointing=mode,
                              epoch_strategies=True)
        resume = resume_from_checkpoint
        if not isinstance(resume, str):
            resume = bool(resume)
        cfg = dataclasses.replace(cfg, resume=resume)
        precision = resolve_precision(cfg.precision, device)
        dist, log = self._distributed(cfg, precision)
        self._plan_activation_memory(cfg, precision, log)
        seed_everything(cfg.seed)
        examples = self.train_dataset.examples
        if not examples:
            raise ValueError("SFTTrainer: train_dataset has no rows left to train")
        if self.untrained_token is not None:
            self._leave_untrained(self.untrained_token)
        exact = getattr(inner, "supports_packing", False)
        if self.packing and not exact:
            raise ValueError(
                "SFTTrainer: packing=True is not supported for this architecture (its attention cannot be "
                "kept inside each packed row); set packing=False"
            )
        packing = resolve_packing("on" if self.packing else "off", exact=exact)
        bs, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        stream = self.batch_stream(bs, packing, accumulation, dist)
        # 'epoch' strategies: the stream's epochs end on whole windows, so an epoch is a whole number of steps
        cfg = dataclasses.replace(cfg, **epoch_intervals(self.args, len(stream) // accumulation))
        eval_batches = None
        strategy = str(_plain(getattr(self.args, "eval_strategy", "no")))
        asked = [f"eval_strategy={strategy!r}"] if strategy != "no" else []
        asked += ["eval_on_start=True"] if getattr(self.args, "eval_on_start", False) else []
        if asked and self.eval_dataset is None:
            raise ValueError(f"SFTTrainer: {type(self.args).__name__}.{' and '.join(asked)} needs an "
                             "eval_dataset")
        if asked:
            eval_batches = self._eval_batches(self.eval_dataset, packing)
        params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        if dist is None or dist.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        report_to = cfg.report_to if dist is None or dist.is_main else ["none"]  # rank 0 reports
        result, records, runtime = recorded_train_loop(
            inner, params, stream, cfg, report_to=report_to, config={"train": dataclasses.asdict(cfg)},
            eval_batches=eval_batches, device=device, precision=precision, log=log, dist=dist,
            eval_on_start=bool(getattr(self.args, "eval_on_start", False)), eval_objective=BatchMeanLoss(),
        )
        self.model.prompt_contract = self.contract
        return self._output(result, records, runtime, len(examples), len(stream), cfg)

    def _eval_batches(self, data: Any, packing: bool) -> list[Any]:
        """`data`'s rows as transformers evaluates them: in dataset order (length-grouped when training is),
        in batches of per_device_eval_batch_size, each batch's mean loss weighted by its rows
        (`train.objective.BatchMeanLoss`)."""
        from fasttune.data.packing import make_batches

        size = int(_plain(getattr(self.args, "per_device_eval_batch_size", 8)) or 8)
        width = self._batch_length()
        if self.max_seq_length is None:  # a dataset given to evaluate() may hold a longer row
            width = max([width, *(len(ex.input_ids) for ex in data.examples)])
        return make_batches(data.examples, size, width, self.contract.pad_id, packing,
                            seed=self.sampling.seed, epoch=0, group_by_length=self.sampling.group_by_length,
                            sampler="sequential")

    # ------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """transformers' Trainer.evaluate on the adapters as they are: `eval_dataset` (prepared as the
        trainer prepares its own), else the trainer's eval_dataset. Returns {PREFIX_loss: the eval batches'
        mean token losses weighted by their rows, as TRL's SFTTrainer reports it, PREFIX_runtime,
        PREFIX_samples_per_second, PREFIX_steps_per_second}."""
        from fasttune.data.packing import resolve_packing
        from fasttune.train.loop import evaluate
        from fasttune.train.objective import BatchMeanLoss
        from fasttune.train.precision import resolve_precision

        if ignore_keys:
            raise ValueError("SFTTrainer.evaluate: ignore_keys is not supported (only the loss is computed)")
        data = self.eval_dataset
        if eval_dataset is not None:
            data = prepare(eval_dataset, "eval_dataset", self.tokenizer, self.options, self.formatting_func,
                           contract=self.contract)
        if data is None:
            raise ValueError("SFTTrainer.evaluate: there is no eval_dataset; pass one, or give the trainer "
                             "one")
        if not any(ex.n_trained for ex in data.examples):
            raise ValueError("SFTTrainer.evaluate: eval_dataset has no trained token to score")
        if self.untrained_token is not None:
            leave_untrained(data.examples, self.untrained_token)
        inner, device = self.model.model, self.model.device
        cfg = to_train_config(self.args, device_type=device.type, warn=False,  # warned at build
                              epoch_strategies=True)
        packing = resolve_packing("on" if self.packing else "off",
                                  exact=getattr(inner, "supports_packing", False))
        batches = self._eval_batches(data, packing)
        t0 = time.perf_counter()
        precision = resolve_precision(cfg.precision, device)
        loss, _, _ = evaluate(inner, batches, device, precision, BatchMeanLoss())
        seconds = max(time.perf_counter() - t0, 1e-9)
        p = metric_key_prefix
        return {f"{p}_loss": loss, f"{p}_runtime": round(seconds, 4),
                f"{p}_samples_per_second": round(len(data.examples) / seconds, 3),
                f"{p}_steps_per_second": round(len(batches) / seconds, 3)}

    def _leave_untrained(self, token: int) -> None:
        """The language-modeling collator's labels: every position of `token` untrained, in both datasets."""
        for data in (self.train_dataset, self.eval_dataset):
            if data is not None:
                leave_untrained(data.examples, token)
        if not any(ex.n_trained for ex in self.train_dataset.examples):
            raise ValueError(f"SFTTrainer: with data_collator {type(self.data_collator).__name__} no token "
                             f"of train_dataset is left to train (every target is the pad token, id {token})")

    def _plan_activation_memory(self, cfg: Any, precision: str, log: Callable[[str], None]) -> None:
        from fasttune.config import ModelConfig, RunConfig

        run = RunConfig(model=ModelConfig(max_seq_length=self._batch_length()), train=cfg)
        plan_activation_memory(self.model, run, precision, log)

    def _distributed(self, cfg: Any, precision: str) -> tuple[Any, Callable[[str], None]]:
        """Under torchrun: join the group, check that every rank runs the same job, pick DDP or FSDP2 (the
        latter shards the model now, before its trainable tensors are collected); else (None, the log)."""
        from tqdm.auto import tqdm

        from fasttune.train import distributed as ft_dist

        inner, device = self.model.model, self.model.device
        dist = ft_dist.setup("cpu" if device.type == "cpu" else "cuda")
        if dist is None:
            return None, tqdm.write
        ft_dist.leave_group_at_exit()
        if dist.device != device:
            raise ValueError(
                f"SFTTrainer under torchrun: the model is on {device} but rank {dist.rank} trains on "
                f"{dist.device}; load it with FastLanguageModel.from_pretrained in the script torchrun runs "
                "(it takes cuda:LOCAL_RANK there)"
            )
        log = tqdm.write if dist.is_main else (lambda line: None)
        ft_dist.check_same_config(dataclasses.asdict(cfg), dist)
        loaded = self.model.loaded
        ft_dist.start_mode(dist, inner, setting=cfg.distributed, estimate=None, precision=precision,
                           quantization=loaded.quantization, optim=cfg.optim, family=loaded.family, log=log)
        return dist, log

    def _output(
        self,
        result: dict[str, Any],
        records: list[dict[str, Any]],
        runtime: float,
        n_rows: int,
        micro_batches: int,
        cfg: Any,
    ) -> TrainOutput:
        output, self.state = train_output(result, records, runtime, n_rows, micro_batches, cfg)
        return output

    def save_model(self, output_dir: str | None = None) -> None:
        """The adapter (PEFT format) in output_dir (default: args.output_dir)."""
        self.model.save_pretrained(output_dir or getattr(self.args, "output_dir", "trainer_output"))


def unsloth_train(trainer: Any, *args: Any, **kwargs: Any) -> TrainOutput:
    """Unsloth's `unsloth_train(trainer)`: with current transformers it is `trainer.train()`, and so here."""
    return trainer.train(*args, **kwargs)


__all__ = ["SFTConfig", "SFTTrainer", "TrainOutput", "TrainingArguments", "unsloth_train"]
