"""The Python API behind the CLI: `train(cfg)` runs a whole fine-tuning job and returns what it made.

One function per step of the flow, called in order by `train`:
config -> device/precision -> load model -> attach LoRA -> data -> batches -> answers before ->
train_loop -> adapter + tokenizer + prompt contract + run.yaml + loss.png -> answers after -> summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fasttune.config import (
    AUTO,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    validate,
)
from fasttune.run_dir import CONTRACT_FILE, RunDir

PROBE_FILE = "lumen_probe.json"
# Questions answered per generate call at an eval: decoding one token costs about the same for 1 or 16 rows
# on a CPU (reading the weights dominates), and 16 rows of KV cache are small next to training activations.
ANSWER_BATCH = 16


class ModelLoadError(RuntimeError):
    """The model named by the configuration cannot be loaded (missing file, no GPU for 4-bit, ...)."""


@dataclass
class Sample:
    question: str
    answer: str


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    samples_before: list[Sample] = field(default_factory=list)
    samples_after: list[Sample] = field(default_factory=list)
    summary: str = ""
    # the trained model in memory, to ask it more questions without loading the run again
    model: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    contract: Any = field(default=None, repr=False)


# ---- model --------------------------------------------------------------------------------------

def load(model_cfg: ModelConfig, device: torch.device):
    """fasttune.models.loading.load_model, with its failures turned into one clear ModelLoadError."""
    from fasttune.models.loading import load_model, resolve_source

    try:
        if model_cfg.trust_remote_code:
            from fasttune.remote_code import warn_remote_code

            warn_remote_code(resolve_source(model_cfg))
        return load_model(model_cfg, device)
    except (OSError, RuntimeError, ValueError, ImportError) as e:
        raise ModelLoadError(f"model_name '{model_cfg.model_name}': {e}") from e


def attach_lora(loaded: Any, lora: LoraConfig) -> torch.nn.Module:
    """Our LoRALinear for the Llama family, PEFT for any other architecture; only adapters train."""
    if lora.bias != "none":
        raise ConfigError("bias: only 'none' is supported")
    kwargs = dict(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                  target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                  random_state=lora.random_state)
    peft_only = {"use_dora": lora.use_dora, "modules_to_save": lora.modules_to_save}
    for name, value in peft_only.items():
        if value and loaded.family == "llama":
            raise ConfigError(f"{name}: not supported by fasttune's own Llama-family model (its fused LoRA "
                              "kernels compute plain LoRA); architectures that train through transformers + "
                              "PEFT take it")
    try:
        if loaded.family == "llama":
            from fasttune.lora.apply import apply_lora

            apply_lora(loaded.model, **kwargs)
        else:
            from fasttune.models.generic import apply_lora_generic

            apply_lora_generic(loaded.model, **kwargs, **peft_only)
    except ValueError as e:  # unknown target module names and the like
        raise ConfigError(f"target_modules: {e}") from e
    return loaded.model




def base_model_id(model_cfg: ModelConfig, loaded: Any) -> str:
    """What adapter_config.json names as the base: the hub id where there is one, else the local path."""
    from fasttune.models.presets import PRESETS

    name = model_cfg.model_name
    if name in PRESETS:
        return PRESETS[name]["hf_id"]
    return str(Path(loaded.source).resolve()) if Path(name).expanduser().exists() else name


# ---- data ---------------------------------------------------------------------------------------

def eval_config(data: DataConfig) -> DataConfig | None:
    """The eval split's DataConfig: eval_dataset if given; for 'auto', a built-in dataset's held-out
    split (other sources have none, so no eval); 'split:F' or val_set_size, a share held out of the
    training data (data/holdout.py)."""
    from fasttune.data.tokenize import eval_source

    source = eval_source(data)
    if source is None:
        return None
    return dataclasses.replace(data, eval_dataset=source, max_rows=None)


def questions_of(rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n prompts from validated rows: alpaca instruction/input, or a conversation up to its
    last user turn. Completion rows have no question and give none."""
    out = []
    for row in rows:
        if len(out) >= n:
            break
        if "instruction" in row:
            out.append({"instruction": row["instruction"], "input": row.get("input", "")})
        elif "messages" in row:
            msgs = row["messages"]
            last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
            if last_user is not None:
                out.append({"messages": msgs[: last_user + 1]})
    return out


def probe_questions() -> list[dict[str, Any]]:
    """The embedded dataset's fixed probe set: instruction, input and the keywords an answer must hold."""
    from importlib.resources import files

    return json.loads(files("fasttune").joinpath("assets", PROBE_FILE).read_text())


# ---- answers ------------------------------------------------------------------------------------

def answer(model: torch.nn.Module, tokenizer: Any, contract: Any, questions: Sequence[dict[str, Any]],
           max_new_tokens: int = 48) -> list[Sample]:
    """The model's greedy answer to each question, rendered with the run's prompt contract."""
    from fasttune.data.templates import render_messages, render_prompt
    from fasttune.infer.evaluate import greedy_answers

    if not questions:
        return []
    stop_ids = [contract.eos_id]
    if contract.end_of_turn:
        stop_ids.append(tokenizer.convert_tokens_to_ids(contract.end_of_turn))
    prompts, shown = [], []
    for q in questions:
        if "messages" in q:
            prompts.append(render_messages(q["messages"], contract, tokenizer))
            shown.append(q["messages"][-1]["content"])
        else:
            prompts.append(render_prompt(q["instruction"], q.get("input", ""), contract, tokenizer))
            shown.append(q["instruction"] + (f" [{q['input']}]" if q.get("input") else ""))
    replies = greedy_answers(model, tokenizer, prompts, contract, eos_token_ids=stop_ids,
                             max_new_tokens=max_new_tokens)
    return [Sample(q, a) for q, a in zip(shown, replies)]


def save_answers(path: Path, before: Sequence[Sample], after: Sequence[Sample] | None) -> None:
    """answers.json: {"before": [{question, answer}], "after": [...] or null while training runs}."""
    rows = lambda samples: [dataclasses.asdict(s) for s in samples]
    body = {"before": rows(before), "after": None if after is None else rows(after)}
    path.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")


def format_samples(title: str, samples: Sequence[Sample]) -> str:
    lines = [title]
    for s in samples:
        lines += [f"  Q: {s.question}", f"  A: {s.answer or '(empty)'}"]
    return "\n".join(lines)


# ---- the whole job --------------------------------------------------------------------------------

def train(cfg: RunConfig, *, log: Callable[[str], None] | None = None,
          reward_funcs: Sequence[Callable] | None = None) -> RunResult:
    """Run the fine-tuning job `cfg` describes; everything it writes goes to cfg.train.output_dir.

    `log` gets every line meant for the user (default: printed above the progress bar).
    `reward_funcs`: grpo's reward functions as Python callables (else cfg.method.reward names them).
    """
    from fasttune.data.packing import BatchStream, make_batches, resolve_packing
    from fasttune.lora.apply import count_parameters
    from fasttune.memory.setup import run_estimate, run_plan, set_checkpointing
    from fasttune.model_card import write_card
    from fasttune.train import dist_state as ft_state
    from fasttune.train import distributed as ft_dist
    from fasttune.train.auto import choose_max_seq_length
    from fasttune.train.interrupts import StopRequests
    from fasttune.train.loop import seed_everything, train_loop
    from fasttune.train.metrics import plot_loss, summary_text
    from fasttune.train.output_dir import check as check_output_dir
    from fasttune.train.output_dir import claim as claim_output_dir
    from fasttune.train.precision import resolve_device, resolve_precision
    from fasttune.train.step_guard import out_of_memory_error
    from fasttune.train.trackers import Trackers
    from fasttune.train.trackers import check_installed as check_trackers

    log = log or tqdm.write
    validate(cfg)
    dist = ft_dist.setup(cfg.train.device)  # None unless launched by torchrun
    main = dist is None or dist.is_main  # the rank that speaks and writes
    if dist is not None:
        log = log if main else _quiet
        cfg = ft_dist.check_launch(cfg, dist, log)
    if main:
        check_output_dir(cfg.train)  # an earlier run in the way is reported before anything loads
        check_trackers(cfg.train.report_to)  # an absent tracker library too
    device = dist.device if dist is not None else resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)

    # Data first (it needs only the tokenizer): a broken row stops the run before the model loads.
    method = cfg.method.method
    tokenizer = load_tokenizer(cfg.model)
    cfg = use_chat_template(cfg, tokenizer, log)
    if method == "sft":
        data = prepare_data(cfg, tokenizer, log)
        train_data, eval_data, questions = data.train, data.eval, data.questions
        contract, max_len = train_data.contract, data.max_seq_length
    else:  # preference and RL rows (train/methods.py); their prompts frame as the init_from run's
        from fasttune.train.methods import init_contract, method_data

        data, questions = None, []
        cut, context = length_cut(cfg)
        train_data, eval_data = method_data(cut, tokenizer, init_contract(cfg.method.init_from), log)
        contract, max_len = train_data.contract, cut.model.max_seq_length
        if cfg.model.max_seq_length == AUTO:
            longest = max(d.summary.longest for d in (train_data, eval_data) if d is not None)
            max_len = log_choice(choose_max_seq_length(longest, context), log)
    check_chat_template_used(cfg, tokenizer, contract, getattr(train_data, "format", method))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_length=max_len))
    cfg = resolve_learning_rate(cfg, log)
    t, run = cfg.train, RunDir(cfg.train.output_dir)
    run_dir = run.root

    log(f"loading {cfg.model.model_name} on {device}")
    loaded = load(cfg.model, device)
    for note in loaded.notes:
        log(f"  note: {note}")
    model = attach_lora(loaded, cfg.lora)
    if cfg.method.init_from:
        from fasttune.train.methods import load_init_adapter

        log(f"  continuing the adapter of {load_init_adapter(model, cfg.method.init_from)}")
    checkpointing = set_checkpointing(model, cfg, device, precision=precision,
                                      quantization=loaded.quantization, log=log)
    estimate = run_estimate(model, cfg, device, precision=precision, quantization=loaded.quantization)
    trainable, total = count_parameters(model)
    if dist is not None:  # DDP or FSDP2 (which shards the model now, before its parameters are collected)
        ft_dist.start_mode(dist, model, setting=cfg.train.distributed, estimate=estimate,
                           precision=precision, quantization=loaded.quantization, optim=cfg.train.optim,
                           family=loaded.family, log=log)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    log(f"  {loaded.family} model, weights {str(loaded.dtype).removeprefix('torch.')}, compute {precision}, "
        f"kernels {'on' if loaded.use_kernels else 'off'}, gradient checkpointing {checkpointing}")
    log(f"  LoRA r={cfg.lora.r} alpha={cfg.lora.lora_alpha}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.2f}%)")
    if estimate is not None:  # our Llama model on a GPU: the plan it executes and the estimate read from it
        log(f"  activation memory plan at {t.per_device_train_batch_size} x {max_len} tokens: "
            f"{run_plan(model, cfg, precision).describe()}")
        log(f"  GPU memory {estimate.describe()} at {t.per_device_train_batch_size} x {max_len} tokens")
        if dist is not None:
            log("  " + ft_dist.describe_per_rank(estimate, dist, model.config.num_hidden_layers,
                                                 sum(p.numel() for p in params.values())))

    packing = resolve_packing(cfg.data.packing, exact=getattr(model, "supports_packing", False))
    batch_size = t.per_device_train_batch_size
    objective = None  # SFT's token loss
    if method == "sft":
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        stream = BatchStream(train_data.examples, batch_size, max_len, contract.pad_id, packing, seed=t.seed,
                             group_by_length=cfg.data.group_by_length, rank=rank, world_size=world)
        eval_batches = None if eval_data is None else make_batches(
            eval_data.examples, batch_size, max_len, contract.pad_id, packing, seed=t.seed, epoch=0)
    else:
        from fasttune.lora.reference import Reference
        from fasttune.train.methods import grpo_parts, preference_parts

        packing = packing and method in ("dpo", "orpo")  # kto and grpo rows are padded
        # the reference: the starting adapter of an init_from run, else the base with the adapter off
        reference = Reference(params, params if cfg.method.init_from else None)
        if method == "grpo":
            stream, eval_batches, objective = grpo_parts(cfg, model, tokenizer, train_data, reference,
                                                         contract, reward_funcs)
        else:
            stream, eval_batches, objective = preference_parts(cfg, train_data, eval_data, reference,
                                                               contract.pad_id, packing)
    steps_per_epoch = math.ceil(len(stream) / t.gradient_accumulation_steps)
    grouped = ", grouped by length" if cfg.data.group_by_length else ""
    per_rank = f"{dist.world_size} ranks x {batch_size}" if dist is not None else f"{batch_size}"
    log(f"  packing {'on' if packing else 'off'}{grouped}: {len(stream)} micro-batches of {per_rank} per "
        f"epoch, "
        f"accumulation {t.gradient_accumulation_steps} -> {steps_per_epoch} optimiser steps per epoch")

    # inputs validated: from here on the run writes into output_dir; SIGTERM/SIGINT stop at a step boundary
    # rank 0 alone holds output_dir; every rank stops at a step boundary on a signal
    with claim_output_dir(t, log) if main else contextlib.nullcontext(), StopRequests(log) as stop:
        if main:
            # resume and overwrite off: `fasttune train --config run.yaml` runs the job again from the
            # start; the values auto chose are written as numbers, so that it runs with the same ones
            saved = dataclasses.replace(t, resume=False, overwrite=False)
            dataclasses.replace(cfg, train=saved).save(run.run_yaml)

        # greedy answers run on rank 0, on its whole copy of the model; under FSDP2 no rank has one
        answering = main and (dist is None or dist.mode == "ddp")
        if dist is not None and dist.mode == "fsdp" and (questions or eval_batches is not None):
            log("  greedy answers are skipped under FSDP2 (no rank holds the whole model); eval loss is "
                "computed sharded. Ask the trained run with fasttune generate")
        before = answer(model, tokenizer, contract, questions) if answering else []
        if main:
            save_answers(run.answers, before, None)
        if before:
            log(format_samples("answers before training:", before))
        scorer = None
        if answering and eval_batches is not None and data is not None and data.answers is not None:
            scorer = answer_eval(model, tokenizer, contract, data.answers, t.eval_answers)
            n = len(data.answers)
            log(f"  eval: loss and perplexity, and greedy answers to {min(t.eval_answers, n)} of {n} "
                f"held-out questions ({n} at the end), at most {data.answers.max_new_tokens} new tokens each")
        try:
            report_to = t.report_to if main else ["none"]  # rank 0 reports
            with Trackers(report_to, run_dir, cfg.to_dict(), run_dir.resolve().name) as trackers:
                metrics = train_loop(model, params, stream, t, run_dir, eval_batches=eval_batches,
                                     answer_eval=scorer, device=device, precision=precision, log=log,
                                     objective=objective, stop_requested=stop, on_record=trackers.record,
                                     dist=dist)
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory_error(batch_size, max_len, estimate and estimate.describe()) from None
        # the adapter whole, in PEFT format, whatever the mode (gathering FSDP2's shards is collective)
        weights = ft_state.full_adapter(params) if dist is not None and dist.mode == "fsdp" else None
        adapter_dir = run.adapter
        if main:
            save_run_adapter(model, loaded, tokenizer, cfg, contract, run.adapter, weights=weights)
            write_card(adapter_dir, "adapter", run_dir)  # README.md: from run.yaml, metrics and the contract
        after = answer(model, tokenizer, contract, questions) if answering else []
        if main:
            save_answers(run.answers, before, after)
        if after:
            log(format_samples("answers after training:", after))

        if estimate is not None:
            metrics["memory_estimate_gib"] = estimate.total / 2**30
        summary = summary_text(metrics)
        if dist is not None:
            ft_dist.barrier(dist)  # no rank returns before rank 0 has written the adapter
        if t.report and main:
            plot_loss(run.metrics, run.loss_plot)
            log("summary\n" + summary)
            made = [run.adapter, run.run_yaml, run.metrics, run.loss_plot, run.checkpoints]
            log(f"run directory {run_dir}: " + ", ".join(p.name + "/" if p.is_dir() else p.name
                                                         for p in made if p.exists()))
        return RunResult(run_dir, adapter_dir, metrics, before, after, summary, model, tokenizer,
                         contract)


def _quiet(line: str) -> None:
    """The log of a rank other than 0."""


@dataclass
class PreparedData:
    train: Any  # TokenizedData
    eval: Any  # TokenizedData, or None without an eval split
    questions: list[dict[str, Any]]  # shown before and after training
    answers: Any = None  # infer.evaluate.AnswerSet: the eval split's questions with references, or None
    max_seq_length: int = 0  # cfg.model.max_seq_length, or what 'auto' chose from the training data


def prepare_data(cfg: RunConfig, tokenizer: Any, log: Callable[[str], None]) -> PreparedData:
    """Tokenized train and eval splits, the questions to show, and the eval questions to score answers on."""
    from fasttune.data import mixing
    from fasttune.infer.evaluate import answer_set

    max_len, train_data = tokenize_train(cfg, tokenizer, log)
    eval_cfg = eval_config(cfg.data)
    eval_data, eval_rows = None, None
    if eval_cfg is not None:
        eval_data = mixing.build_eval(eval_cfg, tokenizer, max_len, train_data.contract)
        log(str(eval_data.summary))
        if cfg.train.show_samples > 0 or cfg.train.eval_answers > 0:
            eval_rows = mixing.eval_rows(eval_cfg)
    questions: list[dict] = []
    if cfg.train.show_samples > 0:  # held-out questions where there are some, else training ones
        if eval_rows is None:
            eval_or_train = mixing.first_rows(cfg.data, cfg.train.show_samples)
        else:
            eval_or_train = eval_rows
        questions = questions_of(eval_or_train, cfg.train.show_samples)
    answers = None
    if eval_rows is not None and cfg.train.eval_answers > 0:
        answers = answer_set(eval_rows, train_data.contract, tokenizer)
    return PreparedData(train_data, eval_data, questions, answers, max_len)


def tokenize_train(cfg: RunConfig, tokenizer: Any, log: Callable[[str], None]) -> tuple[int, Any]:
    """(max_seq_length, the tokenized training split). With max_seq_length 'auto' the rows are cut at the
    longest length auto may choose, and the choice follows from the longest example left
    (`train/auto.choose_max_seq_length`); every example then fits it as it is."""
    from fasttune.data.mixing import build_train
    from fasttune.train.auto import choose_max_seq_length

    cut, context = length_cut(cfg)
    max_len = cut.model.max_seq_length
    train_data = build_train(cfg.data, tokenizer, max_len, cfg.train.seed)
    log(str(train_data.summary))
    if cfg.model.max_seq_length == AUTO:
        max_len = log_choice(choose_max_seq_length(train_data.summary.longest, context), log)
    return max_len, train_data


def length_cut(cfg: RunConfig) -> tuple[RunConfig, int | None]:
    """(cfg with max_seq_length 'auto' replaced by the longest length auto may choose, the model's context
    or None): the data is tokenized at that cut, then auto chooses from the longest example left."""
    from fasttune.train.auto import auto_length_cap, context_length

    if cfg.model.max_seq_length != AUTO:
        return cfg, None
    context = context_length(model_hf_config(cfg.model))
    cut = dataclasses.replace(cfg.model, max_seq_length=auto_length_cap(context))
    return dataclasses.replace(cfg, model=cut), context


def log_choice(choice: Any, log: Callable[[str], None]) -> int:
    log("  " + choice.reason)
    return choice.max_seq_length


def use_chat_template(cfg: RunConfig, tokenizer: Any, log: Callable[[str], None]) -> RunConfig:
    """data.chat_template (a name or a .jinja file), checked in Jinja's sandbox, made the tokenizer's chat
    template; with template 'auto', alpaca rows are then rendered as chat too."""
    from fasttune.data.chat_templates import resolve_chat_template

    value = cfg.data.chat_template
    if not value:
        return cfg
    if cfg.data.template == "alpaca":
        raise ConfigError(f"chat_template {value}: template 'alpaca' renders alpaca rows with the alpaca "
                          "prompt, not a chat template; set template to auto or chat, or drop chat_template")
    tokenizer.chat_template = resolve_chat_template(value, tokenizer)
    log(f"  chat template {value} (instead of the tokenizer's own)")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template="chat"))


def check_chat_template_used(cfg: RunConfig, tokenizer: Any, contract: Any, fmt: str) -> None:
    """A chat_template the run's rows are not rendered with is an error, not a silent no-op."""
    if cfg.data.chat_template and contract.chat_template != tokenizer.chat_template:
        from fasttune.data.mixing import describe

        raise ConfigError(f"chat_template {cfg.data.chat_template}: the {fmt} rows of "
                          f"{describe(cfg.data.dataset)} are "
                          "not rendered with a chat template (text rows are trained as they are)")


def resolve_learning_rate(cfg: RunConfig, log: Callable[[str], None]) -> RunConfig:
    """cfg with 'auto' in learning_rate and lora_alpha replaced by what suits the model's size
    (`train/auto.choose_learning_rate`), and the choice logged."""
    from fasttune.train.auto import choose_learning_rate, parameter_count

    lo, t = cfg.lora, cfg.train
    if AUTO not in (lo.lora_alpha, t.learning_rate):
        return cfg
    if t.learning_rate == AUTO and cfg.method.method != "sft":
        raise ConfigError(f"learning_rate: 'auto' is chosen for supervised fine-tuning (method sft); set a "
                          f"learning_rate for method {cfg.method.method}")
    n_params = parameter_count(model_hf_config(cfg.model), cfg.model.trust_remote_code)
    choice = choose_learning_rate(n_params, lo.r, lo.lora_alpha, t.learning_rate, lo.use_rslora)
    log("  " + choice.reason)
    return dataclasses.replace(cfg, lora=dataclasses.replace(lo, lora_alpha=choice.lora_alpha),
                               train=dataclasses.replace(t, learning_rate=choice.learning_rate))


def model_hf_config(model_cfg: ModelConfig) -> Any:
    """The model's transformers config, read without its weights."""
    from transformers import AutoConfig

    from fasttune.models.loading import resolve_source

    try:
        return AutoConfig.from_pretrained(resolve_source(model_cfg),
                                          trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"model_name '{model_cfg.model_name}': {e}") from e


def answer_eval(model: torch.nn.Module, tokenizer: Any, contract: Any, answers: Any,
                limit: int) -> Callable[[bool], dict[str, Any]]:
    """train_loop's `answer_eval`: the first `limit` questions at each eval, all of them at the final one."""
    from fasttune.infer.evaluate import match_answers
    from fasttune.infer.load import stop_ids

    eos = stop_ids(contract, tokenizer)

    def run(final: bool) -> dict[str, Any]:
        return match_answers(model, tokenizer, answers, contract, eos_token_ids=eos,
                             limit=None if final else limit, batch_size=ANSWER_BATCH)

    return run


def save_run_adapter(model: torch.nn.Module, loaded: Any, tokenizer: Any, cfg: RunConfig, contract: Any,
                     out: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """adapter_model.safetensors + adapter_config.json (PEFT format), tokenizer files, prompt contract.
    `weights`: the adapter's tensors gathered whole (FSDP2), instead of the model's own.

    Written beside `out` and renamed into place, so `out` holds either the earlier adapter or the whole new
    one; a filesystem error names the path and leaves no partial directory."""
    from fasttune.fs import filesystem_error, replace_dir, temporary_sibling

    tmp = temporary_sibling(out)
    try:
        if loaded.family == "llama":
            from fasttune.lora.peft_format import save_adapter

            save_adapter(model, tmp, base_model_name_or_path=base_model_id(cfg.model, loaded),
                         revision=cfg.model.revision, weights=weights)
        else:
            model.save_adapter(tmp)
        tokenizer.save_pretrained(str(tmp))
        contract.save(tmp / CONTRACT_FILE)
        replace_dir(tmp, out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = filesystem_error(e, out)
        if err is e:
            raise
        raise err from e
    return out


def preview_data(cfg: RunConfig, n: int = 3, color: bool | None = None) -> str:
    """`fasttune data preview`: the first n training examples with trained tokens marked, and the summary."""
    import sys

    from fasttune.data.preview import preview_rows

    validate(cfg)
    tokenizer = load_tokenizer(cfg.model)
    cfg = use_chat_template(cfg, tokenizer, lambda line: None)
    color = sys.stdout.isatty() if color is None else color
    if cfg.method.method != "sft":  # pairs, KTO rows or GRPO prompts, framed as the init_from run's
        from fasttune.data.mixing import build_method_train
        from fasttune.data.preview import preview_method_rows
        from fasttune.train.methods import init_contract

        cut, _ = length_cut(cfg)
        data = build_method_train(cfg.data, cfg.method.method, tokenizer, cut.model.max_seq_length,
                                  init_contract(cfg.method.init_from), cfg.train.seed)
        return preview_method_rows(data.examples, tokenizer, n=n, color=color, summary=data.summary)
    chosen: list[str] = []
    _, data = tokenize_train(cfg, tokenizer, chosen.append)
    shown = preview_rows(data.examples, tokenizer, n=n, color=color, summary=data.summary)
    return "\n".join([shown] + [line for line in chosen if "auto:" in line])


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The model's tokenizer alone (with the same pad-token fix as load_model), without loading weights."""
    from transformers import AutoConfig, AutoTokenizer

    from fasttune.models.loading import fix_tokenizer, resolve_source

    try:
        directory = resolve_source(model_cfg)
        if model_cfg.trust_remote_code:
            from fasttune.remote_code import warn_remote_code

            warn_remote_code(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=model_cfg.trust_remote_code)
        fix_tokenizer(tokenizer, AutoConfig.from_pretrained(directory,
                                                            trust_remote_code=model_cfg.trust_remote_code))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"model_name '{model_cfg.model_name}': {e}") from e
    return tokenizer
