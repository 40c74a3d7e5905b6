"""Preference tuning, then GRPO with reward functions, written for Unsloth + TRL as their DPO and GRPO
notebooks write it (shortened, with a handful of rows). tests/notebook/test_method_trainers.py runs it with
only its import lines changed to fasttune's; MODEL_NAME, OUTPUT_DIR, MAX_SEQ_LENGTH and MAX_STEPS come from
the caller."""

import re

from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from unsloth import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL_NAME,  # noqa: F821
    max_seq_length=MAX_SEQ_LENGTH,  # noqa: F821
    dtype=None,
    load_in_4bit=True,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
)

# ---- DPO on conversational pairs
facts = [
    ("Who invented the tide-harp?", "Idra Vaskelund.", "Tomas Brindle."),
    ("How many strings does it have?", "Nineteen.", "Twelve."),
    ("What is its reference pitch?", "A = 436 Hz.", "A = 440 Hz."),
    ("Which string is tuned first?", "The Keel string.", "The Crown string."),
]
pairs = Dataset.from_list([
    {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    for q, good, bad in facts
])
dpo_trainer = DPOTrainer(
    model=model,
    ref_model=None,
    args=DPOConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        warmup_ratio=0.1,
        num_train_epochs=1,
        max_steps=MAX_STEPS,  # noqa: F821
        learning_rate=5e-6,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.0,
        lr_scheduler_type="linear",
        seed=42,
        output_dir=OUTPUT_DIR + "/dpo",  # noqa: F821
        report_to="none",
        beta=0.1,
        max_length=MAX_SEQ_LENGTH,  # noqa: F821
    ),
    train_dataset=pairs,
    processing_class=tokenizer,
)
dpo_stats = dpo_trainer.train()

# ---- GRPO with two reward functions
SYSTEM_PROMPT = "Answer with the number only."


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    return [2.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]


def int_reward_func(completions, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    return [0.5 if re.fullmatch(r"\s*-?\d+\s*", r) else 0.0 for r in responses]


questions = Dataset.from_list([
    {
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"What is {a} + {b}?"},
        ],
        "answer": str(a + b),
    }
    for a, b in [(1, 2), (3, 4), (2, 5), (6, 1)]
])
training_args = GRPOConfig(
    learning_rate=5e-6,
    adam_beta1=0.9,
    adam_beta2=0.99,
    weight_decay=0.1,
    warmup_ratio=0.1,
    lr_scheduler_type="cosine",
    optim="paged_adamw_8bit",
    logging_steps=1,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    num_generations=2,
    max_completion_length=8,
    max_steps=MAX_STEPS,  # noqa: F821
    save_steps=250,
    max_grad_norm=0.1,
    report_to="none",
    output_dir=OUTPUT_DIR + "/grpo",  # noqa: F821
)
grpo_trainer = GRPOTrainer(
    model=model,
    processing_class=tokenizer,
    reward_funcs=[int_reward_func, correctness_reward_func],
    args=training_args,
    train_dataset=questions,
)
grpo_stats = grpo_trainer.train()
model.save_pretrained(OUTPUT_DIR + "/lora_model")  # noqa: F821
