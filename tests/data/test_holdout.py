"""An eval split held out of the training data (eval_dataset split:F, val_set_size F): disjoint from the
trained rows, the same rows every time, independent of max_rows, and malformed specs named."""

from __future__ import annotations

import dataclasses

import pytest

from fasttune.api import eval_config
from fasttune.config import ConfigError, DataConfig, RunConfig, apply_overrides
from fasttune.data.formats import load_rows
from fasttune.data.holdout import held_out
from fasttune.data.tokenize import build_dataset, eval_source

ROWS = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(40)]


def test_held_out_rows_are_a_fixed_share():
    numbers = list(range(1, 41))
    evals = held_out(numbers, 0.1)
    assert len(evals) == 4 and evals == held_out(list(reversed(numbers)), 0.1)  # order does not matter
    assert len(held_out(list(range(1, 5)), 0.05)) == 1  # at least one row
    with pytest.raises(ConfigError, match="leaves no row to train on"):
        held_out([1, 2], 0.9)


@pytest.mark.parametrize("spec", [dict(eval_dataset="split:0.1"), dict(val_set_size=0.1),
                                  dict(val_set_size=0.1, eval_dataset="split:0.1")])
def test_train_and_eval_parts_partition_the_rows(write_jsonl, spec):
    cfg = DataConfig(dataset=str(write_jsonl(ROWS)), **spec)
    train = load_rows(cfg.dataset, cfg)
    source = eval_source(cfg)
    assert source == "split:0.1"
    evals = load_rows(source, cfg, "eval")
    train_numbers, eval_numbers = {n for n, _ in train.rows}, {n for n, _ in evals.rows}
    assert len(eval_numbers) == 4 and not train_numbers & eval_numbers
    assert train_numbers | eval_numbers == set(range(1, 41))
    capped = load_rows(cfg.dataset, dataclasses.replace(cfg, max_rows=5))
    assert [n for n, _ in capped.rows] == [n for n, _ in train.rows][:5]  # max_rows cuts the train part only
    capped_eval = load_rows(source, dataclasses.replace(cfg, max_rows=5), "eval")
    assert {n for n, _ in capped_eval.rows} == eval_numbers


def test_the_run_evaluates_on_the_held_out_rows(write_jsonl, smol_tok):
    cfg = apply_overrides(RunConfig(), {"dataset": str(write_jsonl(ROWS)), "val_set_size": 0.25}, "test")
    eval_cfg = eval_config(cfg.data)
    assert eval_cfg.eval_dataset == "split:0.25"
    train = build_dataset(cfg.data, smol_tok, 128, "train")
    evals = build_dataset(eval_cfg, smol_tok, 128, "eval", contract=train.contract)
    assert (len(train.examples), len(evals.examples)) == (30, 10)
    assert not {e.row for e in train.examples} & {e.row for e in evals.examples}


@pytest.mark.parametrize("values,match", [
    ({"eval_dataset": "split:1.5"}, r"eval_dataset 'split:1\.5': the fraction must be between 0 and 1"),
    ({"eval_dataset": "split:some"}, r"expected split:FRACTION"),
    ({"val_set_size": 2}, r"val_set_size 2\.0: must be 0 \(none\) or a fraction"),
    ({"val_set_size": 0.1, "eval_dataset": "held.jsonl"}, r"both name an eval set"),
    ({"val_set_size": 0.1, "eval_dataset": "split:0.2"}, r"disagree"),
])
def test_bad_specs_are_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(RunConfig(), values, "test")
