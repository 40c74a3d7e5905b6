"""Ceilings and building blocks of the training step on the GPU at hand, in one short run.

    python benchmarks/micro_gpu.py [--tokens 16384]

Prints: bf16 matrix-product rate (the FLOP ceiling), device copy bandwidth, pinned host<->device bandwidth
(what offloaded checkpointing can hide), attention forward+backward for the Llama-3.1-8B head layout with
each backend, and the fused LoRA projections against plain torch at the benchmark's token count.
Times are medians of CUDA-event timings (`triton.testing.do_bench`) on fresh random inputs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def ceilings() -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = ms(lambda: a @ b)
    print(f"matmul 8192^3 bf16: {t:.3f} ms = {2 * 8192**3 / t / 1e9:.0f} TFLOP/s")
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    t = ms(lambda: x @ w.t())
    print(f"matmul 16384x4096 @ 4096x14336: {t:.3f} ms = {2 * 16384 * 4096 * 14336 / t / 1e9:.0f} TFLOP/s")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    print(f"device copy 1 GiB: {t:.3f} ms = {2 * 2**30 / t / 1e6:.0f} GB/s (read + write)")
    n = 16384 * 4096 * 2  # one layer input at 8 x 2048 tokens, bf16
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    t = ms(lambda: host.copy_(dev, non_blocking=True))
    print(f"device -> pinned host {n / 2**20:.0f} MiB: {t:.3f} ms = {n / t / 1e6:.1f} GB/s")
    t = ms(lambda: dev.copy_(host, non_blocking=True))
    print(f"pinned host -> device {n / 2**20:.0f} MiB: {t:.3f} ms = {n / t / 1e6:.1f} GB/s")


def attention(batch: int, seq: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fasttune.models.attention import attend, build_attention_mask, set_attention_backend

    q = torch.randn(batch, 32, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, 8, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(q)

    def fwd_bwd(f):
        def run():
            out = f()
            torch.autograd.grad(out, (q, k, v), dy)
        return run

    causal = build_attention_mask(seq, device=q.device)
    rows = torch.arange(seq, device="cuda") % (seq // 4)  # four packed rows per sequence
    packed_pos = rows.expand(batch, seq)
    cases = {
        "sdpa causal, GQA (ours)": lambda: attend(q, k, v, causal),
        "sdpa causal, K/V repeated": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True),
    }
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def forced(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        cases[f"sdpa causal GQA forced {name}"] = forced
    for name, fn in cases.items():
        try:
            print(f"attention {batch}x{seq} {name}: fwd+bwd {ms(fwd_bwd(fn)):.3f} ms")
        except Exception as e:  # a backend that does not take this case says so
            print(f"attention {batch}x{seq} {name}: n/a ({type(e).__name__}: {str(e)[:80]})")
    for backend in ("flex", "auto"):
        set_attention_backend(backend)
        label = "flex causal" if backend == "flex" else "packed rows (auto: flex)"
        mask = causal if backend == "flex" else build_attention_mask(seq, position_ids=packed_pos,
                                                                     device=q.device, head_dim=128)
        t = ms(fwd_bwd(lambda m=mask: attend(q, k, v, m)))
        print(f"attention {batch}x{seq} {label}: fwd+bwd {t:.3f} ms")
    set_attention_backend("auto")


def lora_ops(tokens: int) -> None:
    from fasttune.kernels.lora import LoRAWeights, lora_mlp, lora_qkv

    H, Inter, r = 4096, 14336, 16
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def proj(i, o):
        return LoRAWeights(torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02, None,
                           (torch.randn(r, i, device="cuda") * 0.02).requires_grad_(),
                           (torch.randn(o, r, device="cuda") * 0.02).requires_grad_(), 1.0)

    g, u, d = proj(H, Inter), proj(H, Inter), proj(Inter, H)
    q, k, v = proj(H, 4096), proj(H, 1024), proj(H, 1024)
    dy = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)

    def mlp_fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lora_mlp(x, g, u, d)
        y.backward(dy)

    def mlp_plain():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            def lin(t, p):
                return F.linear(t, p.weight) + F.linear(F.linear(t, p.lora_A), p.lora_B) * p.scaling
            y = lin(F.silu(lin(x, g)) * lin(x, u), d)
        y.backward(dy)

    def qkv_fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = lora_qkv(x, q, k, v)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    flops_mlp = 3 * 2 * tokens * H * Inter * 2  # forward + input-gradient backward, frozen weights
    for name, fn, fl in (("lora_mlp fused", mlp_fused, flops_mlp), ("mlp plain torch", mlp_plain, flops_mlp),
                         ("lora_qkv fused", qkv_fused, 2 * 2 * tokens * H * 6144)):
        t = ms(fn)
        print(f"{name} {tokens} tokens fwd+bwd: {t:.2f} ms = {fl / t / 1e9:.0f} TFLOP/s of base products")


def gemm_shapes(tokens: int) -> None:
    """Each base product of a Llama-3.1-8B layer at `tokens` rows: plain mm, and addmm_ onto an existing output
    (what the LoRA path does: the rank-r term is written first); then one product run back to back for ~2 s
    (does the card hold its clock?), and the link's rate while products run (offload under compute)."""
    H, Inter = 4096, 14336
    cases = {"q/o fwd (x W^T, 4096x4096)": (H, H, True), "k/v fwd (4096x1024)": (H, 1024, True),
             "qkv as one (4096x6144)": (H, 6144, True), "gate/up fwd (4096x14336)": (H, Inter, True),
             "gate+up as one (4096x28672)": (H, 2 * Inter, True), "down fwd (14336x4096)": (Inter, H, True),
             "dx of q/o (dy W)": (H, H, False), "dx of k/v (1024 -> 4096)": (1024, H, False),
             "dx of gate/up (14336 -> 4096)": (Inter, H, False), "dh of down (4096 -> 14336)": (H, Inter, False),
             "dx of gate+up as one (28672 -> 4096)": (2 * Inter, H, False)}
    for name, (k_in, n_out, fwd) in cases.items():
        a = torch.randn(tokens, k_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, k_in, device="cuda", dtype=torch.bfloat16) if fwd else \
            torch.randn(k_in, n_out, device="cuda", dtype=torch.bfloat16)
        bt = w.t() if fwd else w
        c = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
        fl = 2 * tokens * k_in * n_out
        t_mm, t_add = ms(lambda: torch.mm(a, bt)), ms(lambda: c.addmm_(a, bt))
        print(f"gemm {name}: mm {t_mm:.3f} ms = {fl / t_mm / 1e9:.0f} TFLOP/s, addmm_ {t_add:.3f} ms = "
              f"{fl / t_add / 1e9:.0f} TFLOP/s")
        del a, w, c
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(Inter, H, device="cuda", dtype=torch.bfloat16)
    fl = 2 * tokens * H * Inter
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for label, reps in (("first 20", 20), ("sustained 600", 600)):
        start.record()
        for _ in range(reps):
            x @ w.t()
        end.record()
        torch.cuda.synchronize()
        t = start.elapsed_time(end) / reps
        print(f"gemm gate fwd back to back, {label}: {t:.3f} ms = {fl / t / 1e9:.0f} TFLOP/s")
    host = torch.empty(Inter * tokens * 2, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    side = torch.cuda.Stream()
    copy_done = torch.cuda.Event(enable_timing=True)
    copy_start = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    with torch.cuda.stream(side):
        copy_start.record(side)
        for _ in range(4):
            host.copy_(dev, non_blocking=True)
        copy_done.record(side)
    for _ in range(150):
        x @ w.t()
    end.record()
    torch.cuda.synchronize()
    t = start.elapsed_time(end) / 150
    t_copy = copy_start.elapsed_time(copy_done)
    print(f"gemm gate fwd with 4 x {host.numel() / 2**20:.0f} MiB device->host copies beside it: {t:.3f} ms = "
          f"{fl / t / 1e9:.0f} TFLOP/s; the copies: {4 * host.numel() / t_copy / 1e6:.1f} GB/s")


def swiglu_lora_kernels(tokens: int, inter: int = 14336, hidden: int = 4096, r: int = 16) -> None:
    """lora_mlp's gate/up and SwiGLU both ways: adapter terms written first and accumulated by the products
    (then plain SwiGLU), or products without them and the terms added in the SwiGLU kernels; the backward
    kernel with and without the (N, r) products it can also make."""
    from fasttune.kernels import swiglu_lora as sl
    from fasttune.kernels.swiglu import _swiglu_bwd, _swiglu_fwd

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    w = torch.randn(inter, hidden, device=dev, dtype=dt) / hidden**0.5
    xa = torch.randn(tokens, 2 * r, device=dev, dtype=dt)
    bs = torch.randn(inter, r, device=dev, dtype=dt) / r
    g, u, dh = (torch.randn(tokens, inter, device=dev, dtype=dt) for _ in range(3))

    def epilogue():
        y = torch.mm(xa[:, :r], bs.t())
        return y.addmm_(x, w.t())

    fl = 2 * tokens * hidden * inter
    t_epi, t_mm = ms(epilogue), ms(lambda: torch.mm(x, w.t()))
    print(f"gate product with its adapter term first (mm + addmm_): {t_epi:.3f} ms = {fl / t_epi / 1e9:.0f} "
          f"TFLOP/s; without it (mm): {t_mm:.3f} ms = {fl / t_mm / 1e9:.0f}")
    t_f, t_b = ms(lambda: _swiglu_fwd(g, u)), ms(lambda: _swiglu_bwd(dh, g, u))
    print(f"swiglu fwd {t_f * 1e3:.0f} us, bwd {t_b * 1e3:.0f} us (plain)")
    # The backward kernel as lora_mlp calls it, alone and also making dg B_g, du B_u from partial sums,
    # beside the product of an (N, inter) tensor each of them replaces.
    args = (g, u, xa[:, :r], bs, xa[:, r:], bs)
    t_f, t_b = ms(lambda: sl._swiglu_lora_fwd(*args)), ms(lambda: sl._swiglu_lora_bwd(dh, *args))
    t_bd, t_pb = ms(lambda: sl._swiglu_lora_bwd(dh, *args, want_db=True)), ms(lambda: g @ bs)
    print(f"swiglu_lora fwd {t_f * 1e3:.0f} us; bwd {t_b * 1e3:.0f} us, with dg B_g, du B_u "
          f"{t_bd * 1e3:.0f} us (each product alone {t_pb * 1e3:.0f} us)")
    # lora_mlp's backward on the Triton path: h written over dh, against the forward kernel run again for h.
    buf = dh.clone()
    t_all = ms(lambda: sl._swiglu_lora_bwd(buf, *args, want_db=True, want_h=True))
    print(f"swiglu_lora bwd with h: {t_all * 1e3:.0f} us; replaces the forward kernel {t_f * 1e3:.0f} us")


def rank_products(tokens: int) -> None:
    """The rank-r products the LoRA layers write at (tokens, out): the one-pass kernel of
    `kernels/rank_product.py` against cuBLAS (mm; addmm with c, which first copies c into the output)."""
    from fasttune.kernels.rank_product import _rank_product_fwd

    dev, dt = "cuda", torch.bfloat16
    for out_cols, r in ((4096, 16), (1024, 16), (4096, 48), (4096, 32), (14336, 16)):
        a = torch.randn(tokens, r, device=dev, dtype=dt)
        b = torch.randn(out_cols, r, device=dev, dtype=dt).t() * 0.1  # (r, out), as lora.py scales B^T
        c = torch.randn(tokens, out_cols, device=dev, dtype=dt)
        gb = tokens * out_cols * 2 / 1e9  # one (tokens, out) bf16 tensor, GB
        t_mm, t_k = ms(lambda a=a, b=b: torch.mm(a, b)), ms(lambda a=a, b=b: _rank_product_fwd(a, b))
        t_addmm = ms(lambda a=a, b=b, c=c: torch.addmm(c, a, b))
        t_kc = ms(lambda a=a, b=b, c=c: _rank_product_fwd(a, b, c))
        print(f"rank-{r} product to ({tokens}, {out_cols}): cuBLAS mm {t_mm * 1e3:.0f} us "
              f"({gb / t_mm:.2f} TB/s), kernel {t_k * 1e3:.0f} us ({gb / t_k:.2f}); with c: addmm "
              f"{t_addmm * 1e3:.0f} us, kernel {t_kc * 1e3:.0f} us ({2 * gb / t_kc:.2f} TB/s)")
def nf4_dequant(sweep: bool = False) -> None:
    """NF4 dequantisation of the Llama-3.1-8B layer's weights (double-quantised, bf16 out): ours into the
    reused buffer against bitsandbytes' dequantize_4bit, with the rate of its traffic (packed bytes and
    block codes in, bf16 out). `sweep`: also our kernel at other tiles (packed bytes a program, warps)."""
    import bitsandbytes.functional as bnbf

    from fasttune.kernels.nf4 import NF4Weight, _launch, dequantize_nf4

    for name, shape in (("gate/up/down", (14336, 4096)), ("q/o", (4096, 4096)), ("k/v", (1024, 4096))):
        dense = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = bnbf.quantize_4bit(dense, quant_type="nf4", compress_statistics=True)
        w = NF4Weight.from_bnb(packed, state)
        assert torch.equal(dequantize_nf4(w), bnbf.dequantize_4bit(packed, state))
        n = dense.numel()
        gb = (n // 2 + n // 64 + 2 * n) / 1e9
        t_ours = ms(lambda w=w: dequantize_nf4(w, reuse_buffer=True))
        t_bnb = ms(lambda p=packed, st=state: bnbf.dequantize_4bit(p, st))
        print(f"nf4 dequant {name} {shape}: ours {t_ours * 1e3:.0f} us ({gb / t_ours:.2f} TB/s), "
              f"bitsandbytes {t_bnb * 1e3:.0f} us ({gb / t_bnb:.2f} TB/s)")
        if not sweep:
            continue
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        times = {}
        for block_bytes in (256, 512, 1024, 2048, 4096, 8192):
            for warps in (1, 2, 4, 8, 16):
                _launch(w, out, block_bytes, warps)
                assert torch.equal(out, dequantize_nf4(w))
                times[block_bytes, warps] = ms(lambda w=w, o=out, b=block_bytes, k=warps: _launch(w, o, b, k))
        best = sorted(times, key=times.get)
        print(f"  sweep {name}: "
              + ", ".join(f"{b} B x {k} warps {times[b, k] * 1e3:.0f} us" for b, k in best[:6]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--only", choices=["swiglu", "rank", "nf4"], default=None, help="run only this part")
    p.add_argument("--sweep", action="store_true", help="with --only nf4: also time the NF4 kernel's tiles")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.only == "swiglu":
        swiglu_lora_kernels(args.tokens)
        return
    if args.only == "rank":
        rank_products(args.tokens)
        return
    if args.only == "nf4":
        nf4_dequant(args.sweep)
        return
    ceilings()
    gemm_shapes(args.tokens)
    attention(8, 2048)
    attention(1, 32768)
    lora_ops(args.tokens)
    swiglu_lora_kernels(args.tokens)
    rank_products(args.tokens)
    nf4_dequant()


if __name__ == "__main__":
    main()
