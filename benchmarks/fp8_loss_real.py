"""The FP8 base's loss curve on real weights: the embedded SmolLM2-135M-Instruct, on the CPU.

    python benchmarks/fp8_loss_real.py [--steps 50] [--out fp8_loss_real.json]

The GPU machine cannot receive the real weights, so this runs where they are installed. Two copies of the
model train LoRA (r=16, alpha=16, all seven projections, the same initial adapters) for `--steps` AdamW
steps on the same batches of the embedded instruction data, in fp32: one with its frozen base as it
is, one with the base stored in FP8 (`fasttune.models.fp8.fp8_linears`). On the CPU the FP8 products are
emulated (inputs and weights rounded to e4m3 with the same row scales as on the GPU, multiplied in fp32),
so the difference between the curves is FP8's rounding of the frozen products. Prints both curves and the
largest relative difference; the last line is a verdict against `--tol`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from loss_curve import TARGETS, token_batches, train


def build(fp8: bool):
    from fasttune.api import load
    from fasttune.config import ModelConfig
    from fasttune.lora.apply import apply_lora
    from fasttune.models.fp8 import fp8_linears

    loaded = load(ModelConfig(dtype="fp32", use_kernels="off"), torch.device("cpu"))
    model = loaded.model
    if fp8:
        fp8_linears(model, "cpu", require_fp8_cores=False)
    apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS, random_state=3407)
    model.set_use_kernels(True)  # the fused LoRA path (pure torch on the CPU), as training uses it
    return model.train(), loaded.tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--tol", type=float, default=0.02, help="largest allowed |loss - bf16 loss| / bf16 loss")
    p.add_argument("--out", type=Path, default=Path("fp8_loss_real.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    curves, batches = {}, None
    for name in ("base", "fp8"):
        t0 = time.time()
        model, tok = build(fp8=name == "fp8")
        batches = batches or token_batches(tok, args.batch, args.seq, args.steps)
        curves[name] = train(model, batches, args.lr, is_hf=False, device="cpu")
        print(f"{name}: {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
        del model
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "curves": curves}))
    print(f"{'step':>4} {'base':>8} {'fp8':>8}")
    for i in range(args.steps):
        print(f"{i:4d} {curves['base'][i]:8.4f} {curves['fp8'][i]:8.4f}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(curves["fp8"], curves["base"]))
    drop = curves["base"][0] - curves["base"][-1]
    ok = worst <= args.tol and drop > 0
    print(f"loss {curves['base'][0]:.3f} -> {curves['base'][-1]:.3f} (fp8 {curves['fp8'][-1]:.3f}); largest "
          f"relative difference {worst:.4f}; within {args.tol:.0%}: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
