"""NF4 dequantisation: Triton kernel vs the PyTorch reference, plain and double-quantised absmax, and the
reference vs bitsandbytes' own dequantize_4bit on a GPU."""

from __future__ import annotations

import pytest
import torch

from fasttune.kernels.nf4 import (
    NF4_CODE,
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    nf4_buffer,
    quantize_nf4,
)

SHAPES = [(1, 1), (3, 5), (7, 64), (17, 33), (130, 257)]


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_kernel_matches_reference_bit_for_bit(device, shape, nested, dtype):
    w = quantize_nf4(_weight(shape).to(device, dtype), nested=nested)
    got = dequantize_nf4(w, force_triton=True)
    want = dequantize_nf4_reference(w)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("blocksize", [2, 32, 128, 4096])
def test_nf4_kernel_other_block_sizes(device, blocksize):
    """A program covers whole quantisation blocks (a row each): sizes from one byte a block to more than a
    program's usual 1,024 bytes, a tail block cut short (n not a multiple of it), nested and plain."""
    for nested in (False, True):
        w = quantize_nf4(_weight((37, 229), seed=3).to(device), blocksize=blocksize, nested=nested)
        assert torch.equal(dequantize_nf4(w, force_triton=True), dequantize_nf4_reference(w))


def test_nf4_reference_decodes_the_documented_layout():
    # Byte 0x7F: element 0 = code[7] (0.0), element 1 = code[15] (1.0); byte 0x0A: code[0], code[10].
    w = NF4Weight(packed=torch.tensor([0x7F, 0x0A], dtype=torch.uint8), absmax=torch.tensor([2.0, 3.0]),
                  shape=(4,), dtype=torch.float32, blocksize=2)
    torch.testing.assert_close(dequantize_nf4_reference(w), torch.tensor([0.0, 2.0, -3.0, 3 * NF4_CODE[10]]))


def test_nf4_round_trip_error_is_within_half_a_code_step():
    dense = _weight((64, 96), seed=1)
    back = dequantize_nf4_reference(quantize_nf4(dense))
    blocks = dense.reshape(-1, 64)
    largest_gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:]))
    bound = (blocks.abs().amax(1, keepdim=True) * largest_gap / 2).expand_as(blocks)
    assert ((back.reshape(-1, 64) - blocks).abs() <= bound + 1e-7).all()


def test_nf4_nested_absmax_is_close_to_plain():
    dense = _weight((33, 320), seed=2)
    plain = dequantize_nf4_reference(quantize_nf4(dense))
    nested = dequantize_nf4_reference(quantize_nf4(dense, nested=True))
    assert (plain - nested).abs().max() < 0.01 * dense.abs().max()


def test_nf4_reused_buffer(device):
    a = quantize_nf4(_weight((9, 16), seed=3).to(device))
    b = quantize_nf4(_weight((4, 8), seed=4).to(device))
    first = dequantize_nf4(a, reuse_buffer=True, force_triton=True)
    torch.testing.assert_close(first, dequantize_nf4_reference(a), rtol=0, atol=0)
    second = dequantize_nf4(b, reuse_buffer=True, force_triton=True)
    assert second.data_ptr() == first.data_ptr()  # same storage, no new allocation
    torch.testing.assert_close(second, dequantize_nf4_reference(b), rtol=0, atol=0)
    assert nf4_buffer(10, torch.float32, torch.device(device)).data_ptr() == first.data_ptr()
    out = torch.empty(9 * 16, device=device)
    assert dequantize_nf4(a, out=out, force_triton=True).data_ptr() == out.data_ptr()


def test_nf4_public_op_on_cpu_and_errors():
    w = quantize_nf4(_weight((5, 6), seed=5), nested=True)
    assert torch.equal(dequantize_nf4(w), dequantize_nf4_reference(w))
    out = torch.empty(30)
    assert dequantize_nf4(w, out=out).data_ptr() == out.data_ptr()
    bad = quantize_nf4(_weight((5, 6)))
    bad.shape = (5, 8)
    with pytest.raises(ValueError, match="packed must be uint8 with 20 bytes"):
        dequantize_nf4(bad)


def test_nf4_kernel_operands_are_checked_and_made_once():
    w = quantize_nf4(_weight((8, 64), seed=7), nested=True)
    ops = w.operands()
    assert w.operands() is ops and all(t.dtype == torch.float32 for t in ops) and ops[3].shape == (1,)
    bad = quantize_nf4(_weight((5, 6)))
    bad.shape = (5, 8)
    with pytest.raises(ValueError, match="packed must be uint8 with 20 bytes"):
        bad.operands()


def test_nf4_from_bnb_reads_a_quant_state_by_attribute():
    ref = quantize_nf4(_weight((8, 64), seed=6), nested=True)

    class State2:
        absmax, code, blocksize = ref.nested_absmax, ref.nested_code, 256

    class QuantState:
        absmax, shape, code, dtype, blocksize = ref.absmax, torch.Size((8, 64)), ref.code, torch.float32, 64
        quant_type, nested, offset, state2 = "nf4", True, ref.offset, State2

    w = NF4Weight.from_bnb(ref.packed.view(-1, 1), QuantState)
    assert torch.equal(dequantize_nf4_reference(w), dequantize_nf4_reference(ref))
    # quant_storage=bf16 (as FSDP uses) stores the same bytes two to an element.
    w = NF4Weight.from_bnb(ref.packed.view(torch.bfloat16), QuantState)
    assert torch.equal(dequantize_nf4_reference(w), dequantize_nf4_reference(ref))
    QuantState.quant_type = "fp4"
    with pytest.raises(ValueError, match="quant_type 'fp4'"):
        NF4Weight.from_bnb(ref.packed, QuantState)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_matches_bitsandbytes(nested, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    dense = _weight((257, 384), seed=7).to("cuda", dtype)
    packed, state = bnb_f.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=nested)
    want = bnb_f.dequantize_4bit(packed, state)
    w = NF4Weight.from_bnb(packed, state)
    assert torch.equal(dequantize_nf4_reference(w), want)
    assert torch.equal(dequantize_nf4(w), want)
