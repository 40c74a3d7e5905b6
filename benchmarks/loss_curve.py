"""Loss curves side by side: fasttune's GPU fast path, its plain PyTorch reference, transformers + PEFT.

    python benchmarks/loss_curve.py [--steps 40] [--shape smollm2-135m] [--out loss_curves.json]
    python benchmarks/loss_curve.py --fp8 --runs fast fp8 --steps 200 --tol 0.01   (suite `fp8`, part `loss`)

One process, one CUDA device. The same random-weight model (seeded) is built three times with the same base
weights and the same LoRA initial adapters (r=16, alpha=16 on the seven projections; PEFT's adapters are
overwritten with ours), then trained for `--steps` steps of torch AdamW (lr 1e-3) under bf16 autocast on
the same batches: the embedded instruction data (`assets/lumen_train.jsonl`) tokenized with the SmolLM2
tokenizer (`--tokenizer`), concatenated and cut into `--batch` x `--seq` rows.
    fast:  use_kernels (Triton RMSNorm/RoPE/SwiGLU/cross-entropy, fused LoRA), checkpointing 'offload'
           (recompute in halves, inputs on the host)
    ref:   PyTorch references, no checkpointing
    hf:    transformers LlamaForCausalLM + PEFT LoRA, SDPA attention
    fp8:   (with --fp8) the fast path over the same base weights stored in FP8 (`load_in_fp8`): forward and
           input-gradient products in FP8
`--runs` picks the runs beside the reference (default: fast and hf, and fp8 with --fp8). Prints the losses
per step and each run's largest relative difference from the reference (fp8 also from the fast path, its
bf16 twin); the last line is a verdict against `--tol`, over every run against the reference.
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_batches(tokenizer, batch: int, seq: int, n: int) -> list[torch.Tensor]:
    """`n` batches (batch, seq) of the embedded data; `tokenizer`: a directory or a loaded tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
    rows = [json.loads(line) for line in files("fasttune").joinpath("assets", "lumen_train.jsonl")
            .read_text().splitlines() if line.strip()]
    text = "\n\n".join(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows)
    ids = torch.tensor(tok(text)["input_ids"])
    per = batch * seq
    reps = -(-(per * n) // ids.numel())
    ids = ids.repeat(reps)[: per * n]  # the data cycles when the steps outnumber it
    return list(ids.view(n, batch, seq))


def build_ours(shape: str, use_kernels: bool, fp8: bool = False):
    from fasttune.lora.apply import apply_lora
    from fasttune.models.fp8 import fp8_linears
    from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
    from fasttune.models.presets import SHAPES

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]), use_kernels=use_kernels)
    model = model.to("cuda", torch.bfloat16)
    if fp8:  # the same base weights, stored in FP8 (load_in_fp8)
        fp8_linears(model, "cuda")
    apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS, random_state=3407)
    model.set_use_kernels(use_kernels)
    model.set_gradient_checkpointing("offload" if use_kernels else "off")
    return model.train()


def build_hf(ours):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from fasttune.models.hf import hf_config_from_llama

    cfg = hf_config_from_llama(ours.config)
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    base = {k.replace(".base_layer.", "."): v for k, v in ours.state_dict().items() if "lora_" not in k}
    missing, unexpected = hf.load_state_dict(base, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"HF copy of the weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    peft_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                key = "base_model.model." + name.replace(".weight", ".default.weight")
                peft_params[key].copy_(p)
    return hf.train()


def train(model, batches, lr: float, is_hf: bool, device: str = "cuda") -> list[float]:
    """AdamW over the trainable parameters, one step per batch (bf16 autocast on CUDA, fp32 on the CPU)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for x in batches:
        x = x.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            if is_hf:
                loss = model(input_ids=x, labels=x).loss
            else:
                targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
                out = model(input_ids=x, targets=targets)
                loss = out.loss_sum / out.n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=0.02, help="largest allowed |loss - ref loss| / ref loss")
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("loss_curves.json"))
    p.add_argument("--fp8", action="store_true", help="also the fast path over an FP8 base (load_in_fp8), "
                   "judged against the bf16 reference with the same --tol")
    p.add_argument("--runs", nargs="+", choices=("fast", "hf", "fp8"), default=None,
                   help="the runs beside the reference (default: fast and hf, and fp8 with --fp8)")
    args = p.parse_args()
    batches = token_batches(args.tokenizer, args.batch, args.seq, args.steps)
    curves = {}
    runs = args.runs or (["fast", "hf"] + (["fp8"] if args.fp8 else []))
    names = ("ref", *[n for n in ("fast", "hf", "fp8") if n in runs])
    for name in names:
        ours = build_ours(args.shape, use_kernels=name in ("fast", "fp8"), fp8=name == "fp8")
        model = build_hf(ours) if name == "hf" else ours
        if name == "hf":
            del ours
        curves[name] = train(model, batches, args.lr, is_hf=name == "hf")
        del model
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "gpu": torch.cuda.get_device_name(), "curves": curves}))
    print(f"{'step':>4}" + "".join(f" {n:>8}" for n in names))
    for i in range(args.steps):
        print(f"{i:4d}" + "".join(f" {curves[n][i]:8.4f}" for n in names))
    worst = {}
    for name in names[1:]:
        worst[name] = max(abs(a - b) / abs(b) for a, b in zip(curves[name], curves["ref"]))
        print(f"{name} vs ref: largest relative difference {worst[name]:.4f}")
    if "fp8" in curves and "fast" in curves:
        beside = max(abs(a - b) / abs(b) for a, b in zip(curves["fp8"], curves["fast"]))
        print(f"fp8 vs fast (its bf16 twin): largest relative difference {beside:.4f}")
    drop = curves["ref"][0] - curves["ref"][-1]
    ok = all(w <= args.tol for w in worst.values()) and drop > 0
    print(f"loss {curves['ref'][0]:.3f} -> {curves['ref'][-1]:.3f}; within {args.tol:.0%} of the reference: "
          f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
