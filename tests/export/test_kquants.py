"""fasttune's K-quant quantizer: the bytes decode through the `gguf` package's own dequantizers to exactly the
values the quantizer chose, the error sits where each format's bits put it, and odd inputs stay exact."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from fasttune.export.kquants import TYPES, WITH_IMPORTANCE, quantize, quantize_with_values

Q = gguf.GGMLQuantizationType
# relative RMS error on Gaussian rows: an upper bound per type (from the bits per weight, with room)
MAX_ERR = {Q.Q3_K: 0.17, Q.Q4_K: 0.085, Q.Q5_K: 0.043, Q.Q6_K: 0.021, Q.IQ4_NL: 0.09}


def _rows(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[1, 7] = 0.6  # an outlier
    x[2] = x[2].abs()  # a row with no negative value (the min/offset path)
    x[3] = -x[3].abs()
    x[4, :256] = 0.0  # an all-zero super-block
    x[5] *= 1e-6  # scales near f16's smallest normal
    return x


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_gguf_dequantizer_reads_back_exactly_what_was_quantized(qtype):
    x = _rows()
    raw, values = quantize_with_values(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], x.shape[1] // block * size)
    decoded = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(decoded, values.numpy())
    assert np.all(decoded[4, :256] == 0)
    err = float((torch.from_numpy(decoded) - x).norm() / x.norm())
    assert 0 < err < MAX_ERR[qtype], err


def test_more_bits_give_less_error_and_beat_the_legacy_4bit_format():
    x = _rows(seed=1)
    err = {}
    for qtype in (Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        decoded = gguf.quants.dequantize(quantize(x, qtype), qtype)
        err[qtype] = float((torch.from_numpy(decoded) - x).norm() / x.norm())
    legacy = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), Q.Q4_0), Q.Q4_0)
    q4_0 = float((torch.from_numpy(legacy) - x).norm() / x.norm())
    assert err[Q.Q3_K] > err[Q.Q4_K] > err[Q.Q5_K] > err[Q.Q6_K]
    assert err[Q.Q4_K] < q4_0  # Q4_K's fitted scales and mins beat Q4_0 at about the same size


def test_scale_search_beats_a_plain_range_fit():
    """Q6_K with the search against the same format with the sub-block peak mapped to the range end."""
    x = _rows(seed=2)
    decoded = torch.from_numpy(gguf.quants.dequantize(quantize(x, Q.Q6_K), Q.Q6_K))
    sub = x.reshape(-1, 16)
    peak = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))
    step = -peak / 32
    naive = (sub / step.where(step != 0, torch.ones_like(step))).round().clamp(-32, 31) * step
    assert (decoded - x).norm() < (naive.reshape_as(x) - x).norm()


def _importance(cols: int, seed: int = 4) -> torch.Tensor:
    """Mean squared activations as an imatrix holds them: spread over orders of magnitude, one zero."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(cols, generator=g).pow(4) * 10
    imp[::4] = 100.0  # a quarter of the columns of every sub-block matter most
    imp[5] = 0.0  # a channel no sample activated
    return imp


@pytest.mark.parametrize("qtype", TYPES + WITH_IMPORTANCE, ids=lambda q: q.name)
def test_with_an_importance_matrix_the_bytes_still_decode_exactly(qtype):
    x = _rows()
    raw, values = quantize_with_values(x, qtype, _importance(x.shape[1]))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.shape == (x.shape[0], x.shape[1] // block * size)
    decoded = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(decoded, values.numpy())
    assert np.all(decoded[4, :256] == 0)
    err = float((torch.from_numpy(decoded) - x).norm() / x.norm())
    assert 0 < err < {Q.Q5_0: 0.05, Q.Q5_1: 0.05}.get(qtype, MAX_ERR.get(qtype)) * 1.5, err


@pytest.mark.parametrize("qtype", TYPES + WITH_IMPORTANCE, ids=lambda q: q.name)
def test_importance_lowers_the_weighted_error(qtype):
    """The error weighted by the importance (what an imatrix estimates: the change of the layer's output)
    is lower than without it, against the plain quantizer (the `gguf` package's for Q5_0/Q5_1)."""
    x = _rows(seed=3)
    imp = _importance(x.shape[1])
    if qtype in WITH_IMPORTANCE:
        plain = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), qtype), qtype)
    else:
        plain = gguf.quants.dequantize(quantize(x, qtype), qtype)
    weighted = gguf.quants.dequantize(quantize(x, qtype, imp), qtype)

    def cost(d: np.ndarray) -> float:
        return float(((torch.from_numpy(d) - x).square() * imp).sum())

    assert cost(weighted) < 0.9 * cost(plain), (cost(weighted), cost(plain))


def test_importance_matrix_is_checked():
    x = _rows(rows=8)
    with pytest.raises(ValueError, match="negative or non-finite"):
        quantize(x, Q.Q4_K, torch.full((x.shape[1],), float("nan")))
    with pytest.raises(ValueError, match="Q5_0"):
        quantize(x, Q.Q5_0)  # only with an importance matrix: without one the gguf package writes Q5_0


def test_chunking_does_not_change_the_bytes(monkeypatch):
    from fasttune.export import kquants

    x = _rows(rows=8)
    whole = quantize(x, Q.Q5_K)
    monkeypatch.setattr(kquants, "_CHUNK", {"cpu": 3 * 256})  # three super-blocks per step, a ragged last one
    np.testing.assert_array_equal(quantize(x, Q.Q5_K), whole)


def test_rows_that_do_not_fill_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.zeros(2, 320), Q.Q4_K)
    with pytest.raises(ValueError, match="Q8_0"):
        quantize(torch.zeros(2, 256), Q.Q8_0)
