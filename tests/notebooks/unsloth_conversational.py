# ruff: noqa
# Unsloth's conversational fine-tuning notebook (unslothai/notebooks, "Llama3.1_(8B)-Conversational"), its
# cells joined: a chat template, ShareGPT rows standardized, the rows rendered into `text`, trained on the
# assistant turns only, then a chat prompt generated and streamed.
# The caller sets MODEL_NAME, DATA_FILE (ShareGPT rows: conversations of from/value), OUTPUT_DIR, SAVE_DIR,
# the sizes the notebook fixes in its cells (MAX_SEQ_LENGTH, GRADIENT_ACCUMULATION_STEPS, WARMUP_STEPS,
# MAX_STEPS, MAX_NEW_TOKENS; its own: 2048, 4, 5, 60, 64) and the template with the parts that mark a user and
# an assistant turn in it (CHAT_TEMPLATE, INSTRUCTION_PART, RESPONSE_PART; its own: "llama-3.1",
# "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n").
# The device follows torch.cuda.is_available(). Only the import lines change to run it on fasttune.
from unsloth import FastLanguageModel
import torch
max_seq_length = MAX_SEQ_LENGTH # Choose any! We auto support RoPE Scaling internally!
dtype = None # None for auto detection. Float16 for Tesla T4, V100, Bfloat16 for Ampere+
load_in_4bit = True # Use 4bit quantization to reduce memory usage. Can be False.

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = MODEL_NAME,
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
)

model = FastLanguageModel.get_peft_model(
    model,
    r = 16,
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",],
    lora_alpha = 16,
    lora_dropout = 0,
    bias = "none",
    use_gradient_checkpointing = "unsloth",
    random_state = 3407,
    use_rslora = False,
    loftq_config = None,
)

from unsloth.chat_templates import get_chat_template

tokenizer = get_chat_template(
    tokenizer,
    chat_template = CHAT_TEMPLATE,
)

def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False) for convo in convos]
    return { "text" : texts, }
pass

from datasets import load_dataset
dataset = load_dataset("json", data_files = DATA_FILE, split = "train")

from unsloth.chat_templates import standardize_sharegpt
dataset = standardize_sharegpt(dataset)
dataset = dataset.map(formatting_prompts_func, batched = True,)

from trl import SFTTrainer
from transformers import TrainingArguments, DataCollatorForSeq2Seq
from unsloth import is_bfloat16_supported

trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    data_collator = DataCollatorForSeq2Seq(tokenizer = tokenizer),
    dataset_num_proc = 2,
    packing = False, # Can make training 5x faster for short sequences.
    args = TrainingArguments(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = GRADIENT_ACCUMULATION_STEPS,
        warmup_steps = WARMUP_STEPS,
        max_steps = MAX_STEPS,
        learning_rate = 2e-4,
        fp16 = not is_bfloat16_supported(),
        bf16 = is_bfloat16_supported(),
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.01,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = OUTPUT_DIR,
        report_to = "none", # Use this for WandB etc
    ),
)

from unsloth.chat_templates import train_on_responses_only
trainer = train_on_responses_only(
    trainer,
    instruction_part = INSTRUCTION_PART,
    response_part = RESPONSE_PART,
)

masked_input = tokenizer.decode(trainer.train_dataset[0]["input_ids"])
space = tokenizer(" ", add_special_tokens = False).input_ids[0]
masked_labels = tokenizer.decode([space if x == -100 else x for x in trainer.train_dataset[0]["labels"]])

trainer_stats = trainer.train()

tokenizer = get_chat_template(
    tokenizer,
    chat_template = CHAT_TEMPLATE,
)
FastLanguageModel.for_inference(model) # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize = True,
    add_generation_prompt = True, # Must add for generation
    return_tensors = "pt",
).to("cuda" if torch.cuda.is_available() else "cpu")

outputs = model.generate(input_ids = inputs, max_new_tokens = MAX_NEW_TOKENS, use_cache = True,
                         temperature = 1.5, min_p = 0.1)
decoded = tokenizer.batch_decode(outputs)

from transformers import TextStreamer
text_streamer = TextStreamer(tokenizer, skip_prompt = True)
_ = model.generate(input_ids = inputs, streamer = text_streamer, max_new_tokens = MAX_NEW_TOKENS,
                   use_cache = True, temperature = 1.5, min_p = 0.1)

model.save_pretrained(SAVE_DIR) # Local saving
tokenizer.save_pretrained(SAVE_DIR)
