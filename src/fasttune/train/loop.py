"""The training loop: one function that reads top to bottom.

Per optimiser step it takes `gradient_accumulation_steps` micro-batches, counts the trained tokens
of the whole window first, and back-propagates each micro-batch's `loss_sum / window_tokens`, so
the gradient is the mean over every trained token of the window: batch 2 x accumulation 4 gives
the same update as batch 8, whatever the rows' lengths. Around that: mixed precision, clipping,
optimizer and schedule, logging, eval, checkpoints and resume. The `objective` (train/objective.py)
says what a micro-batch's loss is and what its units are (SFT: trained tokens; DPO: pairs, ...).

Each eval measures the loss and perplexity of the held-out batches and, when the caller passes
`answer_eval`, how many held-out questions the model answers right (greedy, exact and normalised).
Answering runs with the random generators saved and restored around it, so an eval never changes
what training draws next (resume == uninterrupted holds with evals in between).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from fasttune.config import TrainConfig
from fasttune.run_dir import RunDir
from fasttune.train import dist_state as ft_state
from fasttune.train import distributed as ft_dist
from fasttune.train.checkpoint import rng_states, save_checkpoint, set_rng_states
from fasttune.train.interrupts import TrainingStopped
from fasttune.train.metrics import MetricsWriter, memory_used, perplexity, truncate_after
from fasttune.train.objective import Objective, TokenLoss, add_metrics, merge_metrics, metric_means
from fasttune.train.optim import build_optimizer, build_scheduler
from fasttune.train.precision import autocast, grad_scaler
from fasttune.train.resume import find_start, restore
from fasttune.train.step_graph import MicroStepGraph, capturable, graph_rows
from fasttune.train.step_guard import check_finite, split_batch

Batch = dict[str, torch.Tensor]


class ResumableStream(Protocol):
    """Endless micro-batches; `len` is micro-batches per epoch; state is JSON-serialisable."""

    def __next__(self) -> Batch: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def count_steps(cfg: TrainConfig, micro_batches_per_epoch: int, epoch_windows: bool = False) -> int:
    """max_steps, or enough steps for num_train_epochs passes: the last window of an epoch may reach into the
    next, or with `epoch_windows` (the stream ends each epoch on a shorter window) an epoch is
    ceil(micro-batches / accumulation) steps, as transformers' Trainer counts them."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * epoch_slots(cfg, micro_batches_per_epoch, epoch_windows)
                            / cfg.gradient_accumulation_steps))


def epoch_slots(cfg: TrainConfig, micro_batches_per_epoch: int, epoch_windows: bool) -> int:
    """The micro-batches an epoch takes of the steps' windows: with `epoch_windows` its last window counts
    whole."""
    accum = cfg.gradient_accumulation_steps
    return -(-micro_batches_per_epoch // accum) * accum if epoch_windows else micro_batches_per_epoch


def window_size(batches: Any, accum: int) -> int:
    """Micro-batches of the next step: `accum`, or fewer where the stream ends its epoch on a shorter window
    (a stream with `window_size`, `data/pair_batches.ExampleStream`)."""
    size = getattr(batches, "window_size", None)
    return size(accum) if size is not None else accum


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
             precision: str, objective: Objective | None = None) -> tuple[float, int, dict[str, float]]:
    """Mean loss per unit (trained token for SFT) over all of `batches`, that unit count, and the
    objective's metrics as means per unit."""
    objective = objective or TokenLoss()
    was_training = model.training
    model.eval()
    loss_sum, n_units, sums = torch.zeros((), device=device), 0, {}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        units = objective.units(batch)
        with autocast(precision, device):
            loss, stats = objective(model, batch)
        loss_sum += loss.float()
        n_units += units
        add_metrics(sums, stats, units)
    model.train(was_training)
    return float(loss_sum) / max(n_units, 1), n_units, metric_means(sums)


def format_eval(rec: dict[str, Any]) -> str:
    """The eval part of a log line: loss, perplexity and, when answered, the match rates."""
    text = f"eval loss {rec['eval_loss']:.4f}"
    text += f"  ppl {rec['perplexity']:.2f}" if "perplexity" in rec else ""
    text += "".join(f"  {k.removeprefix('eval_')} {v:.4f}" for k, v in rec.items()
                    if k.startswith("eval_") and "/" in k)  # the objective's metrics: rewards/chosen, ...
    if "n_answered" in rec:  # SFT only
        n = rec["n_answered"]
        text += (f"  answers exact {round(rec['exact_match'] * n)}/{n} "
                 f"normalised {round(rec['normalized_match'] * n)}/{n}")
    return text + f"  ({rec['eval_tokens']:,} {rec.get('unit', 'tokens')})"


def step_graph(cfg: TrainConfig, model: torch.nn.Module, objective: Any, precision: str, device: torch.device,
               params: list[torch.nn.Parameter], log: Callable[[str], None],
               eligible: bool) -> MicroStepGraph | None:
    """The micro-step's CUDA graphs (`train.step_graph`) where they apply: `cuda_graph: auto`, one process on
    a GPU without a loss scaler (`eligible`), SFT's token loss, a model that can be captured."""
    if (cfg.cuda_graph == "auto" and eligible and device.type == "cuda" and type(objective) is TokenLoss
            and capturable(model)):
        return MicroStepGraph(model, objective, precision, device, params, log)
    return None


def train_loop(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], batches: ResumableStream,
               cfg: TrainConfig, run_dir: str | Path, *, eval_batches: Iterable[Batch] | None = None,
               answer_eval: Callable[[bool], dict[str, Any]] | None = None,
               device: torch.device | None = None, precision: str = "fp32",
               log: Callable[[str], None] = tqdm.write,
               on_record: Callable[[dict[str, Any]], None] | None = None,
               objective: Objective | None = None,
               stop_requested: Callable[[], int | None] | None = None,
               dist: ft_dist.Distributed | None = None, eval_on_start: bool = True,
               eval_objective: Objective | None = None, resume_log_window: bool = True) -> dict[str, Any]:
    """Train `params` (name -> trainable parameter of `model`) and return the run's numbers.

    `model(**batch)` must return an LMOutput with `loss_sum` and `n_tokens` (docs/ARCHITECTURE.md).
    `answer_eval(final)`, called at each eval with `eval_batches` (final: the last eval of the run), returns
    {"n_answered", "exact_match", "normalized_match"} for the held-out questions it had the model answer.
    `log` receives the human-readable lines; `on_record` every metrics record as it is written.
    `eval_on_start`: a fresh run evaluates before its first step (the baseline of the eval curve).
    `eval_objective`: what evaluation averages (default: the training objective; the notebook's SFTTrainer
    takes transformers' batch means weighted by their rows, `BatchMeanLoss`).
    With `cfg.resume`, the latest complete checkpoint in `run_dir` restores the adapter, optimizer,
    schedule, random generators and data position, and training continues from its step.
    `resume_log_window`: a resumed run carries on the logging interval the checkpoint was in, so that it logs
    the uninterrupted run's averages; False starts a new interval at the checkpoint, as transformers' Trainer
    does (the notebook's trainers).
    `stop_requested()` (interrupts.StopRequests), read after each step, returns a signal number to
    checkpoint and raise TrainingStopped. NaN/Inf steps and out-of-memory: step_guard.py.
    Under torchrun (`dist`, `train/distributed.py`) every rank calls this with its slice of the global batch
    stream: the units are summed over ranks, DDP or FSDP2 reduce the gradients, rank 0 writes.
    """
    d = dist or ft_dist.SINGLE
    run_dir, device = Path(run_dir), device or next(iter(params.values())).device
    objective = objective or TokenLoss()
    eval_objective = eval_objective or objective
    trainable = list(params.values())
    epoch_windows = bool(getattr(batches, "epoch_windows", False))
    accum, total = cfg.gradient_accumulation_steps, count_steps(cfg, len(batches), epoch_windows)
    slots = epoch_slots(cfg, len(batches), epoch_windows)
    optimizer = build_optimizer(trainable, cfg)
    forward = ft_dist.wrap_ddp(model, d) if d.mode == "ddp" else model  # after the flat buffer exists
    scheduler = build_scheduler(optimizer, cfg, total)
    scaler = grad_scaler(precision, device)
    metrics_path = RunDir(run_dir).metrics
    metrics = MetricsWriter(metrics_path)
    # seconds: wall time of the run (eval and checkpoints included); train_seconds: the steps alone
    st = {"step": 0, "tokens": 0, "trained_tokens": 0, "train_seconds": 0.0, "seconds": 0.0,
          "first_loss": None, "first_eval_loss": None, "eval_loss": None, "final_loss": None,
          "eval_perplexity": None, "first_exact_match": None, "exact_match": None,
          "first_normalized_match": None, "normalized_match": None, "first_n_answered": None,
          "n_answered": None, "skipped_steps": 0, "nonfinite_in_a_row": 0, "micro_splits": 1,
          # the logging interval so far, checkpointed so that a resumed run logs the same averages
          "window_log": {"loss_sum": 0.0, "trained": 0, "tokens": 0, "seconds": 0.0, "step_losses": 0.0,
                         "steps": 0, "stats": {}}}
    wall_start = time.perf_counter()

    def record(rec: dict[str, Any]) -> None:
        if d.is_main:
            metrics.write(rec)
        if on_record is not None:
            on_record(rec)

    def run_eval() -> None:
        was_training = model.training
        loss, n, stats = evaluate(model, ft_state.eval_share(eval_batches, d), device, precision,
                                  eval_objective)
        if d.launched:  # sharded: each rank scored its share
            keys = sorted(stats)
            sums = ft_dist.all_sum([loss * n, n, *(stats[k] * n for k in keys)], d)
            n = int(sums[1])
            loss, stats = sums[0] / max(n, 1), {k: v / max(n, 1) for k, v in zip(keys, sums[2:])}
        rec = {"kind": "eval", "step": st["step"], "eval_loss": loss, "eval_tokens": n,
               **{f"eval_{k}": v for k, v in stats.items()}}
        if eval_objective.per_token:
            rec["perplexity"] = perplexity(loss)
        else:  # eval_tokens counts the objective's units
            rec["unit"] = eval_objective.unit
        if answer_eval is not None:
            t0, states = time.perf_counter(), rng_states()
            try:
                answered = answer_eval(st["step"] == total)
            finally:
                set_rng_states(states)
                model.train(was_training)
            rec.update({k: answered[k] for k in ("n_answered", "exact_match", "normalized_match")},
                       answer_seconds=round(time.perf_counter() - t0, 3))
        first = st["first_eval_loss"] is None
        st.update(eval_loss=loss, eval_perplexity=rec.get("perplexity"))
        st["first_eval_loss"] = loss if first else st["first_eval_loss"]
        for key in ("n_answered", "exact_match", "normalized_match"):
            if key in rec:
                st[key] = rec[key]
                if st[f"first_{key}"] is None:
                    st[f"first_{key}"] = rec[key]
        record(rec)
        log(f"step {st['step']:>5}/{total}  {format_eval(rec)}")

    resume = cfg.resume or d.restart > 0  # a torchrun restart continues from the latest checkpoint
    if d.restart:
        log(f"torchrun restart {d.restart}: resuming from the latest checkpoint")
    # rank 0 reads the checkpoint and hands it (or its error) to the others, whose nodes need not see it
    ckpt = ft_state.from_rank0(lambda: find_start(run_dir, resume, log), d)
    global_batch = getattr(batches, "global_batch", None)
    if ckpt is not None and d.launched:
        ft_dist.check_resume_batch(ckpt.state, global_batch, d)
        ft_state.restore_ranks(ckpt, params, optimizer, scheduler, scaler, batches, d, cfg.seed)
    elif ckpt is not None:
        ft_dist.check_resume_batch(ckpt.state, global_batch, d)
        restore(ckpt, params, optimizer, scheduler, scaler, batches)
    if ckpt is not None:
        st.update({k: ckpt.state[k] for k in st if k in ckpt.state if resume_log_window or k != "window_log"})
        if d.is_main:
            truncate_after(metrics_path, st["step"])  # steps after the checkpoint are logged again
        ranks = ckpt.state.get("world_size", 1)
        log(f"resumed from {ckpt.path} at step {st['step']}/{total}"
            + (f" (written by {ranks} ranks)" if ranks > 1 else ""))
    else:
        if d.is_main:
            metrics_path.unlink(missing_ok=True)  # a resumed run that had reached no checkpoint logs again
        # rank 0 draws what one process would; the others their own streams (dropout differs per rank)
        seed_everything(cfg.seed if d.rank == 0 else ft_state.fresh_seed(cfg.seed, d.rank, 0))
        if eval_batches is not None and eval_on_start:
            run_eval()  # the baseline, so that the eval curve shows what training changed

    wall_before = st["seconds"]  # restored on resume
    # this call's steps (after a resume, those past the checkpoint): transformers' train_loss is their mean
    started_at, call_loss_sum, call_steps = st["step"], 0.0, 0

    def checkpoint() -> Path | None:
        st["seconds"] = wall_before + time.perf_counter() - wall_start
        # whole tensors and every rank's generators: gathered on every rank (collectives), written by rank 0
        adapter = (ft_state.full_adapter(params) if d.mode == "fsdp"
                   else {k: p.detach() for k, p in params.items()})
        opt, rng = ft_state.optimizer_state(optimizer, d), ft_state.gather_rng(rng_states(), d)
        if not d.is_main:
            return None
        return save_checkpoint(run_dir, st["step"], adapter, opt, scheduler, scaler, rng,
                               batches.state_dict(), {**st, "world_size": d.world_size,
                                                      "global_batch": global_batch}, cfg.save_total_limit)

    def run_window(window: list[Batch], window_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of every micro-batch (each as `micro_splits` parts): the window's loss sum
        and its metric sums."""
        loss_sum, sums, pending = torch.zeros((), device=device), {}, []
        parts = st["micro_splits"]
        micro = [p for b in window for p in split_batch(b, parts)] if parts > 1 else window
        for i, batch in enumerate(micro):
            units = objective.units(batch)  # from the host copy: on the device, reading it is a host sync
            graphed = graph_rows(batch) if graph is not None else None
            batch = graphed[0] if graphed is not None else batch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # DDP reduces once, after the window's last backward; DDP and FSDP2 average gradients over the
            # ranks, so the loss is scaled by the world size to make that average the sum the units divide
            if graphed is not None:  # the same forward and scaled backward, replayed
                batch_loss, stats = graph(batch, graphed[1], d.world_size / max(window_tokens, 1))
            else:
                with ft_dist.no_sync(forward, sync=i == len(micro) - 1):
                    with autocast(precision, device):
                        batch_loss, stats = objective(forward, batch)
                    loss = batch_loss.float() * d.world_size / max(window_tokens, 1)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += batch_loss.detach().float()
            pending.append((stats, units))
        for stats, units in pending:  # read on the host after the window's last backward is queued, not
            add_metrics(sums, stats, units)  # between micro-batches, where each read would idle the GPU
        return loss_sum, sums

    model.train()
    bar = tqdm(total=total, initial=st["step"], desc="training", unit="step", dynamic_ncols=True,
               disable=None if d.is_main else True)  # None: a bar on a terminal, none in a log file
    window_log = st["window_log"]
    for key in ("step_losses", "steps"):  # a checkpoint written before these were logged
        window_log.setdefault(key, 0)
    # micro-batches captured as CUDA graphs, one per shape (`train.step_graph`): single-process SFT, our model
    graph = step_graph(cfg, model, objective, precision, device, trainable, log,
                       eligible=scaler is None and not d.launched)
    try:
        while st["step"] < total:
            t0 = time.perf_counter()
            window = [next(batches) for _ in range(window_size(batches, accum))]
            # Normalise by the trained tokens of the whole window, not per micro-batch: rows of different
            # lengths then weigh the same whether they share a micro-batch or not. Under torchrun the window
            # spans every rank's slice, so its units (and input tokens, for the log) are summed over ranks.
            window_tokens, n_input = (int(v) for v in ft_dist.all_sum(
                [sum(objective.units(b) for b in window),  # trained tokens for SFT, pairs for DPO, ...
                 sum(b["input_ids"].numel() for b in window)], d))
            while True:
                try:
                    loss_sum, step_stats = run_window(window, window_tokens)
                    break
                except torch.cuda.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    if graph is not None:
                        graph.close()  # the graphs' memory too: the retry may capture again
                    torch.cuda.empty_cache()
                    rows = window[0]["input_ids"].shape[0]
                    # split only where the unit is the token: a split must not separate a pair's rows
                    splittable = cfg.auto_batch_size and isinstance(objective, TokenLoss)
                    if not splittable or math.ceil(rows / st["micro_splits"]) <= 1:
                        raise
                    st["micro_splits"] *= 2
                    log(f"out of GPU memory: each micro-batch of {rows} rows now runs as "
                        f"{st['micro_splits']} parts (auto_batch_size; the global batch and the update are "
                        "unchanged)")
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = float(ft_state.full_tensor(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
            lr = scheduler.get_last_lr()[0]  # the lr this update uses
            step_loss_sum = ft_dist.all_sum([float(loss_sum)], d)[0]
            step_loss = step_loss_sum / max(window_tokens, 1)
            good = check_finite(st, step_loss, grad_norm, scaler is not None, cfg.max_nonfinite_steps, log)
            if scaler is not None:  # skips the update itself when a gradient is not finite
                scaler.step(optimizer)
                scaler.update()
            elif good:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - t0
            st["step"] += 1
            st["tokens"] += n_input
            st["train_seconds"] += seconds
            if good:
                st["trained_tokens"] += window_tokens
                st["final_loss"] = step_loss
                st["first_loss"] = step_loss if st["first_loss"] is None else st["first_loss"]
                for key, value in (("loss_sum", step_loss_sum), ("trained", window_tokens),
                                   ("tokens", n_input), ("seconds", seconds), ("step_losses", step_loss),
                                   ("steps", 1)):
                    window_log[key] += value
                merge_metrics(window_log["stats"], step_stats)
                call_loss_sum += step_loss
                call_steps += 1

            mem, mem_kind = memory_used(device)
            tok_s = window_log["tokens"] / max(window_log["seconds"], 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mem=f"{mem:.2f}G")
            bar.update(1)
            if st["step"] % cfg.logging_steps == 0 or st["step"] == total:
                # per unit over the interval (NaN when every step of it was skipped)
                trained = window_log["trained"]
                mean_loss = window_log["loss_sum"] / trained if trained else math.nan
                # transformers' logged loss: the mean of the steps' losses (equal at logging_steps 1)
                steps = window_log["steps"]
                step_mean = window_log["step_losses"] / steps if steps else math.nan
                stats = metric_means(window_log["stats"])
                record({"kind": "train", "step": st["step"], "loss": mean_loss, "step_mean_loss": step_mean,
                        "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                        "trained_tokens": st["trained_tokens"], "memory_gib": mem, "memory_kind": mem_kind,
                        "epoch": st["step"] * accum / slots, **stats})
                log(f"step {st['step']:>5}/{total}  loss {mean_loss:.4f}  lr {lr:.2e}  grad {grad_norm:.3f}  "
                    + "".join(f"{k} {v:.4f}  " for k, v in stats.items())
                    + f"{tok_s:,.0f} tok/s  mem {mem:.2f} GiB")
                window_log = st["window_log"] = {**dict.fromkeys(window_log, 0), "stats": {}}
            if eval_batches is not None and (
                    (cfg.eval_steps and st["step"] % cfg.eval_steps == 0) or st["step"] == total):
                run_eval()
            saved = (cfg.save_steps and st["step"] % cfg.save_steps == 0) or st["step"] == total
            # every rank stops at the same step: a signal reaches the ranks at different moments
            stop = ft_dist.agree_stop(stop_requested() if stop_requested is not None else None, d)
            if saved or stop:
                path = checkpoint()
                if stop:
                    bar.close()
                    raise TrainingStopped(stop, st["step"], str(path))
        bar.close()
    finally:  # the graphs' memory and the frozen pinned block go back, however the run ends
        if graph is not None:
            graph.close()

    mem, mem_kind = memory_used(device)
    st["seconds"] = wall_before + time.perf_counter() - wall_start
    return {**st, "steps": st["step"], "total_steps": total, "unit": objective.unit, "started_at": started_at,
            "mean_step_loss": call_loss_sum / call_steps if call_steps else None,
            "tokens_per_s": st["tokens"] / max(st["train_seconds"], 1e-9), "memory_gib": mem,
            "memory_kind": mem_kind}
