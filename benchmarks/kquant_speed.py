"""Time fasttune's K-quant quantizer on a released model's shape: every 2-D tensor of Llama-3.1-8B (random
weights; the time does not depend on the values) quantized with the --type mix's per-tensor types.

    python benchmarks/kquant_speed.py --device cuda --type q4_k_m          # the whole 8B shape
    python benchmarks/kquant_speed.py --device cpu --layers 1 --skip_vocab  # one layer, a quick look

The time covers the search, the packing and the copy of the block bytes to host memory (what the GGUF
writer receives), synchronised; not reading or merging the checkpoint, nor writing the file.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Llama-3.1-8B: hidden 4096, 32 layers, 32 heads of 128 (8 for k/v), MLP 14336, vocabulary 128256
HIDDEN, INTER, KV, VOCAB, LAYERS = 4096, 14336, 1024, 128256, 32


def tensors(layers: int, vocab: bool) -> list[tuple[str, tuple[int, int]]]:
    out = [("token_embd.weight", (VOCAB, HIDDEN))] if vocab else []
    for i in range(layers):
        out += [
            (f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN)),
            (f"blk.{i}.attn_k.weight", (KV, HIDDEN)),
            (f"blk.{i}.attn_v.weight", (KV, HIDDEN)),
            (f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN)),
            (f"blk.{i}.ffn_gate.weight", (INTER, HIDDEN)),
            (f"blk.{i}.ffn_up.weight", (INTER, HIDDEN)),
            (f"blk.{i}.ffn_down.weight", (HIDDEN, INTER)),
        ]
    return out + ([("output.weight", (VOCAB, HIDDEN))] if vocab else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument(
        "--skip_vocab", action="store_true", help="leave out token_embd and output (1.05G values)"
    )
    args = ap.parse_args()

    from fasttune.export import kquants
    from fasttune.export.quant_mix import OWN_QUANTIZER, tensor_types

    plan = tensors(args.layers, not args.skip_vocab)
    types = tensor_types(args.type, plan, LAYERS)
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    total, values, by_type = 0.0, 0, {}
    for name, shape in plan:
        w = (torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16) * 0.02).float()
        qtype = types[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if qtype in OWN_QUANTIZER:
            kquants.quantize(w, qtype)
        else:  # Q8_0 and the legacy fallbacks come from the gguf package, on the host
            import gguf

            gguf.quants.quantize(w.cpu().numpy(), qtype)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        total += seconds
        values += w.numel()
        by_type[qtype.name] = by_type.get(qtype.name, 0.0) + seconds
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        json.dumps(
            {
                "type": args.type,
                "layers": args.layers,
                "device": device,
                "torch": torch.__version__,
                "values": values,
                "seconds": round(total, 2),
                "values_per_s": round(values / total),
                "seconds_by_type": {k: round(v, 2) for k, v in by_type.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
