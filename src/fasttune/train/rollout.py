"""GRPO's micro-batches: sample G completions per prompt with fasttune's decoding, score them, and lay them
out for the loss (the batch contract of docs/ARCHITECTURE.md plus the keys `GRPOObjective` reads).

Each micro-batch holds `batch_size / G` prompts, each repeated G times, left-padded for `generate` (our
Llama-family model decodes with its KV cache, CUDA-graphed on a GPU; batched sampling draws every row at
once). A completion ends at its first EOS (kept and trained) or at max_completion_length (truncated). The
training rows are prompt + completion, right-padded, with only the completion's tokens as targets:
    input_ids   p p p c c EOS pad        targets  -100 -100 c c EOS -100 -100   (shifted by one)
Sampling draws from a generator seeded by (seed, epoch, index), so a resumed run samples what it would have.
With num_iterations > 1 the stream hands the same accumulation window of batches out that many times,
carrying the per-token log-probabilities of the policy that sampled them (`old_logps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fasttune.data.packing import collate, shift_targets
from fasttune.data.position import EpochPosition, seeded_batches
from fasttune.models.base import IGNORE_INDEX
from fasttune.train.grpo import combine_rewards, group_advantages
from fasttune.train.logps import token_logps
from fasttune.train.rewards import RewardFunc, call_reward


class RolloutStream:
    """Endless GRPO micro-batches sampled from the current policy; the loop's `ResumableStream`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any],
                 reward_funcs: list[RewardFunc], *, reward_weights: Sequence[float] | None, batch_size: int,
                 num_generations: int, max_completion_length: int, temperature: float, top_p: float,
                 pad_id: int, eos_ids: Sequence[int], max_seq_length: int, seed: int, accumulation: int = 1,
                 num_iterations: int = 1, shuffle: bool = True) -> None:
        if batch_size % num_generations:
            raise ValueError(f"per_device_train_batch_size {batch_size} is not a multiple of num_generations "
                             f"{num_generations} (each micro-batch holds whole groups of completions)")
        self.model, self.tokenizer, self.prompts, self.funcs = model, tokenizer, list(prompts), reward_funcs
        self.weights = torch.tensor(reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
        self.per_batch, self.G = batch_size // num_generations, num_generations
        self.max_new, self.temperature, self.top_p = max_completion_length, temperature, top_p
        self.pad_id, self.eos_ids, self.max_len, self.seed = pad_id, list(eos_ids), max_seq_length, seed
        self.accumulation, self.num_iterations = accumulation, num_iterations
        self.shuffle = shuffle  # False: the prompts of every epoch in dataset order
        self.position = EpochPosition(self.plan)
        self._replay: list[dict[str, torch.Tensor]] = []
        self._served = 0

    def plan(self, epoch: int) -> list[list[int]]:
        return seeded_batches(len(self.prompts), self.per_batch, self.seed, epoch, self.shuffle)

    def __len__(self) -> int:
        return -(-len(self.prompts) // self.per_batch)

    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        window = self.accumulation
        replaying = len(self._replay) == window and self._served < window * self.num_iterations
        if self.num_iterations > 1 and replaying:
            batch = self._replay[self._served % window]
            self._served += 1
            return batch
        at = self.position
        seed = int(np.random.default_rng([self.seed, at.epoch, at.index]).integers(2**31))
        batch = self.sample([self.prompts[i] for i in at.take()], seed=seed)
        if self.num_iterations > 1:
            if len(self._replay) == window:
                self._replay, self._served = [], 0
            self._replay.append(batch)
            self._served += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position.load_state_dict(state)
        self._replay, self._served = [], 0

    @torch.no_grad()
    def sample(self, prompts: list[Any], seed: int) -> dict[str, torch.Tensor]:
        """Sample, score and lay out the completions of `prompts` (PromptExamples of data/pairs.py)."""
        from fasttune.infer.generate import generate

        G, model = self.G, self.model
        ids = [p.prompt_ids for p in prompts for _ in range(G)]
        width = max(len(x) for x in ids)
        left = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            left[r, width - len(x):], mask[r, width - len(x):] = torch.tensor(x), 1
        was_training = model.training
        model.eval()
        try:
            out = generate(model, left, mask, max_new_tokens=self.max_new, do_sample=True,
                           temperature=self.temperature, top_p=self.top_p, eos_token_ids=self.eos_ids,
                           pad_token_id=self.pad_id, seed=seed)
        finally:
            model.train(was_training)
        completions, truncated = [], []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            completions.append(row if end is None else row[:end + 1])
            truncated.append(end is None)
        batch = self._layout(ids, completions)
        batch["truncated"] = torch.tensor(truncated)
        per_func = self._score(prompts, completions)
        batch["rewards"] = per_func
        batch["reward_total"] = combine_rewards(per_func, self.weights)
        batch["advantages"] = group_advantages(batch["reward_total"], G)
        if self.num_iterations > 1:  # the sampling policy's log-probabilities, for the ratio of later passes
            device = next(model.parameters()).device
            keys = ("input_ids", "targets", "position_ids", "attention_mask")
            inputs = {k: batch[k].to(device) for k in keys}
            batch["old_logps"] = token_logps(model, inputs, self.temperature).cpu()
        return batch

    def _layout(self, prompt_ids: list[list[int]],
                completions: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = [p + c for p, c in zip(prompt_ids, completions)]
        targets = [shift_targets([IGNORE_INDEX] * len(p) + c) for p, c in zip(prompt_ids, completions)]
        longest = max(len(x) for x in ids)
        return collate([[i] for i in range(len(ids))], ids, targets, self.pad_id, max(longest, self.max_len))

    def _score(self, prompts: list[Any], completions: list[list[int]]) -> torch.Tensor:
        """(n, F) rewards of every function; the dataset's other columns go to them as keyword lists."""
        G = self.G
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rows = [p.row for p in prompts for _ in range(G)]
        data = [p.row_data for p in prompts for _ in range(G)]
        conversational = isinstance(data[0]["prompt"], list)
        columns = {k: [d.get(k) for d in data] for k in data[0] if k != "prompt"}
        columns.update(prompts=[d["prompt"] for d in data], completion_ids=completions,
                       completions=[[{"role": "assistant", "content": t}] for t in texts] if conversational
                       else texts)
        scores = [call_reward(f, rows, columns) for f in self.funcs]
        return torch.tensor(scores, dtype=torch.float32).T.reshape(len(rows), len(self.funcs))
