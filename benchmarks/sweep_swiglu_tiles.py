"""Sweep the tile shape of the SwiGLU-LoRA backward kernel when it also makes dg B_g and du B_u (the variant
`lora_mlp` runs), on the GPU: rows per tile, columns per tile, tiles per strip, warps and pipeline stages, at
the Llama-3.1-8B MLP (16,384 tokens x 14,336, r = 16, bf16). Each configuration's products are checked
against the shipped one; prints one line per configuration and the five fastest.

    python3 benchmarks/sweep_swiglu_tiles.py [--budget-s 270]
    python3 benchmarks/sweep_swiglu_tiles.py --features   # what lora_mlp's backward could fold into it

--features times the kernel, at the shipped tiles and a few others, with and without h written over dh
(want_h, which saves running the forward kernel again for h), against the work it replaces, timed in the same
process.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from fasttune.kernels import swiglu_lora as sl


def ms(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def features(budget_s: float, tokens: int) -> None:
    inter, r = 14336, 16
    dev, dt = "cuda", torch.bfloat16
    g, u, dh = (torch.randn(tokens, inter, device=dev, dtype=dt) for _ in range(3))
    xa = torch.randn(tokens, 2 * r, device=dev, dtype=dt)
    bs = torch.randn(inter, r, device=dev, dtype=dt) / r
    ops = (g, u, xa[:, :r], bs, xa[:, r:], bs)
    buf = dh.clone()
    t_fwd = ms(lambda: sl._swiglu_lora_fwd(*ops))
    print(f"{torch.cuda.get_device_name()}: replaced work: forward kernel for h {t_fwd * 1e3:.0f} us",
          flush=True)
    saves = {False: 0.0, True: t_fwd}
    shipped = (sl._PART_ROWS, sl._BLOCK_I, sl._PART_TILES, sl._blocks, sl._H_COLS)
    base_blocks = sl._blocks
    configs = [(64, 128, 8, 4, 3), (64, 128, 8, 4, 2), (64, 128, 4, 4, 3), (64, 64, 16, 4, 3),
               (32, 128, 8, 4, 3), (64, 64, 8, 4, 3)]
    rows, start = [], time.time()
    try:
        for cfg in configs:
            bn, bi, tiles, warps, stages = cfg
            sl._PART_ROWS, sl._BLOCK_I, sl._PART_TILES, sl._H_COLS = bn, bi, tiles, bi
            sl._blocks = (lambda rank, dtype, parts=False, want_h=False, w=warps, st=stages:
                          dict(base_blocks(rank, dtype, parts, want_h), num_warps=w, num_stages=st))
            for wh, saved in saves.items():
                if time.time() - start > budget_s:
                    raise TimeoutError
                kw = dict(want_db=True, want_h=wh)
                t = ms(lambda kw=kw: sl._swiglu_lora_bwd(buf, *ops, **kw))
                rows.append((t - saved, cfg, wh, t))
                print(f"rows/cols/tiles/warps/stages {cfg} want_h {wh}: {t * 1e3:.0f} us, "
                      f"net of the work it replaces {(t - saved) * 1e3:.0f} us", flush=True)
    except TimeoutError:
        print("budget spent", flush=True)
    finally:
        sl._PART_ROWS, sl._BLOCK_I, sl._PART_TILES, sl._blocks, sl._H_COLS = shipped
    for net, cfg, wh, t in sorted(rows)[:6]:
        print(f"best net: {net * 1e3:.0f} us ({t * 1e3:.0f} us) {cfg} want_h {wh}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting configurations after this")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--features", action="store_true", help="time want_h (module docstring)")
    args = p.parse_args()
    if args.features:
        features(args.budget_s, args.tokens)
        return
    tokens, inter, r = args.tokens, 14336, 16
    dev, dt = "cuda", torch.bfloat16
    g, u, dh = (torch.randn(tokens, inter, device=dev, dtype=dt) for _ in range(3))
    xa = torch.randn(tokens, 2 * r, device=dev, dtype=dt)
    bs = torch.randn(inter, r, device=dev, dtype=dt) / r
    ops = (g, u, xa[:, :r], bs, xa[:, r:], bs)
    print(f"{torch.cuda.get_device_name()}: bwd without the products "
          f"{ms(lambda: sl._swiglu_lora_bwd(dh, *ops)) * 1e3:.0f} us, one product alone "
          f"{ms(lambda: g @ bs) * 1e3:.0f} us, shipped config with them "
          f"{ms(lambda: sl._swiglu_lora_bwd(dh, *ops, want_db=True)) * 1e3:.0f} us", flush=True)
    want = [t.float() for t in sl._swiglu_lora_bwd(dh, *ops, want_db=True)[2:]]
    shipped = (sl._PART_ROWS, sl._BLOCK_I, sl._PART_TILES, sl._blocks)
    base_blocks = sl._blocks
    rows, start = [], time.time()
    try:
        grid = itertools.product((16, 32, 64), (64, 128), (2, 4, 8), (4, 8), (1, 3))
        for bn, bi, tiles, warps, stages in grid:
            if time.time() - start > args.budget_s:
                print("budget spent", flush=True)
                break
            sl._PART_ROWS, sl._BLOCK_I, sl._PART_TILES = bn, bi, tiles
            sl._blocks = (lambda rank, dtype, parts=False, want_h=False, w=warps, s=stages:
                          dict(base_blocks(rank, dtype, parts, want_h), num_warps=w, num_stages=s))
            t = ms(lambda: sl._swiglu_lora_bwd(dh, *ops, want_db=True))
            got = sl._swiglu_lora_bwd(dh, *ops, want_db=True)[2:]
            err = max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(got, want))
            rows.append((t, bn, bi, tiles, warps, stages, err))
            print(f"rows {bn} cols {bi} tiles {tiles} warps {warps} stages {stages}: {t * 1e3:.0f} us, "
                  f"products off by {err:.1e}", flush=True)
    finally:
        sl._PART_ROWS, sl._BLOCK_I, sl._PART_TILES, sl._blocks = shipped
    for t, *cfg, err in sorted(rows)[:5]:
        print(f"fastest: {t * 1e3:.0f} us, rows/cols/tiles/warps/stages {cfg}, off by {err:.1e}")


if __name__ == "__main__":
    main()
