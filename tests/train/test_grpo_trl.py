"""GRPO against TRL for fixed sampled completions (TRL's `rollout_func` hands them to its trainer): the
rewards and group-normalised advantages, the clipped loss with the KL term, and every LoRA gradient."""

from __future__ import annotations

import pytest
import torch
from pref_twins import assert_same_grads, copy_adapter, peft_config, smollm2_tokenizer, twins

from fasttune.data.pairs import PromptExample
from fasttune.lora.reference import Reference
from fasttune.train.grpo import GRPOObjective, combine_rewards, group_advantages
from fasttune.train.objective import add_metrics, metric_means
from fasttune.train.rollout import RolloutStream

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 + 5?", "answer": "8"},
        {"prompt": "What is 1 + 6?", "answer": "7"}]
G = 4


def exact(completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def short(completions, **_):
    return [None if len(c) > 30 else -len(c) / 10 for c in completions]


def _completions(tok):
    """Fixed completions per prompt: right answers (with EOS), wrong ones, and random token runs cut short."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, row in enumerate(ROWS):
        for k in range(G):
            if k == 0 or (k == 1 and i == 0):
                ids = tok(" " + row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            elif k == 2:
                ids = tok(" 11", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            else:
                ids = torch.randint(10, 5000, (3 + i + k,), generator=g).tolist()
            out.append(ids)
    return out


@pytest.mark.parametrize("beta, loss_type", [(0.04, "dapo"), (0.0, "grpo")])
def test_grpo_advantages_loss_and_lora_grads_match_trl(tmp_path, beta, loss_type):
    tok = smollm2_tokenizer()
    ours, hf = twins(len(tok))
    prompt_ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in ROWS for _ in range(G)]
    completions = _completions(tok)

    def rollout(prompts, trainer):  # TRL's hook for custom generation: our fixed completions
        return {"prompt_ids": prompt_ids, "completion_ids": completions,
                "logprobs": [[0.0] * len(c) for c in completions]}

    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, beta=beta,
                          loss_type=loss_type, per_device_train_batch_size=len(ROWS) * G, num_generations=G,
                          max_completion_length=16, reward_weights=[1.0, 0.5])
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=[exact, short], args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_list(ROWS), peft_config=peft_config(),
                              rollout_func=rollout)
    copy_adapter(ours, trainer.model)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what its training_step sets
    scored = trainer._generate_and_score_completions([r for r in ROWS for _ in range(G)])
    want = trainer._compute_loss(trainer.model, scored)
    want.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    prompts = [PromptExample(tok(r["prompt"], add_special_tokens=False)["input_ids"], r, i + 1)
               for i, r in enumerate(ROWS)]
    stream = RolloutStream(ours, tok, prompts, [exact, short], reward_weights=[1.0, 0.5],
                           batch_size=len(ROWS) * G, num_generations=G, max_completion_length=16,
                           temperature=1.0, top_p=1.0, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                           max_seq_length=64, seed=0)
    batch = stream._layout(prompt_ids, completions)
    batch["rewards"] = stream._score(prompts, completions)
    batch["reward_total"] = combine_rewards(batch["rewards"], torch.tensor([1.0, 0.5]))
    batch["advantages"] = group_advantages(batch["reward_total"], G)
    batch["truncated"] = torch.tensor([c[-1] != tok.eos_token_id for c in completions])
    torch.testing.assert_close(batch["advantages"], scored["advantages"], rtol=1e-5, atol=1e-6)
    assert batch["advantages"].abs().sum() > 0

    params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    objective = GRPOObjective(Reference(params), beta=beta, loss_type=loss_type,
                              reward_names=("exact", "short"))
    ours.train()
    loss_sum, stats = objective(ours, batch)
    n = objective.units(batch)
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-5, atol=1e-6)
    sums: dict = {}
    add_metrics(sums, stats, n)
    means = metric_means(sums)
    for key in ["reward", "rewards/exact/mean", "rewards/short/mean", "completions/mean_length"] + (
            ["kl"] if beta else []):
        assert means[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    assert_same_grads(ours, trainer.model)
