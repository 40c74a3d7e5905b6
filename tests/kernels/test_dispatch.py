"""The dispatch rule: Triton on CUDA, the reference on the CPU, and forcing the Triton path in tests."""

from __future__ import annotations

import pytest
import torch

from fasttune.kernels import _dispatch
from fasttune.kernels._dispatch import next_pow2, row_block, use_triton


def test_cpu_tensors_take_the_reference_unless_forced():
    x = torch.zeros(3)
    assert use_triton(x) is False
    assert use_triton(x, None) is False
    assert use_triton(x, force=False) is False


def test_forcing_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.zeros(3)
    if not _dispatch.HAS_TRITON:
        with pytest.raises(RuntimeError, match="triton is not installed"):
            use_triton(x, force=True)
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x, force=True) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(x, force=True)


def test_whole_model_switch_sends_cpu_ops_to_the_interpreter(monkeypatch):
    # FASTTUNE_TRITON_ON_CPU=1 (with TRITON_INTERPRET=1) lets a model test run every public op's kernel.
    if not _dispatch.interpreting():
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    from fasttune.kernels.rms_norm import rms_norm

    x = torch.randn(2, 8, requires_grad=True)
    assert "RMSNormFunction" not in type(rms_norm(x, torch.ones(8), 1e-6).grad_fn).__name__
    monkeypatch.setenv("FASTTUNE_TRITON_ON_CPU", "1")
    assert use_triton(x) is True
    assert "RMSNormFunction" in type(rms_norm(x, torch.ones(8), 1e-6).grad_fn).__name__
    assert use_triton(x, force=False) is False


@pytest.mark.gpu
def test_cuda_tensors_take_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.zeros(3, device="cuda")
    assert use_triton(x, None) is _dispatch.HAS_TRITON
    assert use_triton(x, torch.zeros(3)) is False  # any CPU tensor sends the op to the reference


def test_block_sizes():
    assert [next_pow2(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert row_block(576) == (1024, 4)
    with pytest.raises(ValueError, match="exceeds the limit"):
        row_block(70000)
