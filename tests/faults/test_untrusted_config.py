"""Nothing saved turns on code execution or leaks a token; inputs once accepted silently are errors."""

from __future__ import annotations

import pytest
import yaml

from fasttune.cli import main
from fasttune.config import ConfigError, DataConfig, RunConfig, load_yaml
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows


def test_a_yaml_file_cannot_turn_on_trust_remote_code(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model:\n  trust_remote_code: true\n")
    with pytest.raises(ConfigError, match="a file cannot turn it on"):
        load_yaml(cfg)
    assert main(["data", "preview", "--config", str(cfg)]) == 2
    assert "trust_remote_code: a file cannot turn it on" in capsys.readouterr().err
    assert load_yaml(cfg, allow_remote_code=True).model.trust_remote_code  # the command line said so


def test_run_yaml_never_holds_a_token_or_trust_remote_code(tmp_path):
    cfg = RunConfig()
    cfg.model.token = "hf_secret_token_value"
    cfg.model.trust_remote_code = True
    cfg.save(tmp_path / "run.yaml")
    text = (tmp_path / "run.yaml").read_text()
    assert "hf_secret_token_value" not in text
    assert "# a Hugging Face token was used" in text and "# trust_remote_code was on" in text
    saved = yaml.safe_load(text)
    assert saved["model"]["token"] is None and saved["model"]["trust_remote_code"] is False
    assert not load_yaml(tmp_path / "run.yaml").model.trust_remote_code


def test_a_run_directory_does_not_make_generate_run_model_code(tmp_path, capsys):
    """A run whose base model folder carries Python code: generate neither imports it nor loads at all
    without --trust_remote_code, and with it names the code first."""
    model = tmp_path / "model"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}')
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.yaml").write_text(yaml.safe_dump({"model": {"model_name": str(model),
                                                            "trust_remote_code": True}}))
    assert main(["generate", "--run", str(run), "hi"]) == 2
    assert "a file cannot turn it on" in capsys.readouterr().err
    (run / "run.yaml").write_text(yaml.safe_dump({"model": {"model_name": str(model)}}))
    assert main(["generate", "--run", str(run), "hi"]) == 2
    capsys.readouterr()
    assert not marker.exists()
    with pytest.raises(AttributeError):  # asked for: evil.py is named, then imported (it defines no class)
        main(["generate", "--run", str(run), "--trust_remote_code", "hi"])
    assert marker.exists()
    err = capsys.readouterr().err
    assert "warning: trust_remote_code is on" in err and "evil.py" in err and "evil.EvilConfig" in err


@pytest.mark.parametrize("text, field, value", [
    ("data:\n  packing: off\n", "packing", "off"),
    ("train:\n  gradient_checkpointing: on\n", "gradient_checkpointing", "on"),
    ("model:\n  load_in_4bit: no\n", "load_in_4bit", False),
    ("data:\n  train_on_inputs: yes\n", "train_on_inputs", True),
])
def test_yaml_words_on_off_yes_no_keep_their_meaning(tmp_path, text, field, value):
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_yaml(tmp_path / "c.yaml")
    section = next(s for s in (cfg.model, cfg.data, cfg.train) if hasattr(s, field))
    assert getattr(section, field) == value


@pytest.mark.parametrize("argv, message", [
    (["--lora_alpha", "-16"], "lora_alpha must be positive"),
    (["--lora_alpha", "0"], "lora_alpha must be positive"),
    (["--learning_rate", "-1e-4"], "learning_rate must be positive"),
    (["--model_name", "smollm2-135M"], "did you mean 'smollm2-135m'"),
    (["--model_name", "smolm2-135m"], "did you mean 'smollm2-135m'"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
])
def test_values_that_were_accepted_silently_are_errors(argv, message, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_csv_with_an_unterminated_quote_names_the_row(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text('instruction,output\nfirst,one\nsecond,"two\nthird,three\nfourth,four\n')
    rows = load_rows(str(data), DataConfig(dataset=str(data), on_bad_row="skip"))
    assert [r["instruction"] for _, r in rows.rows] == ["first"]
    with pytest.raises(DataError, match=r"row 3.*never closed"):
        load_rows(str(data), DataConfig(dataset=str(data)))
