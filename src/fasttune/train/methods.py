"""What differs between the training methods: their data, their micro-batches and their objective.

SFT, DPO, ORPO, KTO and GRPO share everything else (loader, LoRA, loop, checkpoints, exports); `api.train`
asks this module for the parts of a non-SFT method, and for the adapter an `init_from` run left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fasttune.config import ConfigError, RunConfig
from fasttune.data.mixing import build_method_train
from fasttune.data.pairs import MethodData, build_method_data
from fasttune.data.templates import PromptContract
from fasttune.data.tokenize import eval_source


def init_adapter_dir(init_from: str) -> Path:
    """The adapter directory of `init_from`: a run directory (its adapter/) or an adapter directory."""
    from fasttune.run_dir import RunNotFound, locate

    try:
        return locate(Path(init_from).expanduser()).adapter_dir
    except RunNotFound as e:
        raise ConfigError(f"init_from: {e}") from None


def init_contract(init_from: str | None) -> PromptContract | None:
    """The prompt contract the `init_from` run trained with, so that this run frames prompts the same way."""
    if init_from is None:
        return None
    from fasttune.run_dir import locate

    init_adapter_dir(init_from)  # a clear error first
    path = locate(Path(init_from).expanduser()).contract_path()
    return PromptContract.load(path) if path is not None else None


def load_init_adapter(model: torch.nn.Module, init_from: str) -> Path:
    """Copy the `init_from` adapter's weights into the model's freshly attached LoRA layers (same shapes)."""
    directory = init_adapter_dir(init_from)
    hf = getattr(model, "hf_model", None)
    try:
        if hf is not None:  # the generic transformers + PEFT path
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            from fasttune.run_dir import ADAPTER_WEIGHTS

            result = set_peft_model_state_dict(hf, load_file(str(directory / ADAPTER_WEIGHTS)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"adapter keys the model lacks: {result.unexpected_keys[:3]}")
        else:
            from fasttune.lora.peft_format import load_adapter

            load_adapter(model, directory)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"init_from '{init_from}': {e} (the lora options must match that run's)") from e
    return directory


def method_data(cfg: RunConfig, tokenizer: Any, contract: PromptContract | None,
                log: Callable[[str], None]) -> tuple[MethodData, MethodData | None]:
    """The train split and, where there is one, the eval split of a dpo/orpo/kto/grpo dataset."""
    method, max_len = cfg.method.method, cfg.model.max_seq_length
    train = build_method_train(cfg.data, method, tokenizer, max_len, contract, cfg.train.seed)
    log(str(train.summary))
    from fasttune.data.holdout import holdout_fraction

    if holdout_fraction(cfg.data) is not None:
        raise ConfigError("eval_dataset / val_set_size: holding rows out of the training data is not "
                          f"supported for {method}; give a held-out file as eval_dataset")
    source = eval_source(cfg.data)
    held_out = None
    if method == "grpo":  # its measure is the reward of the completions it samples while training
        if cfg.data.eval_dataset not in ("auto", "none", "", None):
            raise ConfigError("eval_dataset: grpo has no eval split (the logged rewards are its measure); "
                              "set eval_dataset none")
        source = None
    if source is not None:
        held_out = build_method_data(dataclasses.replace(cfg.data, max_rows=None), method, tokenizer, max_len,
                                     "eval", train.contract, source=source)
        log(str(held_out.summary))
    return train, held_out


def beta_of(cfg: RunConfig) -> float:
    from fasttune.train.preference import DEFAULT_BETA

    return cfg.method.beta if cfg.method.beta is not None else DEFAULT_BETA.get(cfg.method.method, 0.0)


def preference_parts(cfg: RunConfig, train: MethodData, held_out: MethodData | None, reference: Any,
                     pad_id: int, packed: bool, shuffle: bool = True,
                     epoch_windows: bool = False) -> tuple[Any, list | None, Any]:
    """(stream of micro-batches, eval micro-batches or None, objective) of dpo, orpo or kto; `shuffle`
    False draws the rows in dataset order; `epoch_windows` ends each epoch on its own accumulation window
    (`ExampleStream`)."""
    from fasttune.data.pair_batches import ExampleStream, collate_pairs, collate_unpaired, fixed_batches
    from fasttune.train.preference import DPOObjective, KTOObjective, ORPOObjective

    me, max_len, beta = cfg.method, cfg.model.max_seq_length, beta_of(cfg)
    if cfg.data.group_by_length:
        raise ConfigError(f"group_by_length: not supported for {me.method} (its micro-batches hold whole "
                          "pairs or rows in a seeded order); leave it off")
    if me.method == "kto" and cfg.data.packing == "on":
        raise ConfigError("packing: 'on' is not supported for kto (its rows are padded); use auto or off")
    if me.method == "kto":
        if cfg.train.per_device_train_batch_size < 2:
            raise ConfigError("per_device_train_batch_size: kto needs at least 2 rows per micro-batch (its "
                              "KL reference point pairs each prompt with another row's completion)")
        collate = partial(collate_unpaired, pad_id=pad_id, max_len=max_len)
        objective = KTOObjective(reference, beta, me.desirable_weight, me.undesirable_weight)
    else:
        collate = partial(collate_pairs, pad_id=pad_id, max_len=max_len, packed=packed,
                          whole_chosen=me.method == "orpo")
        objective = (ORPOObjective(beta) if me.method == "orpo"
                     else DPOObjective(reference, beta, me.loss_type or "sigmoid"))
    batch = cfg.train.per_device_train_batch_size
    stream = ExampleStream(train.examples, batch, collate, cfg.train.seed, shuffle, epoch_windows)
    evals = None if held_out is None else fixed_batches(held_out.examples, batch, collate)
    return stream, evals, objective


def grpo_parts(cfg: RunConfig, model: torch.nn.Module, tokenizer: Any, train: MethodData, reference: Any,
               contract: PromptContract, reward_funcs: list | None = None,
               shuffle: bool = True) -> tuple[Any, None, Any]:
    """(stream sampling completions from the policy, no eval batches, objective) of grpo. `reward_funcs`:
    callables from the notebook layer; else cfg.method.reward by name. `shuffle` False: prompts in dataset
    order."""
    from fasttune.infer.load import stop_ids
    from fasttune.train.grpo import GRPOObjective
    from fasttune.train.rewards import resolve_reward, reward_name
    from fasttune.train.rollout import RolloutStream

    me, t = cfg.method, cfg.train
    funcs = [resolve_reward(f) for f in (reward_funcs if reward_funcs is not None else me.reward)]
    if not funcs:
        raise ConfigError("reward: grpo needs at least one reward function (--reward module:function, "
                          "exact_match or regex:PATTERN)")
    if me.reward_weights is not None and len(me.reward_weights) != len(funcs):
        raise ConfigError(f"reward_weights: {len(me.reward_weights)} weights for {len(funcs)} reward "
                          "functions")
    if cfg.data.packing == "on" or cfg.data.group_by_length:
        raise ConfigError("packing / group_by_length: not supported for grpo (its micro-batches are groups "
                          "of sampled completions)")
    if t.per_device_train_batch_size % me.num_generations:
        raise ConfigError(f"per_device_train_batch_size: {t.per_device_train_batch_size} is not a multiple "
                          f"of num_generations {me.num_generations} (a micro-batch holds whole groups)")
    stream = RolloutStream(model, tokenizer, train.examples, funcs, reward_weights=me.reward_weights,
                           batch_size=t.per_device_train_batch_size, num_generations=me.num_generations,
                           max_completion_length=me.max_completion_length, temperature=me.temperature,
                           top_p=me.top_p, pad_id=contract.pad_id, eos_ids=stop_ids(contract, tokenizer),
                           max_seq_length=cfg.model.max_seq_length, seed=t.seed,
                           accumulation=t.gradient_accumulation_steps, num_iterations=me.num_iterations,
                           shuffle=shuffle)
    objective = GRPOObjective(reference, beta_of(cfg), me.epsilon, me.loss_type or "dapo", me.temperature,
                              tuple(reward_name(f) for f in funcs))
    return stream, None, objective
