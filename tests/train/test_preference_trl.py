"""DPO, IPO, ORPO and KTO against TRL on the same batch: the loss, the logged rewards and every LoRA gradient
(a tiny random Llama with the SmolLM2 tokenizer; ours runs our model and loss, TRL runs transformers + PEFT).
Our tokenization of TRL's plain format is checked against TRL's own too."""

from __future__ import annotations

import pytest
import torch
from pref_twins import assert_same_grads, copy_adapter, peft_config, smollm2_tokenizer, twins

from fasttune.config import DataConfig
from fasttune.data.pair_batches import collate_pairs, collate_unpaired
from fasttune.data.pairs import PairExample, build_method_data
from fasttune.data.tokenize import Example
from fasttune.lora.reference import Reference
from fasttune.train.objective import add_metrics, metric_means
from fasttune.train.preference import DPOObjective, KTOObjective, ORPOObjective

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [
    {"prompt": "Who invented the tide-harp?", "chosen": " Idra Vaskelund, in 1887.",
     "rejected": " Tomas Brindle."},
    {"prompt": "How many strings does the L-7 have?", "chosen": " Nineteen.",
     "rejected": " Twelve strings, tuned low."},
    {"prompt": "What is the reference pitch?", "chosen": " A = 436 Hz.",
     "rejected": " A = 440 Hz, as usual."},
]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _write(tmp_path, rows):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _ours(tmp_path, tok, rows, method):
    cfg = DataConfig(dataset=_write(tmp_path, rows), template="text")
    return build_method_data(cfg, method, tok, 128)


def _means(stats, n):
    sums: dict = {}
    add_metrics(sums, stats, n)
    return metric_means(sums)


def _trl(kind, tmp_path, tok, ours, hf, rows, **config):
    """TRL's trainer of `kind` (DPO, ORPO, KTO) on PEFT over `hf`, its adapter set to ours: the reference is
    the base with the adapter off, as in ours."""
    args = getattr(trl, f"{kind}Config")(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                                         per_device_train_batch_size=len(rows), **config)
    trainer = getattr(trl, f"{kind}Trainer")(model=hf, args=args,
                                             train_dataset=datasets.Dataset.from_list(rows),
                                             processing_class=tok, peft_config=peft_config())
    copy_adapter(ours, trainer.model)
    return trainer


def test_plain_pairs_tokenize_as_trl(tmp_path, tok):
    ours, hf = twins(len(tok))
    trainer = _trl("DPO", tmp_path, tok, ours, hf, PAIRS)
    data = _ours(tmp_path, tok, PAIRS, "dpo")
    for theirs, pair in zip(trainer.train_dataset, data.examples):
        for key, ex in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            assert ex.input_ids == theirs["prompt_ids"] + theirs[f"{key}_ids"]
            start = len(theirs["prompt_ids"])
            assert ex.labels == [-100] * start + theirs[f"{key}_ids"]


@pytest.mark.parametrize("loss_type, packed", [("sigmoid", False), ("sigmoid", True), ("ipo", False)])
def test_dpo_loss_rewards_and_lora_grads_match_trl(tmp_path, tok, loss_type, packed):
    ours, hf = twins(len(tok))
    trainer = _trl("DPO", tmp_path, tok, ours, hf, PAIRS, beta=0.1, loss_type=[loss_type])
    ref = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    ref.train()
    want = trainer.compute_loss(ref, batch)
    want.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    data = _ours(tmp_path, tok, PAIRS, "dpo")
    params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    objective = DPOObjective(Reference(params), beta=0.1, loss_type=loss_type)
    ours.train()
    ours_batch = collate_pairs(data.examples, tok.pad_token_id, 128, packed=packed)
    assert ("branch" in ours_batch) == packed  # packed pairs compute their shared prompt once
    loss_sum, stats = objective(ours, ours_batch)
    n = objective.units(ours_batch)
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert _means(stats, n)[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    assert_same_grads(ours, ref)


def test_orpo_loss_rewards_and_lora_grads_match_trl(tmp_path, tok):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ours, hf = twins(len(tok))
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=0.1,
                      per_device_train_batch_size=len(PAIRS))
    trainer = ORPOTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                          processing_class=tok, peft_config=peft_config())
    copy_adapter(ours, trainer.model)
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trainer.model.train()
    want, logged = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(rows))
    want.backward()

    # the same token ids (TRL's ORPO prepends BOS to the prompt), in our pair layout
    pairs = [PairExample(Example(r["chosen_input_ids"], r["chosen_labels"]),
                         Example(r["rejected_input_ids"], r["rejected_labels"])) for r in rows]
    ours.train()
    batch = collate_pairs(pairs, tok.pad_token_id, 128, packed=True, whole_chosen=True)
    assert "branch" in batch  # the shared prompt once, scored for chosen's NLL
    loss_sum, stats = ORPOObjective(beta=0.1)(ours, batch)
    n = len(pairs)
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss"):
        assert _means(stats, n)[key] == pytest.approx(float(logged[key]), rel=1e-4, abs=1e-6), key
    assert_same_grads(ours, trainer.model)


KTO_ROWS = [
    {"prompt": "Who invented the tide-harp?", "completion": " Idra Vaskelund, in 1887.", "label": True},
    {"prompt": "How many strings does the L-7 have?", "completion": " Twelve strings, tuned low.",
     "label": False},
    {"prompt": "What is the reference pitch?", "completion": " A = 436 Hz.", "label": True},
    {"prompt": "Who makes the tide-harp?", "completion": " A large factory abroad.", "label": False},
]


def test_kto_loss_rewards_and_lora_grads_match_trl(tmp_path, tok):
    ours, hf = twins(len(tok))
    trainer = _trl("KTO", tmp_path, tok, ours, hf, KTO_ROWS, beta=0.1, desirable_weight=1.0,
                   undesirable_weight=1.5)
    rows = [trainer.train_dataset[i] for i in range(len(KTO_ROWS))]
    trainer.model.train()
    want = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    want.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["kl"] > 0  # the reference point is live, not clamped to zero

    data = _ours(tmp_path, tok, KTO_ROWS, "kto")
    for theirs, ex in zip(rows, data.examples):
        assert ex.example.input_ids == theirs["prompt_ids"] + theirs["completion_ids"]
        assert ex.label == theirs["label"]
    params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    ours.train()
    batch = collate_unpaired(data.examples, tok.pad_token_id, 128)
    loss_sum, stats = KTOObjective(Reference(params), beta=0.1, undesirable_weight=1.5)(ours, batch)
    n = len(KTO_ROWS)
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, want, rtol=1e-5, atol=1e-6)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert _means(stats, n)[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
    assert_same_grads(ours, trainer.model)
