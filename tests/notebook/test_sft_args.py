"""Every field of transformers' TrainingArguments and TRL's SFTConfig is either read by fasttune, refused by
name where ignoring it would change what is trained, or ignored with a warning where it changes nothing
trained; none falls through unnamed."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from fasttune.notebook import SFTConfig, SFTTrainer
from fasttune.notebook.arguments import IGNORED, MAPPED, UNSUPPORTED, to_train_config

trl = pytest.importorskip("trl")


@pytest.mark.parametrize("cls", [transformers.TrainingArguments, trl.SFTConfig])
def test_every_field_is_classified(cls):
    known = set(MAPPED) | set(UNSUPPORTED) | set(IGNORED)
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in known)
    assert not missing, f"{cls.__name__} fields fasttune does not classify: {missing}"


def test_classes_do_not_overlap():
    mapped, refused = set(MAPPED), set(UNSUPPORTED)
    assert not (mapped & refused) and not (mapped & IGNORED) and not (refused & IGNORED)


def test_trls_own_config_is_read_and_its_refusals_name_the_field(loaded, tmp_path):
    model, tok = loaded
    args = trl.SFTConfig(output_dir=str(tmp_path), max_length=40, bf16=False, report_to="none",
                         dataset_text_field="body", eos_token=tok.eos_token)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=[{"body": "w " * 100}], args=args)
    assert len(trainer.train_dataset[0]["input_ids"]) == 40 and trainer.dataset_text_field == "body"
    with pytest.raises(ValueError, match="shuffle_dataset"):
        to_train_config(trl.SFTConfig(output_dir=str(tmp_path), bf16=False, shuffle_dataset=True),
                        device_type="cpu")


def test_sft_config_has_trls_defaults():
    ours, theirs = SFTConfig(), trl.SFTConfig(output_dir="x", bf16=False)
    for name in ("learning_rate", "logging_steps", "dataset_text_field", "max_length", "packing",
                 "assistant_only_loss", "completion_only_loss", "gradient_checkpointing"):
        assert getattr(ours, name) == getattr(theirs, name), name
