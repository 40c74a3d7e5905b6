"""The notebook vocabulary (Unsloth / TRL / transformers names) over fasttune: a notebook written for those
libraries runs after changing only its import lines.

    from fasttune import FastLanguageModel, SFTTrainer, TrainingArguments, is_bfloat16_supported
    from fasttune import train_on_responses_only        # Unsloth's unsloth.chat_templates functions
    from fasttune import get_chat_template, standardize_sharegpt   # and standardize_data_formats
    from fasttune import DPOTrainer, DPOConfig, GRPOTrainer, GRPOConfig   # and ORPO..., KTO...
"""

from fasttune.notebook.arguments import SFTConfig, TrainingArguments
from fasttune.notebook.chat_templates import get_chat_template, standardize_data_formats, standardize_sharegpt
from fasttune.notebook.method_args import DPOConfig, GRPOConfig, KTOConfig, ORPOConfig
from fasttune.notebook.method_trainer import DPOTrainer, GRPOTrainer, KTOTrainer, ORPOTrainer
from fasttune.notebook.model import FastLanguageModel, NotebookModel, is_bfloat16_supported
from fasttune.notebook.responses import train_on_responses_only
from fasttune.notebook.trainer import SFTTrainer, TrainOutput, unsloth_train

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "KTOConfig",
    "KTOTrainer",
    "ORPOConfig",
    "ORPOTrainer",
    "FastLanguageModel",
    "NotebookModel",
    "SFTConfig",
    "SFTTrainer",
    "TrainOutput",
    "TrainingArguments",
    "get_chat_template",
    "is_bfloat16_supported",
    "standardize_data_formats",
    "standardize_sharegpt",
    "train_on_responses_only",
    "unsloth_train",
]
