"""The run directory's layout and how a path the user names is located."""

from __future__ import annotations

import pytest

from fasttune.run_dir import RunDir, RunNotFound, holds_adapter, locate


def make_run(root, contract_in_adapter=True):
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_config.json").write_text("{}")
    (root / "run.yaml").write_text("{}")
    (root / "adapter" if contract_in_adapter else root).joinpath("prompt_contract.json").write_text("{}")
    return root


def test_layout_names():
    run = RunDir("runs/x")
    assert [p.as_posix() for p in (run.run_yaml, run.adapter, run.contract, run.metrics, run.loss_plot,
                                   run.answers, run.checkpoints, run.exports)] == [
        "runs/x/run.yaml", "runs/x/adapter", "runs/x/adapter/prompt_contract.json", "runs/x/metrics.jsonl",
        "runs/x/loss.png", "runs/x/answers.json", "runs/x/checkpoints", "runs/x/exports"]


def test_locate_a_run_its_adapter_and_a_bare_adapter(tmp_path):
    run = make_run(tmp_path / "run")
    for path in (run, run / "adapter"):
        found = locate(path)
        assert found.adapter_dir == run / "adapter" and found.run == RunDir(run)
        assert found.contract_path() == run / "adapter" / "prompt_contract.json"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    found = locate(bare)
    assert found.adapter_dir == bare and found.run is None and found.contract_path() is None
    assert holds_adapter(run) and holds_adapter(bare) and not holds_adapter(tmp_path)


def test_contract_beside_run_yaml_is_found(tmp_path):
    run = make_run(tmp_path / "run", contract_in_adapter=False)
    assert locate(run).contract_path() == run / "prompt_contract.json"


def test_what_is_not_a_run_says_why(tmp_path):
    with pytest.raises(RunNotFound, match="no such run"):
        locate(tmp_path / "missing")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.yaml").write_text("{}")
    with pytest.raises(RunNotFound, match="has training finished"):
        locate(unfinished)
    with pytest.raises(RunNotFound, match="not a run directory"):
        locate(tmp_path)
