"""fasttune: fine-tune decoder-only language models with LoRA, from Python, YAML or the command line.

    import fasttune
    result = fasttune.train(fasttune.RunConfig())         # the default job; see README.md

The notebook names (FastLanguageModel, SFTTrainer, DPOTrainer, GRPOTrainer, TrainingArguments, ...)
are here too. Everything is imported on first use, so `import fasttune` loads neither torch nor
transformers and changes nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "RunConfig": "fasttune.config",
    "ModelConfig": "fasttune.config",
    "LoraConfig": "fasttune.config",
    "DataConfig": "fasttune.config",
    "TrainConfig": "fasttune.config",
    "ConfigError": "fasttune.config",
    "load_yaml": "fasttune.config",
    "train": "fasttune.api",
    "RunResult": "fasttune.api",
    "DataError": "fasttune.data.errors",
    "generate": "fasttune.infer.generate",
    "FastLanguageModel": "fasttune.notebook",
    "SFTTrainer": "fasttune.notebook",
    "SFTConfig": "fasttune.notebook",
    "TrainingArguments": "fasttune.notebook",
    "DPOTrainer": "fasttune.notebook",
    "DPOConfig": "fasttune.notebook",
    "ORPOTrainer": "fasttune.notebook",
    "ORPOConfig": "fasttune.notebook",
    "KTOTrainer": "fasttune.notebook",
    "KTOConfig": "fasttune.notebook",
    "GRPOTrainer": "fasttune.notebook",
    "GRPOConfig": "fasttune.notebook",
    "is_bfloat16_supported": "fasttune.notebook",
    "train_on_responses_only": "fasttune.notebook",
    "get_chat_template": "fasttune.notebook",
    "standardize_sharegpt": "fasttune.notebook",
    "standardize_data_formats": "fasttune.notebook",
    "unsloth_train": "fasttune.notebook",
    # transformers' own classes that notebooks import on the same line as TrainingArguments
    "DataCollatorForSeq2Seq": "transformers",
    "DataCollatorForLanguageModeling": "transformers",
    "TextStreamer": "transformers",
    "TextIteratorStreamer": "transformers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fasttune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
