"""GRPO's reward functions and advantages: the built-ins, errors that name the function and the row, and the
group normalisation's edge cases (no spread, missing rewards)."""

from __future__ import annotations

import math

import pytest
import torch

from fasttune.config import ConfigError
from fasttune.train.grpo import combine_rewards, group_advantages
from fasttune.train.rewards import RewardError, call_reward, exact_match, resolve_reward


def test_builtins():
    assert exact_match(completions=[" 7\n", "7.", [{"role": "assistant", "content": "7"}]],
                       answer=[7, "7", "7"]) == [1.0, 0.0, 1.0]
    fmt = resolve_reward(r"regex:<answer>\d+</answer>")
    texts = ["<answer>12</answer>", "<answer>x</answer>", "the <answer>1</answer>"]
    assert fmt(completions=texts) == [1.0, 0.0, 0.0]
    assert resolve_reward("exact_match") is exact_match
    assert resolve_reward("fasttune.train.rewards:exact_match") is exact_match


@pytest.mark.parametrize("spec, match", [("regex:(", "not a valid regular expression"),
                                         ("no_such_module_xyz:f", "cannot import it"),
                                         ("justaname", "expected module:function")])
def test_bad_reward_names_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_reward(spec)


def test_errors_name_the_function_and_row():
    def strict(completions, answer, **_):
        return [1.0 / (int(a) - 4) for a in answer]

    columns = {"completions": ["a", "b", "c"], "answer": ["5", "4", "6"]}
    with pytest.raises(RewardError, match=r"reward function 'strict' raised ZeroDivisionError on row 12"):
        call_reward(strict, [11, 12, 13], columns)

    def wrong_length(completions, **_):
        return [1.0]

    with pytest.raises(RewardError, match="'wrong_length' returned 1 values for 3 completions"):
        call_reward(wrong_length, [1, 2, 3], columns)

    def text(completions, **_):
        return [0.0, "good", 1.0]

    with pytest.raises(RewardError, match="'text' returned 'good' for row 2: expected a number or None"):
        call_reward(text, [1, 2, 3], columns)
    values = call_reward(lambda completions, **_: [None, 1, 0.5], [1, 2, 3], columns)
    assert math.isnan(values[0]) and values[1:] == [1.0, 0.5]


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel-corrected, as TRL's nanstd
    torch.testing.assert_close(adv[:4], (rewards[:4] - 0.5) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # no spread in the group: no signal
    per_func = torch.tensor([[1.0, math.nan], [math.nan, math.nan]])
    assert combine_rewards(per_func, torch.tensor([1.0, 0.5])).tolist() == [1.0, 0.0]
    nan_group = group_advantages(torch.tensor([math.nan, 1.0]), 2)
    assert torch.equal(nan_group, torch.zeros(2))  # one scored completion: std undefined, advantage 0
