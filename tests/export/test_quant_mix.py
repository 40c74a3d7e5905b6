"""The type of each tensor in a K-quant mix, against llama.cpp's rules written out per layer."""

from __future__ import annotations

import gguf
import pytest

from fasttune.export.quant_mix import GGUF_TYPES, more_bits, tensor_types

Q = gguf.GGMLQuantizationType


def _model(n_layer: int, hidden: int = 512, ffn: int = 1024, tied: bool = False) -> list:
    tensors = [("token_embd.weight", (1000, hidden))]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_v.weight", (hidden // 4, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, ffn)),
        ]
    tensors.append(("output_norm.weight", (hidden,)))
    if not tied:
        tensors.append(("output.weight", (1000, hidden)))
    return tensors


def test_more_bits_layers_of_a_32_layer_model():
    # first 4, last 4, and every third layer from 4 on starting at 6 (llama.cpp's use_more_bits)
    assert [i for i in range(32) if more_bits(i, 32)] == [
        0,
        1,
        2,
        3,
        6,
        9,
        12,
        15,
        18,
        21,
        24,
        27,
        28,
        29,
        30,
        31,
    ]


def test_q4_k_m_per_tensor_types():
    t = tensor_types("q4_k_m", _model(32), 32)
    assert t["token_embd.weight"] == Q.Q4_K and t["output.weight"] == Q.Q6_K
    assert t["blk.5.attn_norm.weight"] == Q.F32 and t["output_norm.weight"] == Q.F32
    for i in range(32):
        wide = Q.Q6_K if more_bits(i, 32) else Q.Q4_K
        assert t[f"blk.{i}.attn_v.weight"] == wide and t[f"blk.{i}.ffn_down.weight"] == wide
        assert t[f"blk.{i}.attn_q.weight"] == t[f"blk.{i}.ffn_up.weight"] == Q.Q4_K
        assert t[f"blk.{i}.attn_output.weight"] == Q.Q4_K


def test_other_mixes():
    m = _model(32)
    t = tensor_types("q5_k_m", m, 32)
    assert t["blk.0.attn_v.weight"] == Q.Q6_K and t["blk.4.attn_v.weight"] == Q.Q5_K
    assert t["blk.4.ffn_up.weight"] == Q.Q5_K and t["output.weight"] == Q.Q6_K
    t = tensor_types("q6_k", m, 32)
    assert {t[n] for n, s in m if len(s) == 2} == {Q.Q6_K}
    t = tensor_types("q4_k_s", m, 32)
    assert [t[f"blk.{i}.attn_v.weight"] for i in (0, 3, 4)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert [t[f"blk.{i}.ffn_down.weight"] for i in (3, 4)] == [Q.Q5_K, Q.Q4_K]
    t = tensor_types("q3_k_m", m, 32)
    assert [t[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert [t[f"blk.{i}.ffn_down.weight"] for i in (1, 2, 31)] == [Q.Q5_K, Q.Q4_K, Q.Q4_K]
    assert t["blk.9.attn_output.weight"] == Q.Q4_K and t["blk.9.attn_q.weight"] == Q.Q3_K
    assert t["output.weight"] == Q.Q6_K and t["token_embd.weight"] == Q.Q3_K


def test_tied_embedding_is_the_output_head():
    t = tensor_types("q4_k_m", _model(4, tied=True), 4)
    assert t["token_embd.weight"] == Q.Q6_K


@pytest.mark.parametrize(
    "kind,fallback", [("q4_k_m", Q.Q5_0), ("q5_k_m", Q.Q5_1), ("q6_k", Q.Q8_0), ("q3_k_m", Q.IQ4_NL)]
)
def test_rows_that_do_not_fill_super_blocks_take_llama_cpps_fallback(kind, fallback):
    # hidden 576 (SmolLM2-135M): 576 = 2.25 super-blocks, 18 blocks of 32; ffn 1536 = 6 super-blocks
    t = tensor_types(kind, _model(4, hidden=576, ffn=1536, tied=True), 4)
    assert t["blk.1.attn_q.weight"] == fallback
    assert t["token_embd.weight"] == Q.Q8_0  # the (tied) head: Q8_0 when Q6_K does not fit
    assert t["blk.1.ffn_down.weight"] in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K)  # 1536 columns fit


def test_rows_that_fit_no_block_stay_f16():
    t = tensor_types("q4_k_m", _model(2, hidden=48, ffn=80), 2)
    assert t["blk.0.attn_q.weight"] == t["output.weight"] == Q.F16


def test_legacy_types_are_unchanged():
    t = tensor_types("q4_0", _model(2), 2)
    assert t["blk.0.attn_v.weight"] == Q.Q4_0 and t["token_embd.weight"] == t["output.weight"] == Q.Q8_0
    assert GGUF_TYPES["q4_k_m"].file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_position_embeddings_stay_16_bit():
    tensors = [("token_embd.weight", (1000, 256)), ("position_embd.weight", (64, 256))]
    assert tensor_types("q4_k_m", tensors, 1)["position_embd.weight"] == Q.F16
    assert tensor_types("q8_0", tensors, 1)["position_embd.weight"] == Q.F16
    assert tensor_types("f32", tensors, 1)["position_embd.weight"] == Q.F32
