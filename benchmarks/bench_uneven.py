"""Training speed on uneven instruction rows, counted in real (non-pad) tokens: fasttune beside Unsloth and
transformers + PEFT, at batch 2 and 8, packing off and on, plain or length-grouped batches.

Every stack loads the same random-weight model directory (`bench_train.write_model_dir`) and trains LoRA
r=16 alpha=16 on all seven projections with bitsandbytes AdamW 8-bit in bf16 on the same micro-batches:
the rows of `instruction_data.py` (about 50 to 1,500 tokens) in the notebook's Alpaca prompt with EOS,
trained whole as TRL trains a text column, batched by fasttune's own batcher (`data/packing.py`):
    packing off   each row alone, padded to the longest of its batch (rounded up to 8), pads masked
                  (fasttune's model runs such a batch padding-free: `models/padding_free.py`);
    packing on    rows packed best-fit into sequences of --max-len, positions restarting at each row;
    grouped       batches of similar lengths (transformers' group_by_length order), same rows per epoch.
tokens/s = the real tokens of the timed steps / their wall time (warm-up steps left out). fasttune runs
as `fasttune train` configures it (`gradient_checkpointing: auto`); the peers with their own checkpointing
('unsloth'; transformers' non-reentrant). Packed rows reach the peers as TRL's padding-free collator
passes them (position_ids, no attention mask): whether their attention stays inside each row depends on
their attention backend, which each row records (`attention`). The first step's loss, before any update
and with LoRA B = 0, is that of the same base model on the same tokens: each row records it (`loss0`) so
that the stacks can be seen to train the same thing.

    python benchmarks/bench_uneven.py --shape llama-3.1-8b --modes bf16 qlora --batches 2 8 \
        --packing off on --grouping off on --stacks fasttune unsloth hf --out uneven.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train as bt  # noqa: E402
import instruction_data  # noqa: E402

STACK_ORDER = {"fasttune": 0, "unsloth": 1, "hf": 2}


# ---- the batches: the same for every stack ---------------------------------------------------------

def examples(tokenizer, rows: list[dict], max_len: int) -> list:
    """Each row's notebook text + EOS, tokenized as TRL tokenizes a text column, cut to max_len."""
    from fasttune.data.tokenize import Example

    texts = [instruction_data.row_text(r) + tokenizer.eos_token for r in rows]
    ids = tokenizer(texts)["input_ids"]
    return [Example(input_ids=list(x[:max_len]), labels=list(x[:max_len])) for x in ids]


def epoch_batches(args) -> list[dict]:
    """Every micro-batch of epoch 0 over the rows of --data (fasttune's batch contract)."""
    from transformers import AutoTokenizer

    from fasttune.data.packing import make_batches

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_batches(examples(tokenizer, rows, args.max_len), args.batch, args.max_len, pad,
                        packing=args.packing == "on", seed=args.seed, epoch=0,
                        group_by_length=args.grouping == "on")


def rows_in(batch: dict) -> int:
    """How many rows a micro-batch holds: its row starts (position 0 on a real token), packed or not."""
    return int(((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum())


def micro_batches(args) -> list[dict]:
    """The first micro-batches of epoch 0: --warmup, then --steps of them, or with --rows-timed as many as
    hold that many rows (the same rows at every batch size and packing)."""
    batches = epoch_batches(args)
    need = args.warmup + args.steps
    if args.rows_timed:
        held, need = 0, args.warmup
        while held < args.rows_timed and need < len(batches):
            held += rows_in(batches[need])
            need += 1
        if held < args.rows_timed:
            raise SystemExit(f"the epoch after the warm-up holds {held} rows, --rows-timed "
                             f"{args.rows_timed} asked: raise --rows")
    if len(batches) < need:
        raise SystemExit(f"{len(batches)} micro-batches in an epoch, {need} needed: raise --rows")
    return batches[:need]


def peer_inputs(batch: dict, packed: bool) -> dict:
    """transformers' arguments for one of our batches: unshifted labels (-100 where nothing is trained);
    packed batches as TRL's padding-free collator passes them (position_ids, no attention mask)."""
    import torch

    labels = torch.full_like(batch["targets"], -100)
    labels[:, 1:] = batch["targets"][:, :-1]  # the model shifts them back: logits[t] predicts labels[t + 1]
    if packed:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": labels}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


# ---- one stack ------------------------------------------------------------------------------------

def build_fasttune(args):
    """fasttune's loader and LoRA on the model directory, checkpointing as `fasttune train` sets it."""
    import torch

    from fasttune.api import attach_lora, load
    from fasttune.config import LoraConfig, ModelConfig, RunConfig
    from fasttune.memory.setup import set_checkpointing

    cfg = RunConfig()
    cfg.model = ModelConfig(model_name=str(args.model_dir), max_seq_length=args.max_len,
                            dtype="bf16" if args.device == "cuda" else "fp32",
                            load_in_4bit=args.mode == "qlora")
    cfg.train.per_device_train_batch_size = args.batch
    cfg.train.keep_narrow = args.keep_narrow
    device = torch.device(args.device)
    loaded = load(cfg.model, device)
    model = attach_lora(loaded, LoraConfig(r=16, lora_alpha=16, target_modules=bt.TARGETS))
    precision = "bf16" if args.device == "cuda" else "fp32"
    checkpointing = set_checkpointing(model, cfg, device, precision=precision,
                                      quantization=loaded.quantization, log=print)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    info = {"checkpointing": checkpointing, "keep_narrow": cfg.train.keep_narrow,
            "cuda_graph": args.cuda_graph}
    def step(batch):
        out = model(**batch)
        loss = out.loss_sum / out.n_tokens
        loss.backward()
        return loss.detach()

    if args.cuda_graph:  # as `fasttune train` runs them: each shape captured as a CUDA graph
        return model, params, graph_step(model, params, device, precision, step), info
    return model, params, step, info


def graph_step(model, params, device, precision: str, eager):
    """A step taking the batch's host copy, through `MicroStepGraph` as `train_loop` runs it: a batch that
    `graph_rows` takes (a padded one as one packed row of its real tokens) is captured once per shape and
    replayed on the GPU (run eagerly elsewhere), any other runs as `eager` runs it."""
    from fasttune.models.base import IGNORE_INDEX
    from fasttune.train.objective import TokenLoss
    from fasttune.train.step_graph import MicroStepGraph, graph_rows

    micro = MicroStepGraph(model, TokenLoss(), precision, device, params, log=print)

    def step(batch):
        rows = graph_rows(batch)
        if rows is None:
            return eager({k: v.to(device) for k, v in batch.items()})
        scale = 1.0 / max(int((batch["targets"] != IGNORE_INDEX).sum()), 1)  # the mean over trained tokens
        loss_sum, _ = micro({k: v.to(device) for k, v in rows[0].items()}, rows[1], scale)
        return loss_sum * scale  # a new tensor: the graph's output is written again by the next step

    step.takes_host_batch = True
    step.graph = micro.graph
    return step


def build_peer(args):
    model, params, _ = bt.build_unsloth(args) if args.stack == "unsloth" else bt.build_hf(args, liger=False)
    packed = args.packing == "on"

    def step(batch):
        loss = model(**peer_inputs(batch, packed)).loss
        loss.backward()
        return loss.detach()

    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return model, params, step, {"attention": f"{attention}: position_ids only" if packed else attention}


def timed(params, step, batches, warmup: int, device: str, flat: bool, profile: str | None = None,
          profile_step: int | None = None) -> dict:
    """Wall time and real tokens of the steps after `warmup`, each step's time and width; peak memory over
    all of them. `profile`: write a profiler table of step `profile_step` (default: the first after the
    warmup) there and a cProfile of the next beside it (CUDA only); neither counts in the totals."""
    import torch

    cuda = device == "cuda"
    if cuda:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    else:  # CPU runs check the harness; 8-bit Adam needs CUDA
        opt_cls = torch.optim.AdamW
    if flat:
        from fasttune.train.flat_params import flat_optimizer

        opt = flat_optimizer(opt_cls, params, lr=1e-4)
    else:
        opt = opt_cls(params, lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    host_s = bt.host_loop_s()  # the host's Python speed: the steps at batch 2 are the host's time
    seconds, real, padded, rows, losses, steps = 0.0, 0, 0, 0, [], []
    at = warmup if profile_step is None else profile_step
    for i, host_batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in host_batch.items()}
        # with `profile`: step `at` under the torch profiler, the next under cProfile;
        # neither counts in the timed total
        prof = bt.start_profile() if profile and cuda and i == at else None
        host = bt.start_host_profile() if profile and cuda and i == at + 1 else None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = step(host_batch if getattr(step, "takes_host_batch", False) else batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if prof is not None:
            bt.write_profile(prof, dt, profile)
        if host is not None:
            bt.write_host_profile(host, dt, bt.host_profile_path(profile))
        losses.append(float(loss))
        steps.append([round(dt, 4), tuple(batch["input_ids"].shape)[1]])  # (seconds, padded width)
        if i >= warmup and prof is None and host is None:
            seconds += dt
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            rows += rows_in(host_batch)
    out = {"seconds": seconds, "rows": rows, "real_tokens": real, "batch_tokens": padded,
           "tokens_per_s": real / seconds,
           "pad_share": 1 - real / padded, "loss0": losses[0], "losses": losses, "steps": steps,
           "host_loop_s": host_s}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def worker(args) -> dict:
    if args.stack == "unsloth":  # Unsloth must be imported before transformers
        import unsloth  # noqa: F401
    batches = micro_batches(args)
    build = build_fasttune if args.stack == "fasttune" else build_peer
    model, params, step, info = build(args)
    row = {"stack": args.stack, "shape": args.shape, "mode": args.mode, "batch": args.batch,
           "max_len": args.max_len, "packing": args.packing, "grouping": args.grouping, **info}
    try:
        row.update(timed(params, step, batches, args.warmup, args.device, flat=args.stack == "fasttune",
                         profile=getattr(args, "profile_to", None),
                         profile_step=getattr(args, "profile_step", None)))
    except Exception as e:  # one failure is a row of the table, not the end of the run
        row["error"] = "OOM" if "out of memory" in str(e).lower() else f"{type(e).__name__}: {e}"[:300]
    graph = getattr(step, "graph", None)
    if graph is not None:  # how many steps ran as a replay, of how many shapes; why a capture failed
        row.update(graph_replays=graph.replays, graph_padded=graph.padded, graph_shapes=len(graph.captured),
                   graph_failed=graph.failed)
    if args.device == "cuda":
        import torch

        if args.stack == "fasttune":  # the pinned block of the offloaded copies, and how often it grew
            from fasttune.memory.pinned import arena

            block = arena(torch.device("cuda"))
            row["pinned_gib"], row["pinned_grows"] = round(block.capacity / 2**30, 3), block.grows

        row["gpu"] = torch.cuda.get_device_name()
    del model
    gc.collect()
    return row


# ---- the orchestrator -----------------------------------------------------------------------------

def run_one(stack: str, mode: str, batch: int, packing: str, grouping: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--mode", mode, "--batch", str(batch),
           "--packing", packing, "--grouping", grouping, "--shape", args.shape, "--model-dir",
           str(args.model_dir), "--data", str(args.data), "--max-len", str(args.max_len), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device,
           "--rows-timed", str(args.rows_timed)]
    key = {"stack": stack, "shape": args.shape, "mode": mode, "batch": batch, "max_len": args.max_len,
           "packing": packing, "grouping": grouping}
    log = Path(args.log_dir) / f"uneven-{stack}-{mode}-b{batch}-pack{packing}-group{grouping}.log"
    cmd += ["--keep-narrow" if args.keep_narrow else "--no-keep-narrow"]
    cmd += ["--cuda-graph" if args.cuda_graph else "--no-cuda-graph"]
    if args.profile:
        cmd += ["--profile-to", str(log.with_suffix(".profile.txt"))]
        if args.profile_step is not None:
            cmd += ["--profile-step", str(args.profile_step)]
    rows, out, err, rc = bt.run_worker(cmd, log, args.timeout)
    if rows:
        return rows[0]
    return dict(key, error=bt.worker_error(out, err, rc, args.timeout))


def print_table(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["mode"], r["batch"], r["packing"], r["grouping"]), []).append(r)
    for (shape, mode, batch, packing, grouping), group in groups.items():
        group.sort(key=lambda r: STACK_ORDER.get(r["stack"], 9))
        ref = {r["stack"]: r["tokens_per_s"] for r in group if "tokens_per_s" in r}
        print(f"\n{shape} {mode}, batch {batch}, packing {packing}, grouped {grouping}")
        print(f"  {'stack':10} {'real tok/s':>10} {'pad %':>6} {'peak GiB':>9} {'loss0':>8} "
              f"{'vs unsloth':>10} {'vs hf':>6}  attention")
        for r in group:
            if "error" in r:
                print(f"  {r['stack']:10} ERROR {r['error'][:100]}")
                continue
            vs = [r["tokens_per_s"] / ref[s] if s in ref else float("nan") for s in ("unsloth", "hf")]
            print(f"  {r['stack']:10} {r['tokens_per_s']:10.0f} {100 * r['pad_share']:6.1f} "
                  f"{r.get('peak_gib', float('nan')):9.2f} {r['loss0']:8.4f} {vs[0]:10.2f} {vs[1]:6.2f}  "
                  f"{r.get('attention') or r.get('checkpointing', '')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="fasttune", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--packing", default="off", choices=["off", "on"], help=argparse.SUPPRESS)
    p.add_argument("--grouping", default="off", choices=["off", "on"], help=argparse.SUPPRESS)
    p.add_argument("--stacks", nargs="+", default=["fasttune", "unsloth", "hf"])
    p.add_argument("--modes", nargs="+", default=["bf16", "qlora"])
    p.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    p.add_argument("--packings", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--groupings", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(bt.SHAPES))
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--data", type=Path, default=Path("/tmp/bench-uneven.jsonl"))
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows-timed", type=int, default=0,
                   help="time the micro-batches after the warm-up that hold this many rows, not --steps of "
                   "them (480: the notebook's 60 steps x batch 2 x accumulation 4); 0: --steps")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # 'cpu': tests of the harness
    p.add_argument("--out", type=Path, default=Path("bench_uneven.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--profile", action="store_true",
                   help="write a profiler table of each process's first timed step beside its log (CUDA)")
    p.add_argument("--keep-narrow", action=argparse.BooleanOptionalAction, default=True,
                   help="fasttune: narrow micro-batches keep their last layers' activations within a full "
                   "one's memory (TrainConfig.keep_narrow, on by default as in `fasttune train`); "
                   "--no-keep-narrow: every micro-batch runs the full one's plan")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="fasttune: micro-batches captured as CUDA graphs, one per shape, and replayed, as "
                   "`fasttune train` runs them (cuda_graph: auto; a padded batch as one packed row of its "
                   "real tokens); --no-cuda-graph: every step eagerly")
    p.add_argument("--profile-step", type=int, default=None,
                   help="with --profile: the index of the step to profile, counting the warm-up steps "
                   "(default: the first timed step); a later one shows the steady state, once the batch "
                   "widths have been seen")
    p.add_argument("--profile-to", default=None, help=argparse.SUPPRESS)  # worker: that table's path
    args = p.parse_args()
    args.seq = args.max_len  # bench_train's builders size Unsloth's model by it
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    bt.write_model_dir(args.shape, args.model_dir, args.tokenizer)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    rows = instruction_data.make_rows(args.rows, args.seed, tokenizer)
    args.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for mode in args.modes:
        for batch in args.batches:
            for packing in args.packings:
                for grouping in args.groupings:
                    if packing == "on" and grouping == "on":
                        continue  # packed sequences are full already: grouping has nothing to remove
                    for stack in args.stacks:
                        r = run_one(stack, mode, batch, packing, grouping, args)
                        results.append(r)
                        with args.out.open("a") as f:
                            f.write(json.dumps(r) + "\n")
                        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
