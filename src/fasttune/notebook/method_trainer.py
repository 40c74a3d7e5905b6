"""TRL's `DPOTrainer`, `ORPOTrainer`, `KTOTrainer` and `GRPOTrainer` over fasttune's loop: the data, the
micro-batches and the objectives of `fasttune train --method dpo|orpo|kto|grpo` (train/methods.py), on the
model `FastLanguageModel` loaded and `get_peft_model` gave adapters.

    trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(beta=0.1, ...),
                         train_dataset=pairs, processing_class=tokenizer)
    trainer.train()

Datasets are TRL's formats (a `datasets.Dataset` or a list of dicts): prompt/chosen/rejected (DPO, ORPO),
prompt/completion/label (KTO), prompt plus any other columns (GRPO, whose reward functions receive them),
each conversational (lists of messages, rendered with the chat template) or plain (prompt text followed
directly by the completion, EOS appended). The reference of DPO, KTO and GRPO's KL term is the model with
its adapter switched off (`ref_model=None`, as TRL does for a PEFT model); no second model is taken.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from fasttune.notebook.arguments import check_fields, epoch_intervals, to_train_config
from fasttune.notebook.dataset import dataset_rows
from fasttune.notebook.method_args import TABLES, default_args, method_options
from fasttune.notebook.model import NotebookModel
from fasttune.notebook.trainer import TrainOutput, plan_activation_memory, recorded_train_loop, train_output

# constructor arguments of TRL's trainers that fasttune cannot honour when given: name -> why
REFUSED = {
    "data_collator": "fasttune batches whole pairs, rows or groups itself",
    "compute_metrics": "evaluation reports the loss and the method's metrics",
    "peft_config": "call FastLanguageModel.get_peft_model first",
    "quantization_config": "load the model with FastLanguageModel.from_pretrained(load_in_4bit=...)",
    "model_init": "pass the model FastLanguageModel.from_pretrained returned",
    "preprocess_logits_for_metrics": "evaluation reports the loss and the method's metrics",
    "reward_processing_classes": "reward models are not supported; reward functions are Python callables",
    "tools": "tool calling is not supported",
    "rollout_func": "completions are sampled by fasttune's decoder",
    "environment_factory": "completions are sampled by fasttune's decoder",
}


class _MethodTrainer:
    """What the four trainers share; `method` names the objective of train/methods.py."""

    method: ClassVar[str]

    def __init__(
        self,
        model: NotebookModel,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        tokenizer: Any,
        ref_model: Any,
        refused: dict[str, Any],
        callbacks: Any,
    ) -> None:
        name = type(self).__name__
        if not isinstance(model, NotebookModel):
            raise TypeError(
                f"{name}: model must come from fasttune's FastLanguageModel.from_pretrained "
                f"(got {type(model).__name__})"
            )
        if ref_model is not None:
            raise ValueError(
                f"{name}: ref_model is not supported; the reference is the model with its adapter "
                "switched off (ref_model=None), with no second copy of the weights"
            )
        for key, value in refused.items():
            if value is not None and value != (None, None):
                raise ValueError(f"{name}: {key} is not supported ({REFUSED.get(key, 'not implemented')})")
        if callbacks:
            warnings.warn(
                f"{name}: callbacks are ignored; progress and metrics go to the terminal and to "
                "metrics.jsonl in output_dir",
                UserWarning,
                stacklevel=3,
            )
        self.model = model
        self.tokenizer = self.processing_class = processing_class or tokenizer or model.tokenizer
        self.args = args if args is not None else default_args(self.method)
        self.table = TABLES[self.method]
        check_fields(self.args, self.table)  # unsupported fields are refused here, as TRL refuses them
        self.options = method_options(self.args, self.method)
        self.train_dataset = self._prepare(train_dataset, "train_dataset", None)
        self.contract = self.train_dataset.contract
        self.eval_dataset = None
        if eval_dataset is not None:
            if self.method == "grpo":
                raise ValueError(
                    f"{name}: eval_dataset is not supported for GRPO (the rewards logged while "
                    "training are its measure)"
                )
            self.eval_dataset = self._prepare(eval_dataset, "eval_dataset", self.contract)
        self.state: Any = None

    # ------------------------------------------------------------ data
    def _prepare(self, dataset: Any, name: str, contract: Any) -> Any:
        """The rows checked and tokenized by data/pairs.py, as the CLI's; plain rows in TRL's convention (the
        completion directly after the prompt), conversations with the chat template."""
        from fasttune.config import DataConfig
        from fasttune.data.pairs import build_method_data

        rows = dataset_rows(dataset, name, type(self).__name__)
        opts = self.options
        return build_method_data(
            DataConfig(dataset=name, template="text"),
            self.method,
            self.tokenizer,
            opts.max_length or 2**31,
            "train" if contract is None else "eval",
            contract,
            source=name,
            rows_in=enumerate(rows, start=1),
            max_prompt_length=opts.max_prompt_length,
            max_completion_length=opts.max_completion_length,
        )

    def _max_seq_length(self) -> int:
        """The batch width limit: max_length, else the longest sequence (grpo: the longest prompt plus
        max_completion_length)."""
        data = [d for d in (self.train_dataset, self.eval_dataset) if d is not None]
        if self.method == "grpo":
            longest = max(len(e.prompt_ids) for e in self.train_dataset.examples)
            return longest + self.options.method.max_completion_length
        return self.options.max_length or max(d.summary.longest for d in data)

    def run_config(self, device_type: str, resume: bool | str) -> Any:
        """The RunConfig of the equivalent `fasttune train --method ...` job (its model and lora sections
        unused: the model is already loaded)."""
        from fasttune.config import DataConfig, ModelConfig, RunConfig

        inner = self.model.model
        mode = inner.gradient_checkpointing if self.model.lora_config is not None else None
        train = to_train_config(
            self.args, device_type=device_type, gradient_checkpointing=mode, table=self.table,
            epoch_strategies=self.method != "grpo",  # its epochs end on a whole step (`ExampleStream`)
        )
        train = dataclasses.replace(train, resume=resume)
        return RunConfig(
            model=ModelConfig(max_seq_length=self._max_seq_length()),
            data=DataConfig(dataset="train_dataset", template="text", eval_dataset="none"),
            train=train,
            method=self.options.method,
        )

    # ------------------------------------------------------------ training
    def _parts(self, cfg: Any, inner: Any, reference: Any, packing: bool) -> tuple[Any, Any, Any]:
        from fasttune.train.methods import preference_parts

        return preference_parts(
            cfg,
            self.train_dataset,
            self.eval_dataset,
            reference,
            self.contract.pad_id,
            packing and self.method in ("dpo", "orpo"),
            shuffle=self.options.shuffle,
            epoch_windows=True,  # each epoch ends on its own accumulation window, as in TRL's trainers
        )

    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Run fasttune's loop with the method's objective; return (global_step, training_loss, metrics)."""
        from torch import nn

        from fasttune.data.packing import resolve_packing
        from fasttune.lora.reference import Reference
        from fasttune.train.distributed import launched_by_torchrun
        from fasttune.train.loop import epoch_slots, seed_everything
        from fasttune.train.precision import resolve_precision

        name = type(self).__name__
        if launched_by_torchrun():
            raise ValueError(
                f"{name} is not supported under torchrun (its policy and reference passes call the "
                "model outside DDP's and FSDP2's forward); run the script as one process"
            )
        if isinstance(resume_from_checkpoint, str) and not Path(resume_from_checkpoint).is_dir():
            raise ValueError(
                f"train(resume_from_checkpoint={resume_from_checkpoint!r}): no such checkpoint "
                "directory (a step-N directory of output_dir/checkpoints, or True for the latest)"
            )
        inner, device = self.model.model, self.model.device
        if not any(p.requires_grad for p in inner.parameters()):
            raise ValueError(f"{name}: the model has no LoRA adapters; call FastLanguageModel.get_peft_model")
        resume = (
            resume_from_checkpoint
            if isinstance(resume_from_checkpoint, str)
            else bool(resume_from_checkpoint)
        )
        cfg = self.run_config(device.type, resume)
        t = cfg.train
        precision = resolve_precision(t.precision, device)
        from tqdm.auto import tqdm

        plan_activation_memory(self.model, cfg, precision, tqdm.write)
        if self.options.disable_dropout:  # TRL's disable_dropout: every dropout of the model, for good
            for module in inner.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        seed_everything(t.seed)
        params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        reference = Reference(params, None)  # the adapter switched off
        packing = resolve_packing("auto", exact=getattr(inner, "supports_packing", False))
        stream, eval_batches, objective = self._parts(cfg, inner, reference, packing)
        windows = getattr(stream, "epoch_windows", False)  # GRPO's stream has none
        slots = epoch_slots(t, len(stream), windows)
        if windows:  # 'epoch' strategies: every epoch's last step
            steps_per_epoch = slots // t.gradient_accumulation_steps
            t = dataclasses.replace(t, **epoch_intervals(self.args, steps_per_epoch))
            cfg = dataclasses.replace(cfg, train=t)
        Path(t.output_dir).mkdir(parents=True, exist_ok=True)
        result, records, runtime = recorded_train_loop(
            inner, params, stream, t, report_to=t.report_to, config=cfg.to_dict(), eval_batches=eval_batches,
            device=device, precision=precision, log=tqdm.write, objective=objective,
        )
        self.model.prompt_contract = self.contract
        output, self.state = train_output(
            result, records, runtime, len(self.train_dataset.examples), slots, t, method_metrics=True
        )
        return output

    def save_model(self, output_dir: str | None = None) -> None:
        """The adapter (PEFT format) in output_dir (default: args.output_dir)."""
        self.model.save_pretrained(output_dir or getattr(self.args, "output_dir", "trainer_output"))


class DPOTrainer(_MethodTrainer):
    """TRL's DPOTrainer: DPO (loss_type 'sigmoid') or IPO ('ipo') on prompt/chosen/rejected rows."""

    method = "dpo"

    def __init__(
        self,
        model: NotebookModel,
        ref_model: Any = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        tokenizer: Any = None,
    ) -> None:
        refused = dict(
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        super().__init__(
            model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            tokenizer,
            ref_model,
            refused,
            callbacks,
        )


class ORPOTrainer(_MethodTrainer):
    """TRL's ORPOTrainer: the NLL of the chosen answer plus beta times the odds-ratio term; no reference."""

    method = "orpo"

    def __init__(
        self,
        model: NotebookModel,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Any = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        compute_metrics: Any = None,
        *,
        tokenizer: Any = None,
    ) -> None:
        refused = dict(
            data_collator=data_collator,
            model_init=model_init,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            compute_metrics=compute_metrics,
        )
        super().__init__(
            model, args, train_dataset, eval_dataset, processing_class, tokenizer, None, refused, callbacks
        )


class KTOTrainer(_MethodTrainer):
    """TRL's KTOTrainer on prompt/completion/label rows (at least 2 rows per micro-batch: its KL estimate
    pairs each prompt with another row's completion)."""

    method = "kto"

    def __init__(
        self,
        model: NotebookModel,
        ref_model: Any = None,
        args: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Any = None,
        model_init: Any = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        preprocess_logits_for_metrics: Any = None,
        peft_config: Any = None,
        compute_metrics: Any = None,
        *,
        tokenizer: Any = None,
    ) -> None:
        refused = dict(
            data_collator=data_collator,
            model_init=model_init,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            compute_metrics=compute_metrics,
        )
        super().__init__(
            model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            tokenizer,
            ref_model,
            refused,
            callbacks,
        )


class GRPOTrainer(_MethodTrainer):
    """TRL's GRPOTrainer: G completions per prompt sampled by fasttune's decoder, scored by `reward_funcs`
    (Python callables called as TRL calls them: prompts=, completions=, completion_ids= and every other
    dataset column as keyword lists; one float or None per completion), group-normalised advantages and
    the clipped policy-gradient loss, with beta times the KL to the adapter-off model."""

    method = "grpo"

    def __init__(
        self,
        model: NotebookModel,
        reward_funcs: Any = None,
        args: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Any = None,
        optimizers: Any = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        *,
        tokenizer: Any = None,
    ) -> None:
        refused = dict(
            reward_processing_classes=reward_processing_classes,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        self.reward_funcs = _reward_funcs(reward_funcs)
        super().__init__(
            model, args, train_dataset, eval_dataset, processing_class, tokenizer, None, refused, callbacks
        )
        weights = self.options.method.reward_weights
        if weights is not None and len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"GRPOConfig.reward_weights: {len(weights)} weights for {len(self.reward_funcs)} "
                "reward functions"
            )

    def _parts(self, cfg: Any, inner: Any, reference: Any, packing: bool) -> tuple[Any, Any, Any]:
        from fasttune.train.methods import grpo_parts

        return grpo_parts(
            cfg,
            inner,
            self.tokenizer,
            self.train_dataset,
            reference,
            self.contract,
            self.reward_funcs,
            shuffle=self.options.shuffle,
        )


def _reward_funcs(funcs: Any) -> list[Callable]:
    """TRL's reward_funcs as a list of Python callables; reward models (a hub id or a model) are refused."""
    if funcs is None:
        raise ValueError("GRPOTrainer: reward_funcs is required (a Python callable or a list of them)")
    items = list(funcs) if isinstance(funcs, Sequence) and not isinstance(funcs, str) else [funcs]
    if not items:
        raise ValueError("GRPOTrainer: reward_funcs is empty")
    for k, f in enumerate(items):
        from torch import nn

        if isinstance(f, str | nn.Module) or not callable(f):
            raise ValueError(
                f"GRPOTrainer: reward_funcs[{k}]={f!r:.80} is not supported: reward models are not "
                "supported; pass Python callables (fasttune.train.rewards has exact_match and "
                "regex_reward)"
            )
    return items


__all__ = ["DPOTrainer", "GRPOTrainer", "KTOTrainer", "ORPOTrainer"]
