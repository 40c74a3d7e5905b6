"""bench_train on the CPU: the table groups rows by shape and batch and takes ratios within a group; the
GPT-2 / OPT model directories build, and fasttune's generic path and transformers + PEFT train them from
the same weights to the same loss; Llama-only stacks are skipped on them with a note."""

import argparse
import math
from pathlib import Path

import bench_train as bt
import pytest
import torch


def row(stack, tps, shape="llama-3.1-8b", mode="bf16", batch=8, seq=2048, variant="peer", **kw):
    return dict(stack=stack, shape=shape, mode=mode, batch=batch, seq=seq, variant=variant, tokens_per_s=tps,
                peak_gib=10.0, **kw)


def test_table_groups_by_shape_and_batch_and_takes_ratios_within_the_group(capsys):
    rows = [
        row("fasttune", 12000, variant="offload", est_gib=18.0), row("unsloth", 10000), row("hf", 6000),
        row("fasttune", 9000, mode="qlora", variant="offload"), row("unsloth", 10000, mode="qlora"),
        row("fasttune", 8000, batch=2), row("unsloth", 4000, batch=2), row("hf", 2000, batch=2),
        row("fasttune", 7000, shape="llama-2-7b"), row("hf", 3500, shape="llama-2-7b"),
        dict(stack="hf", shape="llama-2-7b", mode="qlora", batch=8, seq=2048, variant="-", error="OOM"),
        dict(stack="unsloth", shape="gpt2-124m", mode="bf16", batch=8, seq=1024, variant="-",
             skipped="no gpt2"),
        dict(kind="maxlen", stack="fasttune", shape="llama-2-7b", mode="qlora", batch=1, max_fit=262144,
             first_fail=None, stopped="budget: ...", peak_gib_at_fit=40.0),
    ]
    groups = bt.group_rows(rows)
    assert list(groups) == [("llama-3.1-8b", 8, 2048), ("llama-3.1-8b", 2, 2048), ("llama-2-7b", 8, 2048),
                            ("gpt2-124m", 8, 1024)]  # first-seen order; the maxlen row is not a group
    g = groups[("llama-3.1-8b", 8, 2048)]
    assert [(r["mode"], r["stack"]) for r in g] == [("bf16", "fasttune"), ("bf16", "unsloth"), ("bf16", "hf"),
                                                    ("qlora", "fasttune"), ("qlora", "unsloth")]
    assert bt.ratios(g[0], g) == (1.2, 2.0)
    vs_u, vs_h = bt.ratios(g[3], g)  # QLoRA against QLoRA only; no HF QLoRA row in this group
    assert vs_u == 0.9 and math.isnan(vs_h)
    g2 = groups[("llama-3.1-8b", 2, 2048)]
    assert bt.ratios(g2[0], g2) == (2.0, 4.0)  # batch 2 against batch 2, not the batch-8 peers
    g3 = groups[("llama-2-7b", 8, 2048)]
    vs_u, vs_h = bt.ratios(g3[0], g3)
    assert math.isnan(vs_u) and vs_h == 2.0

    rows[0]["host_loop_s"] = 0.2468
    bt.print_table(rows)
    out = capsys.readouterr().out
    assert "llama-2-7b, 8 x 2048" in out and "ERROR OOM" in out and "skipped: no gpt2" in out
    assert "host s" in out and "  0.247" in out  # the host's Python speed beside the row it measured
    assert "longest sequence" in out and "262144" in out


def test_llama_only_stacks_are_skipped_on_gpt2_and_opt():
    args = argparse.Namespace(shape="opt-350m")
    for stack in ("unsloth", "liger"):
        (r,) = bt.run_one(stack, "bf16", 8, 2048, args)  # returns before starting any process
        assert r["shape"] == "opt-350m" and "opt" in r["skipped"] and "error" not in r
    # Liger's patch here is Llama's: other Llama-like families run Unsloth but skip Liger
    (r,) = bt.run_one("liger", "bf16", 8, 2048, argparse.Namespace(shape="qwen2.5-7b"))
    assert "qwen2" in r["skipped"] and bt.shape_model_type("llama-3.2-3b") in bt.LIGER_PATCHES


def test_real_shapes_have_the_released_sizes():
    from transformers import AutoModelForCausalLM

    from fasttune.models.hf import llama_config_from_hf
    from fasttune.models.llama import LlamaForCausalLM

    sizes = {"gpt2-124m": 124_439_808, "opt-350m": 331_196_416, "llama-3.1-8b": 8_030_261_248,
             "llama-2-7b": 6_738_415_616, "mistral-7b": 7_248_023_552, "qwen2.5-7b": 7_615_616_512,
             "llama-3.2-3b": 3_212_749_824}
    for shape, n in sizes.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(bt.shape_config(shape))
        assert sum(p.numel() for p in model.parameters()) == n, shape
        if not bt.is_generic(shape):  # fasttune's own model of the shape: the same parameters
            with torch.device("meta"):
                ours = LlamaForCausalLM(llama_config_from_hf(bt.shape_config(shape)))
            assert sum(p.numel() for p in ours.parameters()) == n, shape
            assert ours.config.model_type == bt.shape_model_type(shape)


@pytest.mark.parametrize("shape", ["tiny-gpt2", "tiny-opt"])
def test_generic_model_dir_trains_on_both_stacks(shape, tmp_path, tokenizer_dir):
    bt.write_model_dir(shape, tmp_path, tokenizer_dir)
    args = argparse.Namespace(shape=shape, model_dir=tmp_path, mode="bf16", device="cpu")
    x = bt.fixed_batches(2, 24, 1, bt.shape_vocab(shape))[0]
    results = {}
    builders = (("fasttune", bt.build_fasttune_generic), ("hf", lambda a: bt.build_hf(a, liger=False)))
    for name, build in builders:
        model, params, step = build(args)
        if name == "fasttune":
            assert type(model).__name__ == "GenericCausalLM"
            bt.configure_generic(model, "on")
        loss = step(x)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
        results[name] = (float(loss), len(grads), sum(p.numel() for p in params))
    assert results["fasttune"][0] == pytest.approx(results["hf"][0], rel=1e-5)
    assert results["fasttune"][1:] == results["hf"][1:]  # the same LoRA targets on both
    with pytest.raises(SystemExit, match="another model"):  # a directory of another shape is refused
        bt.write_model_dir("tiny-opt" if shape == "tiny-gpt2" else "tiny-gpt2", tmp_path, tokenizer_dir)


def test_gpu_busy_counts_overlapping_kernels_once_and_copies_apart():
    from types import SimpleNamespace as NS

    def ev(name, start, end, device="DeviceType.CUDA"):
        return NS(name=name, device_type=device, time_range=NS(start=start, end=end))

    events = [ev("gemm", 0, 1000), ev("swiglu", 500, 1500), ev("rope", 3000, 3500),  # union 2000 us
              ev("Memcpy DtoH (Device -> Pinned)", 0, 4000), ev("aten::mm", 0, 9000, "DeviceType.CPU")]
    assert bt.gpu_busy_ms(events) == (2.0, 4.0)
    report = bt.gpu_gaps(events).splitlines()  # one gap: 1500 -> 3000 us, between swiglu and rope
    assert report[0].startswith("idle gaps (us): 0-10: 0.0 ms (0), 10-100: 0.0 ms (0), 100-1000: 0.0 ms (0), "
                                "1000-inf: 1.5 ms (1)")
    assert report[1].split() == ["1500.0", "us", "after", "swiglu", "before", "rope"]
    events.append(ev("cudaStreamSynchronize", 1600, 2900, "DeviceType.CPU"))  # what the host did meanwhile
    assert bt.gpu_gaps(events).splitlines()[2].strip() == \
        "host meanwhile: cudaStreamSynchronize < aten::mm"  # innermost (shortest) first


def test_rows_of_another_source_tree_are_labelled_apart():
    assert bt._label(row("fasttune", 1, variant="offload", tree="base")) == "fasttune[offload]@base"
    assert bt._label(row("fasttune", 1, variant="offload")) == "fasttune[offload]"
    assert bt._label(row("unsloth", 1)) == "unsloth"


def test_packed_variant_feeds_rows_whose_positions_restart(monkeypatch):
    """packN: each sequence holds N rows of equal length; no target crosses a row's end."""
    from types import SimpleNamespace

    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, targets, position_ids):
            seen.update(targets=targets, position_ids=position_ids)
            return SimpleNamespace(loss_sum=self.w * 2.0, n_tokens=torch.tensor(2))

    _, step = bt.fasttune_step(Recorder())
    step(torch.arange(8).view(1, 8))
    assert seen["position_ids"] is None and seen["targets"].tolist() == [[1, 2, 3, 4, 5, 6, 7, -100]]
    monkeypatch.setitem(bt.PACKING, "rows", 2)
    step(torch.arange(16).view(2, 8))
    assert seen["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] * 2
    assert seen["targets"].tolist() == [[1, 2, 3, -100, 5, 6, 7, -100], [9, 10, 11, -100, 13, 14, 15, -100]]


def test_an_fp8_row_is_measured_against_the_peers_bf16_rows():
    g = [row("fasttune", 16000, mode="fp8", variant="offload"), row("unsloth", 10000), row("hf", 8000),
         row("unsloth", 9000, mode="qlora")]
    assert bt.ratios(g[0], g) == (1.6, 2.0)


def test_run_worker_reads_results_and_names_failures(tmp_path):
    import sys

    ok = [sys.executable, "-c", 'print("noise"); print("RESULT {\\"a\\": 1}")']
    rows, out, err, rc = bt.run_worker(ok, tmp_path / "logs" / "ok.log", timeout=60)
    assert rows == [{"a": 1}] and rc == 0 and "noise" in (tmp_path / "logs" / "ok.log").read_text()
    bad = [sys.executable, "-c", "import sys; sys.exit('CUDA out of memory. Tried to allocate')"]
    rows, out, err, rc = bt.run_worker(bad, tmp_path / "bad.log", timeout=60)
    assert rows == [] and rc == 1 and bt.worker_error(out, err, rc, 60) == "OOM"
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    rows, out, err, rc = bt.run_worker(slow, tmp_path / "slow.log", timeout=1)
    assert rc is None and bt.worker_error(out, err, rc, 1) == "TIMEOUT after 1 s"
    assert bt.worker_error("", "", -9, 60).startswith("OOM (host")
    assert bt.worker_error("", "Traceback\nValueError: x", 1, 60) == "Traceback | ValueError: x"


def test_host_profile_writes_the_functions_of_the_step_beside_the_table(tmp_path):
    table = tmp_path / "profile-bf16-2x2048.txt"
    path = bt.host_profile_path(str(table))
    assert path == str(tmp_path / "profile-bf16-2x2048.host.txt")

    def a_host_bound_step():
        return sum(i * i for i in range(20000))

    prof = bt.start_host_profile()
    a_host_bound_step()
    bt.write_host_profile(prof, 0.25, path)
    text = Path(path).read_text()
    assert text.startswith("step 0.250 s under cProfile")
    assert "a_host_bound_step" in text
    assert text.count("Ordered by") == 2  # by own time, and by time with callees


def test_each_variant_pins_the_block_its_plan_copies_before_the_first_step(monkeypatch):
    """As `fasttune train` does (memory.setup.reserve_pinned): otherwise the first timed steps pin the block
    (45.5 GiB at 1 x 32,768 on the 8B shape) and the row measures that."""
    from types import SimpleNamespace

    from fasttune.lora.apply import apply_lora
    from fasttune.memory import pinned
    from fasttune.memory.plan import ModelShape, pinned_copy_bytes, plan_memory
    from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(pinned, "_ARENAS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=2**34))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction: None)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256))
    apply_lora(model, r=4, lora_alpha=8, target_modules=["default"])
    arena, args = pinned.arena(torch.device("cpu")), argparse.Namespace(mode="bf16", batch=2, seq=128)
    bt.configure_fasttune(model, "on", args)  # nothing goes to the host
    assert arena.capacity == 0
    bt.configure_fasttune(model, "offload", args)
    shape = ModelShape.of(model.config)
    plan = plan_memory(shape, model.model.checkpointing, tokens=256, span=128, act_bytes=2, fused=True)
    assert arena.capacity == pinned_copy_bytes(plan, shape, pinned.ALIGN) > 0
