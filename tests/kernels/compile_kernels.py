"""Compile every fasttune Triton kernel to a CUDA cubin without a GPU (Triton ships ptxas).

Run as a script in a process without TRITON_INTERPRET (the kernels must be decorated for the compiler):
    python tests/kernels/compile_kernels.py 90 80
Catches what the interpreter accepts and the compiler does not (types, constexpr use, unsupported ops).
"""

from __future__ import annotations

import os
import sys


def _rows(tiles: int, dt: str) -> int:
    """The SwiGLU-LoRA backward's row tile: 64 where it makes (N, r) products from 16-bit inputs, else 16."""
    return 64 if tiles > 1 and dt != "fp32" else 16


def _swiglu_opts(tiles: int, dt: str) -> dict:
    return {"num_warps": 4, **({"num_stages": 3} if _rows(tiles, dt) == 64 else {})}


def _cases(dt: str):
    from fasttune.kernels import cross_entropy, nf4, rank_product, rms_norm, rope, swiglu, swiglu_lora

    def p(t):
        return "*" + t

    i32, f32, c = "i32", "fp32", "constexpr"
    return [
        (rms_norm._rms_norm_fwd_kernel,
         dict(x_ptr=p(dt), w_ptr=p(dt), y_ptr=p(dt), rstd_ptr=p(f32), stride_x=i32, stride_y=i32, n_rows=i32,
              n_cols=i32, eps=f32, ROWS=c, BLOCK=c), dict(ROWS=4, BLOCK=1024), {}),
        *((rms_norm._rms_norm_bwd_kernel,
           dict(dy_ptr=p(dt), x_ptr=p(dt), w_ptr=p(dt), rstd_ptr=p(f32), dx_ptr=p(dt), dw_part_ptr=p(f32),
                add_ptr=p(dt), stride_dy=i32, stride_x=i32, stride_dx=i32, stride_add=i32, n_rows=i32,
                n_cols=i32, tiles_per_program=i32, ROWS=c, BLOCK=c, HAS_ADD=c),
           dict(ROWS=32, BLOCK=128, HAS_ADD=add), {"num_warps": 4}) for add in (False, True)),
        (rope._rope_fwd_kernel,
         dict(q_ptr=p(dt), k_ptr=p(dt), qo_ptr=p(dt), ko_ptr=p(dt), cos_ptr=p(dt), sin_ptr=p(dt), seq_len=i32,
              sq_b=i32, sq_t=i32, sq_h=i32, sk_b=i32, sk_t=i32, sk_h=i32, sc_b=i32, sc_t=i32, n_q_rows=i32,
              n_k_rows=i32, n_q_heads=i32, n_k_heads=i32, n_q_tiles=i32, HALF=c, ROWS=c, D_BLOCK=c,
              BACKWARD=c), dict(HALF=64, ROWS=32, D_BLOCK=64, BACKWARD=True), {}),
        (swiglu._swiglu_fwd_kernel, dict(g_ptr=p(dt), u_ptr=p(dt), h_ptr=p(dt), n="i64", BLOCK=c),
         dict(BLOCK=1024), {}),
        (swiglu._swiglu_bwd_kernel,
         dict(dh_ptr=p(dt), g_ptr=p(dt), u_ptr=p(dt), dg_ptr=p(dt), du_ptr=p(dt), n="i64", BLOCK=c),
         dict(BLOCK=1024), {}),
        (swiglu_lora._swiglu_lora_fwd_kernel,
         dict(g_ptr=p(dt), u_ptr=p(dt), xg_ptr=p(dt), bg_ptr=p(dt), xu_ptr=p(dt), bu_ptr=p(dt), h_ptr=p(dt),
              n_rows=i32, n_cols=i32, rank=i32,
              **{k: i32 for k in ("s_gn", "s_un", "s_xgn", "s_xgr", "s_bgr", "s_xun", "s_xur", "s_bur",
                                  "s_hn")},
              BLOCK_N=c, BLOCK_I=c, BLOCK_R=c, DOT_FP32=c),
         dict(BLOCK_N=16, BLOCK_I=128, BLOCK_R=16, DOT_FP32=dt == "fp32"), {"num_warps": 4}),
        # the SwiGLU-LoRA backward without and with its (N, r) products (tensor-core dots)
        *((swiglu_lora._swiglu_lora_bwd_kernel,
           dict(dh_ptr=p(dt), g_ptr=p(dt), u_ptr=p(dt), xg_ptr=p(dt), bg_ptr=p(dt), xu_ptr=p(dt),
                bu_ptr=p(dt), dg_ptr=p(dt), du_ptr=p(dt), pg_ptr=p(f32), pu_ptr=p(f32),
                n_rows=i32, n_cols=i32, rank=i32,
                **{k: i32 for k in ("s_dhn", "s_gn", "s_un", "s_xgn", "s_xgr", "s_bgr", "s_xun", "s_xur",
                                    "s_bur", "s_dgn", "s_dun", "s_ps", "s_pn")},
                BLOCK_N=c, BLOCK_I=c, BLOCK_R=c, DOT_FP32=c, TILES=c, WANT_DB=c, WANT_H=c),
           dict(BLOCK_N=_rows(tiles, dt), BLOCK_I=64 if _rows(tiles, dt) == 64 else 128, BLOCK_R=16,
                DOT_FP32=dt == "fp32", TILES=tiles, WANT_DB=tiles > 1, WANT_H=tiles > 1),
           _swiglu_opts(tiles, dt)) for tiles in (1, 8)),
        *((rank_product._rank_product_fwd_kernel,
           dict(a_ptr=p(dt), b_ptr=p(dt), c_ptr=p(dt), out_ptr=p(dt), n_rows=i32, n_cols=i32, rank=i32,
                **{k: i32 for k in ("s_an", "s_ar", "s_br", "s_bm", "s_cn", "s_on")},
                BLOCK_N=c, BLOCK_M=c, BLOCK_R=c, HAS_C=c, DOT_FP32=c),
           dict(BLOCK_N=64, BLOCK_M=128, BLOCK_R=16, HAS_C=has_c, DOT_FP32=dt == "fp32"), {"num_warps": 4})
          for has_c in (False, True)),
        (nf4._nf4_dequant_fwd_kernel,
         dict(packed_ptr=p("u8"), absmax_ptr=p("u8"), code_ptr=p(f32), absmax2_ptr=p(f32), code2_ptr=p(f32),
              offset_ptr=p(f32), out_ptr=p(dt), n=i32, BLOCKSIZE=c, NESTED=c, NESTED_BLOCKSIZE=c, HALF=c,
              ROWS=c),
         dict(BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256, HALF=32, ROWS=32),
         {"enable_fp_fusion": False}),
        (cross_entropy._cross_entropy_fwd_kernel,
         dict(z_ptr=p(dt), y_ptr=p("i64"), lse_ptr=p(f32), loss_ptr=p(f32), stride_z=i32, n_cols=i32,
              ignore_index=i32, BLOCK=c), dict(BLOCK=4096), {"num_warps": 8}),
        (cross_entropy._cross_entropy_bwd_kernel,
         dict(z_ptr=p(dt), y_ptr=p("i64"), lse_ptr=p(f32), stride_z=i32, n_cols=i32, ignore_index=i32,
              BLOCK=c), dict(BLOCK=4096), {"num_warps": 8}),
    ]


def main(archs: list[int]) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_kernels.py: unset TRITON_INTERPRET (the kernels must be compiled)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for arch in archs:
        for dt in ("bf16", "fp16", "fp32"):
            for fn, sig, consts, opts in _cases(dt):
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                          target=GPUTarget("cuda", arch, 32), options=opts)
                assert compiled.asm["cubin"], f"{fn.__name__} {dt} sm_{arch}: empty cubin"
                print(f"{fn.__name__} {dt} sm_{arch} ok")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90])
